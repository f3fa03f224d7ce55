// jambatrain fork of mamba-ssm's selective scan (see make_fork.py): real weights only.
#include "selective_scan_bwd_kernel.cuh"

template void selective_scan_bwd_cuda<at::BFloat16, float>(SSMParamsBwd &params, cudaStream_t stream);
