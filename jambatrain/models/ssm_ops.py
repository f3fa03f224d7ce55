"""Mamba-1 ops: pure-PyTorch references beside the fused CUDA kernels, one signature for both.

``selective_scan`` and ``causal_conv1d`` take the fused kernels from mamba-ssm / causal-conv1d when
they import, the tensors are on CUDA and ``impl`` allows it; otherwise the references below run.
The references follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``'s signature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional fused kernels: only importable on a CUDA build with the extensions compiled
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _selective_scan_cuda
except Exception:  # noqa: BLE001 - ImportError, or a CUDA/triton error raised at import on CPU boxes
    _selective_scan_cuda = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_cuda
except Exception:  # noqa: BLE001
    _causal_conv1d_cuda = None


def kernels_available() -> dict[str, bool]:
    return {"selective_scan": _selective_scan_cuda is not None, "causal_conv1d": _causal_conv1d_cuda is not None}


def _use_kernel(kernel, impl: str, x: torch.Tensor) -> bool:
    if impl == "reference":
        return False
    if impl == "cuda":
        if kernel is None or not x.is_cuda:
            raise RuntimeError("model.mamba_impl=cuda but the mamba-ssm/causal-conv1d kernels are not importable "
                               "or the tensors are not on CUDA: install the `gpu` extra (launch/build_kernels.sh) "
                               "or set model.mamba_impl=auto")
        return True
    return kernel is not None and x.is_cuda


def _expand_bc(M: torch.Tensor, d: int) -> torch.Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, d or 1, l, n) broadcastable over channels."""
    if M.dim() == 3:
        return M.transpose(1, 2).unsqueeze(1)
    g = M.shape[1]
    return M.repeat_interleave(d // g, dim=1).transpose(2, 3)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, chunk_size: int = 16, reset: torch.Tensor | None = None):
    """Chunked parallel selective scan: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t h_t + D u_t.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Inside chunks of ``chunk_size`` the linear recurrence is a Hillis-Steele scan over (decay, input) pairs
    (log2(chunk) vectorised steps; every decay is in (0, 1], so it is stable); across chunks a short loop
    carries the state. ``reset``: optional bool (b, l), True where a new document starts (state zeroed).
    Returns y (b, d, l) in u's dtype, and the last state (b, d, n) if ``return_last_state``.
    """
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    n = A.shape[1]
    Bx, Cx = _expand_bc(B.float(), d), _expand_bc(C.float(), d)
    decay = torch.exp(delta.unsqueeze(-1) * A.float()[None, :, None, :])  # (b, d, l, n)
    x = (delta * u).unsqueeze(-1) * Bx  # (b, d, l, n)
    if reset is not None:
        decay = decay * (~reset.bool())[:, None, :, None]
    T = chunk_size
    pad = (-L) % T
    if pad:  # padded steps keep the state: decay 1, input 0
        decay = F.pad(decay, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad))
    nc = (L + pad) // T
    a = decay.view(b, d, nc, T, n)
    x = x.view(b, d, nc, T, n)
    off = 1
    while off < T:
        x = torch.cat([x[:, :, :, :off], x[:, :, :, off:] + a[:, :, :, off:] * x[:, :, :, :-off]], dim=3)
        a = torch.cat([a[:, :, :, :off], a[:, :, :, off:] * a[:, :, :, :-off]], dim=3)
        off *= 2
    h = u.new_zeros(b, d, n)
    h_in = []
    for c in range(nc):
        h_in.append(h)
        h = a[:, :, c, -1] * h + x[:, :, c, -1]
    states = x + a * torch.stack(h_in, dim=2).unsqueeze(3)  # (b, d, nc, T, n)
    states = states.view(b, d, nc * T, n)[:, :, :L]
    y = (states * Cx).sum(-1)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False):
    """The recurrence one token at a time: the ground truth the chunked scan and kernel are tested against."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    Bx, Cx = _expand_bc(B.float(), d), _expand_bc(C.float(), d)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A.float()) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[:, :, t]
        ys.append((h * Cx[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   impl: str = "auto", reset: torch.Tensor | None = None):
    if reset is None and _use_kernel(_selective_scan_cuda, impl, u):
        return _selective_scan_cuda(u, delta, A, B.contiguous(), C.contiguous(), D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              reset=reset)


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "silu"):
    """Depthwise causal conv. x: (b, d, l); weight: (d, k)."""
    k = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def causal_conv1d(x, weight, bias, activation: str | None = "silu", impl: str = "auto"):
    if _use_kernel(_causal_conv1d_cuda, impl, x):
        return _causal_conv1d_cuda(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)
