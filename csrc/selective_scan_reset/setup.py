"""Builds ``jambatrain_scan_reset_cuda``: mamba-ssm's Mamba-1 selective scan (forward + backward) with a
per-position state reset, so packed documents take the fused kernel too (see make_fork.py for the patch).

    TORCH_CUDA_ARCH_LIST=9.0 pip wheel --no-deps --no-build-isolation csrc/selective_scan_reset

``launch/build_kernels.sh`` builds it with the other kernel wheels. It needs nvcc and a CUDA build of torch;
the arch list comes from TORCH_CUDA_ARCH_LIST (torch's CUDAExtension default: the visible GPU's).
"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

nvcc_flags = [
    "-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
]
setup(
    name="jambatrain-scan-reset",
    version="0.1.0",
    description="Mamba-1 selective scan with document resets (fork of mamba-ssm 2.3.2.post1's kernel) for jambatrain",
    license="Apache-2.0",
    ext_modules=[CUDAExtension(
        name="jambatrain_scan_reset_cuda",
        # relative paths: pip runs setup.py from this directory
        sources=["selective_scan_reset.cpp", "selective_scan_fwd_bf16.cu", "selective_scan_fwd_fp32.cu",
                 "selective_scan_bwd_bf16.cu", "selective_scan_bwd_fp32.cu"],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )],
    cmdclass={"build_ext": BuildExtension},
)
