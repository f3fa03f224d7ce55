// jambatrain fork of mamba-ssm's selective scan (see make_fork.py): real weights only.
#include "selective_scan_fwd_kernel.cuh"

template void selective_scan_fwd_cuda<float, float>(SSMParamsBase &params, cudaStream_t stream);
