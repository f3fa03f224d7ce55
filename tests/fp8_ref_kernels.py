"""Plain-torch references for the FP8 experts' kernels, so ``float8._GroupedMMFP8`` runs on CPU: torchao's Triton
casts (``torchao.prototype.moe_training.kernels``) and ``torch._scaled_grouped_mm`` (CUDA only), computed in fp32
with the layout and scale-shape checks the CUDA kernels make (torch/_meta_registrations.py). Shared by
tests/test_fp8_experts.py (the ``ref_kernels`` fixture) and tests/fp8_ep_worker.py (under torchrun); the kernels
themselves are compared with these on the GPU (tests/test_fp8_gpu.py)."""
from __future__ import annotations

import torch

F8 = torch.float8_e4m3fn


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    s = torch.finfo(F8).max / amax.float().clamp_min(1e-12)
    return torch.exp2(torch.floor(torch.log2(s)))


def _cast(x, scale):
    m = torch.finfo(F8).max
    return (x.float() * scale).clamp(-m, m).to(F8)


def _col_major(x):
    return x.t().contiguous().t()


def ref_rowwise_2d(x, output_dtype=F8, round_scales_to_power_of_2=True):
    assert x.stride(-1) == 1
    s = _pow2_scale(x.abs().amax(1, keepdim=True))
    return _cast(x, s), s  # (M, K) row-major, (M, 1)


def ref_3d_transpose_rhs(b_t, output_dtype=F8, round_scales_to_power_of_2=True):
    """(E, K, N) in -> (E, N, K) column-major FP8, scales (E, K) (amax over N)."""
    s = _pow2_scale(b_t.abs().amax(2))
    data = _cast(b_t, s[:, :, None])  # (E, K, N) row-major = (E, N, K) column-major once transposed
    return data.contiguous().transpose(1, 2), s


def ref_colwise_dual(t1, t2, offs, output_dtype=F8, round_scales_to_power_of_2=True):
    """Per group of rows, per column scales, index g * N + n; the data column-major."""
    out = []
    for t in (t1, t2):
        data, scales, start = torch.empty_like(t, dtype=torch.float32), [], 0
        for end in offs.tolist():
            s = _pow2_scale(t[start:end].abs().amax(0) if end > start else torch.zeros(t.shape[1]))
            data[start:end] = t[start:end].float() * s
            scales.append(s)
            start = end
        m = torch.finfo(F8).max
        out += [_col_major(data.clamp(-m, m).to(F8)), torch.cat(scales)]
    return tuple(out)


def ref_scaled_grouped_mm(a, b, scale_a, scale_b, offs, out_dtype=torch.bfloat16, use_fast_accum=False):
    """torch._scaled_grouped_mm in fp32, with the CUDA kernel's layout and scale-shape checks."""
    assert a.dtype == b.dtype == F8 and scale_a.dtype == scale_b.dtype == torch.float32
    assert a.stride(-1) == 1 and a.stride(-2) > 1, f"mat_a must be row-major, strides {a.stride()}"
    assert b.stride(-2) == 1 and b.stride(-1) > 1, f"mat_b must be column-major, strides {b.stride()}"
    G, start = offs.shape[0], 0
    if b.dim() == 3:  # 2d-3d: groups of a's rows; scale_a (M,), scale_b (G, N)
        assert scale_a.shape == (a.shape[0],) and scale_b.shape == (G, b.shape[2]), (scale_a.shape, scale_b.shape)
        out = torch.zeros(a.shape[0], b.shape[2])
        for g, end in enumerate(offs.tolist()):
            out[start:end] = (a[start:end].float() * scale_a[start:end, None]) @ (b[g].float() * scale_b[g])
            start = end
        return out.to(out_dtype)
    # 2d-2d: groups along K; scale_a (G * M,), scale_b (G * N,)
    M, N = a.shape[0], b.shape[1]
    assert scale_a.shape == (G * M,) and scale_b.shape == (G * N,), (scale_a.shape, scale_b.shape)
    out = torch.zeros(G, M, N)
    for g, end in enumerate(offs.tolist()):
        out[g] = ((a[:, start:end].float() * scale_a[g * M:(g + 1) * M, None])
                  @ (b[start:end].float() * scale_b[g * N:(g + 1) * N]))
        start = end
    return out.to(out_dtype)


def install(setattr_=setattr) -> None:
    """Put the references in place of torchao's kernels and ``torch._scaled_grouped_mm``; ``setattr_``: pytest's
    ``monkeypatch.setattr`` (undone after the test) or plain ``setattr`` (a worker process)."""
    import torchao.prototype.moe_training.kernels as k

    setattr_(k, "triton_fp8_rowwise_2d_scale_and_cast", ref_rowwise_2d)
    setattr_(k, "triton_fp8_rowwise_3d_transpose_rhs", ref_3d_transpose_rhs)
    setattr_(k, "triton_fp8_per_group_colwise_scales_dual", ref_colwise_dual)
    setattr_(torch, "_scaled_grouped_mm", ref_scaled_grouped_mm)
