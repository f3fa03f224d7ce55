"""Jamba's Mamba-1 mixer: Mamba with RMSNorms on dt, B and C (Jamba paper, section 6.1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import RMSNorm, linear, weight_mm
from .ssm_ops import causal_conv1d, causal_conv1d_doc, causal_conv1d_doc_ref, mamba_kernel_path, selective_scan


class MambaMixer(nn.Module):
    """Parameter names match HF ``JambaMambaMixer`` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, r = cfg.mamba_d_inner, cfg.mamba_d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.impl = cfg.mamba_impl
        # CUDA kernel path in the (d, batch*seq) layout of _forward_kernels; False: the generic forward (the A/B of
        # bench/throughput.py)
        self.kernel_layout = cfg.mamba_kernel_layout
        self.compile_elementwise = cfg.compile_elementwise
        self.in_proj = linear(cfg.hidden_size, 2 * d, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(d, d, cfg.mamba_d_conv, groups=d, padding=cfg.mamba_d_conv - 1,
                                bias=cfg.mamba_conv_bias)
        self.x_proj = linear(d, r + 2 * n, bias=False)
        self.dt_proj = linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))
        self.D = nn.Parameter(torch.empty(d))
        self.out_proj = linear(d, cfg.hidden_size, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, cfg.rms_norm_eps, cfg.fused_rms_norm)
        self.b_layernorm = RMSNorm(n, cfg.rms_norm_eps, cfg.fused_rms_norm)
        self.c_layernorm = RMSNorm(n, cfg.rms_norm_eps, cfg.fused_rms_norm)

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba's S4D-real init of the parameters this module owns directly: A = -(1..n), D = 1."""
        n = self.d_state
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=self.A_log.device))
                         .expand(self.d_inner, n))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, seq, hidden) -> (batch, seq, hidden). reset: optional bool (batch, seq) document starts."""
        if self.kernel_layout and mamba_kernel_path(self.impl, x, doc_reset=reset is not None):
            return self._forward_kernels(x, reset)
        xz = self.in_proj(x).transpose(1, 2)
        u, z = xz.chunk(2, dim=1)
        if reset is not None:  # no conv leakage across documents: zero the taps that reach back over a start
            u = causal_conv1d_doc_ref(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, reset)
        else:
            u = causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", self.impl)
        dt, B, C = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_layernorm(dt) @ self.dt_proj.weight.t()
        B, C = self.b_layernorm(B), self.c_layernorm(C)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(u, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True, impl=self.impl, reset=reset)
        return self.out_proj(y.transpose(1, 2))


    def _forward_kernels(self, x: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """The same function on the conv/scan kernels, laid out as mamba-ssm's own Mamba does: every (b, d, l)
        operand is a view of a (d, b*l) matrix, so the kernels get stride(-1) == 1 inputs and outputs (their
        outputs follow the input strides) and every projection is one GEMM, with no transposing copies of
        (b, d, l) activations forward or backward. With document starts (``reset``) the conv drops the taps that
        reach across a start (compiled) and the scan runs jambatrain's scan-with-reset kernel."""
        b, l, h = x.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        xz = weight_mm(self.in_proj, x.reshape(b * l, h).t())  # (2d, bl)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        u, z = (t.view(d, b, l).permute(1, 0, 2) for t in xz.chunk(2, dim=0))  # (b, d, l) views
        if reset is None:
            u = causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", self.impl)
        else:
            u = causal_conv1d_doc(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, reset, "silu",
                                  self.compile_elementwise)
        x_dbl = (self.x_proj.weight @ u.permute(1, 0, 2).reshape(d, b * l)).t().contiguous()  # (bl, r + 2n)
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        delta = (self.dt_proj.weight @ self.dt_layernorm(dt).t()).view(d, b, l).permute(1, 0, 2)
        B = self.b_layernorm(B).t().contiguous().view(n, b, l).permute(1, 0, 2)
        C = self.c_layernorm(C).t().contiguous().view(n, b, l).permute(1, 0, 2)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(u, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True, impl=self.impl, reset=reset)  # (b, d, l) in z's layout
        out = weight_mm(self.out_proj, y.permute(1, 0, 2).reshape(d, b * l))  # (h, bl)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias[:, None].to(out.dtype)
        return out.t().view(b, l, h)  # a transposed view: the residual add reads it, backward needs no copy


@torch.no_grad()
def init_dt_proj(dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's dt init: weight U(-r^-0.5, r^-0.5) for dt rank r; bias = softplus^-1(dt), dt log-uniform in
    [dt_min, dt_max], so softplus(dt_proj(.) + bias) starts in that range."""
    std = dt_proj.in_features ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features, device=dt_proj.bias.device) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=1e-4)
    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
