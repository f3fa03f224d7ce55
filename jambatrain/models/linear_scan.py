"""The diagonal linear recurrence h_t = a_t * h_{t-1} + x_t (h_{-1} = 0) with an analytic backward.

This is the core of the reference selective scan. Autograd never records the recurrence itself: the
backward is the same recurrence run in reverse, g_t = dh_t + a_{t+1} g_{t+1}, then da_t = g_t h_{t-1},
dx_t = g_t. Two forward algorithms, picked by device:
  * CPU: the sequential recurrence, in place, no autograd. A scan is memory-bound there and the parallel form
    does log2(chunk) times the work, so the sequential one is faster (docs/benchmarks.md, "CPU figures").
  * CUDA (when mamba-ssm's kernel is absent): chunked Hillis-Steele scan, log2(chunk) vectorised steps
    inside chunks and one step per chunk across them, so the launch count is L/chunk + log2(chunk),
    not L. Every a_t is in [0, 1], so products never overflow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def _scan_sequential(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(x)
    prev = torch.zeros_like(x[..., 0, :])
    for t in range(x.shape[-2]):
        prev = torch.addcmul(x[..., t, :], a[..., t, :], prev)
        h[..., t, :] = prev
    return h


@torch.no_grad()
def _scan_chunked(a: torch.Tensor, x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    *lead, L, n = x.shape
    pad = (-L) % chunk
    a = F.pad(a, (0, 0, 0, pad), value=1.0).reshape(*lead, -1, chunk, n)  # padded steps keep the state
    h = F.pad(x, (0, 0, 0, pad)).reshape(*lead, -1, chunk, n)
    off = 1
    while off < chunk:
        h[..., off:, :] += a[..., off:, :] * h[..., :-off, :].clone()
        a[..., off:, :] *= a[..., :-off, :].clone()
        off *= 2
    carry = torch.zeros_like(h[..., 0, 0, :])
    for c in range(h.shape[-3]):  # a now holds the cumulative decay since the chunk start
        h[..., c, :, :] += a[..., c, :, :] * carry.unsqueeze(-2)
        carry = h[..., c, -1, :]
    return h.reshape(*lead, -1, n)[..., :L, :]


def _scan(a, x):
    return _scan_sequential(a, x) if a.device.type == "cpu" else _scan_chunked(a.clone(), x)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x):
        h = _scan(a, x)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h = ctx.saved_tensors
        a_next = torch.cat([a[..., 1:, :], torch.ones_like(a[..., :1, :])], dim=-2)
        g = _scan(a_next.flip(-2), dh.flip(-2)).flip(-2)
        h_prev = torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)
        return g * h_prev, g


def linear_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a, x: (..., L, n) fp32 -> all states h: (..., L, n)."""
    return _LinearScan.apply(a.contiguous(), x.contiguous())
