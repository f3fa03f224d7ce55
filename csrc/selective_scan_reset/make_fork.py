"""Regenerates this directory's kernel sources from mamba-ssm 2.3.2.post1's csrc/selective_scan (Apache-2.0,
LICENSE-mamba-ssm): the Mamba-1 selective scan with a per-position state reset for packed documents.

    python csrc/selective_scan_reset/make_fork.py SRC [OUT]

SRC is mamba-ssm's source tree, its sdist (``mamba_ssm-2.3.2.post1.tar.gz``) or the extract of it kept here
(``upstream-mamba_ssm-2.3.2.post1.tar.gz``: LICENSE and csrc/selective_scan's files the fork reads, byte for byte
from the sdist); OUT defaults to this directory. ``tests/test_kernel_fork.py`` regenerates the fork from the extract
into a temp dir and holds the files here to it.

What the patch changes, and nothing else:
  * SSMParamsBase gets ``reset_ptr`` / ``reset_batch_stride``: a (batch, seqlen) tensor in u's dtype, nonzero
    where a document starts.
  * forward and backward kernels load it per chunk into a bit mask; where it is set the decay exp(delta A) is 0,
    so the state restarts from that position's input (h_t = delta_t B_t u_t), and the backward's h_{t-1} term
    (``a``) is 0, so no gradient flows into the previous document through the decay, dA or ddelta.
  * the host functions take ``reset`` after ``delta_softplus``, and dispatch fp32 / bf16 inputs with real fp32
    weights only (the fork builds 4 kernel files instead of 10; complex and fp16 are not used by Jamba).
"""
import pathlib
import re
import shutil
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
FILES = ["selective_scan.h", "selective_scan_common.h", "static_switch.h", "uninitialized_copy.cuh",
         "reverse_scan.cuh", "selective_scan_fwd_kernel.cuh", "selective_scan_bwd_kernel.cuh"]

RESET_LOAD = """
        uint32_t reset_mask = 0;  // jambatrain: bit i set where position i of this thread's items starts a document
        if (params.reset_ptr != nullptr) {
            input_t reset_vals[kNItems];
            __syncthreads();
            load_input<Ktraits>(reinterpret_cast<input_t *>(params.reset_ptr) + batch_id * params.reset_batch_stride
                                + chunk * kChunkSize, reset_vals, smem_load, params.seqlen - chunk * kChunkSize);
            #pragma unroll
            for (int i = 0; i < kNItems; ++i) { if (float(reset_vals[i]) != 0.f) { reset_mask |= 1u << i; } }
        }
"""


def sub(text: str, old: str, new: str, count: int = 1) -> str:
    if text.count(old) != count:
        raise SystemExit(f"patch anchor found {text.count(old)} times, expected {count}: {old[:80]!r}")
    return text.replace(old, new)


UPSTREAM = HERE / "upstream-mamba_ssm-2.3.2.post1.tar.gz"
NEEDED = ["LICENSE"] + [f"csrc/selective_scan/{f}" for f in FILES + ["selective_scan.cpp"]]


def main(src_root: str, out: str | None = None) -> list[str]:
    """Write the fork into ``out`` (default: this directory); returns the names written."""
    if str(src_root).endswith((".tar.gz", ".tgz")):  # the sdist or the extract of it kept here
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(src_root) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.split("/", 1)[-1] in NEEDED], **safe)
            (root,) = pathlib.Path(tmp).iterdir()
            return main(str(root), out)
    return _generate(pathlib.Path(src_root), pathlib.Path(out) if out else HERE)


def _generate(src_root: pathlib.Path, out: pathlib.Path) -> list[str]:
    src = src_root / "csrc" / "selective_scan"
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy(src / f, out / f)
    shutil.copy(src_root / "LICENSE", out / "LICENSE-mamba-ssm")

    h = (out / "selective_scan.h").read_text()
    h = sub(h, "    void *__restrict__ x_ptr;\n",
            "    void *__restrict__ x_ptr;\n    void *__restrict__ reset_ptr;  // jambatrain: (batch, seqlen), u's dtype\n"
            "    index_t reset_batch_stride;\n")
    (out / "selective_scan.h").write_text(h)

    fwd = (out / "selective_scan_fwd_kernel.cuh").read_text()
    fwd = sub(fwd, "        u += kChunkSize;\n        delta += kChunkSize;\n",
              "        u += kChunkSize;\n        delta += kChunkSize;\n" + RESET_LOAD)
    fwd = sub(fwd, "thread_data[i] = make_float2(exp2f(delta_vals[r][i] * A_val[r]),",
              "thread_data[i] = make_float2((reset_mask >> i) & 1u ? 0.f : exp2f(delta_vals[r][i] * A_val[r]),")
    (out / "selective_scan_fwd_kernel.cuh").write_text(fwd)

    bwd = (out / "selective_scan_bwd_kernel.cuh").read_text()
    bwd = sub(bwd, "        float dout_vals[kNItems], delta_vals[kNItems];\n",
              RESET_LOAD + "        float dout_vals[kNItems], delta_vals[kNItems];\n")
    bwd = sub(bwd, "                    const float delta_a_exp = exp2f(delta_vals[i] * A_scaled);",
              "                    const float delta_a_exp = (reset_mask >> i) & 1u ? 0.f : exp2f(delta_vals[i] * A_scaled);")
    bwd = sub(bwd, "                    const float a = thread_data[i].y - (!kIsVariableB",
              "                    const float a = (reset_mask >> i) & 1u ? 0.f : thread_data[i].y - (!kIsVariableB")
    (out / "selective_scan_bwd_kernel.cuh").write_text(bwd)

    cpp = (src / "selective_scan.cpp").read_text()
    # fp32 / bf16 inputs, real fp32 weights: the only instantiations the fork builds
    cpp = re.sub(r"    DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16\(u.scalar_type\(\), \"(\w+)\", \[&\] \{\n"
                 r"        DISPATCH_WTYPE_FLOAT_AND_COMPLEX\(A.scalar_type\(\), \"\w+\", \[&\] \{\n"
                 r"            (selective_scan_\w+_cuda)<input_t, weight_t>\(params, stream\);\n"
                 r"        \}\);\n    \}\);\n",
                 lambda m: (f"    TORCH_CHECK(A.scalar_type() == at::ScalarType::Float, \"{m.group(1)}: real fp32 A only\");\n"
                            f"    if (u.scalar_type() == at::ScalarType::BFloat16) {{\n"
                            f"        {m.group(2)}<at::BFloat16, float>(params, stream);\n"
                            f"    }} else if (u.scalar_type() == at::ScalarType::Float) {{\n"
                            f"        {m.group(2)}<float, float>(params, stream);\n"
                            f"    }} else {{\n        TORCH_CHECK(false, \"{m.group(1)}: fp32 or bf16 inputs only\");\n    }}\n"),
                 cpp)
    if cpp.count("if (u.scalar_type() == at::ScalarType::BFloat16)") != 2:
        raise SystemExit("dispatch patch did not apply twice")
    reset_arg = "                  bool delta_softplus,\n                  const at::Tensor &reset"
    cpp = sub(cpp, "                  const c10::optional<at::Tensor> &delta_bias_,\n                  bool delta_softplus) {",
              "                  const c10::optional<at::Tensor> &delta_bias_,\n" + reset_arg + ") {")
    cpp = sub(cpp, "                  bool delta_softplus,\n                  bool recompute_out_z) {",
              "                  bool delta_softplus,\n                  bool recompute_out_z,\n                  const at::Tensor &reset) {")
    check = """    TORCH_CHECK(reset.is_cuda() && reset.scalar_type() == u.scalar_type() && reset.dim() == 2
                && reset.size(0) == u.size(0) && reset.size(1) == u.size(2) && reset.stride(-1) == 1,
                "reset must be a (batch, seqlen) CUDA tensor in u's dtype with stride(-1) == 1");
"""
    set_ptr = "    params.reset_ptr = reset.data_ptr();\n    params.reset_batch_stride = reset.stride(0);\n"
    cpp = sub(cpp, "    SSMParamsBase params;\n", check + "    SSMParamsBase params;\n")
    cpp = sub(cpp, "    SSMParamsBwd params;\n", check + "    SSMParamsBwd params;\n")
    cpp = sub(cpp, "    // Otherwise the kernel will be launched from cuda:0 device\n",
              set_ptr + "    // Otherwise the kernel will be launched from cuda:0 device\n", count=2)
    cpp = sub(cpp, '"Selective scan forward");', '"Selective scan forward with document resets");')
    cpp = sub(cpp, '"Selective scan backward");', '"Selective scan backward with document resets");')
    (out / "selective_scan_reset.cpp").write_text(
        "// jambatrain fork of mamba-ssm 2.3.2.post1 csrc/selective_scan/selective_scan.cpp; see make_fork.py.\n" + cpp)
    for kind, params in (("fwd", "SSMParamsBase"), ("bwd", "SSMParamsBwd")):
        for name, t in (("bf16", "at::BFloat16"), ("fp32", "float")):
            (out / f"selective_scan_{kind}_{name}.cu").write_text(
                f"// jambatrain fork of mamba-ssm's selective scan (see make_fork.py): real weights only.\n"
                f'#include "selective_scan_{kind}_kernel.cuh"\n\n'
                f"template void selective_scan_{kind}_cuda<{t}, float>({params} &params, cudaStream_t stream);\n")
    return FILES + ["LICENSE-mamba-ssm", "selective_scan_reset.cpp"] + [
        f"selective_scan_{kind}_{name}.cu" for kind in ("fwd", "bwd") for name in ("bf16", "fp32")]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
