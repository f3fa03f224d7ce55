"""Jamba's Mamba-1 mixer: Mamba with RMSNorms on dt, B and C (Jamba paper, section 6.1; ``model.mamba_dt_bc_norm``
false leaves them out: plain Mamba-1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import RMSNorm, linear, weight_mm
from .ssm_ops import MambaPlan, causal_conv1d, causal_conv1d_doc, causal_conv1d_doc_ref, decide_mamba, selective_scan


def context_parallel():
    """jambatrain.parallel.context_parallel, imported when a cp group is set (jambatrain.parallel imports the config,
    which imports the models)."""
    from ..parallel import context_parallel as cpx

    return cpx


class MambaMixer(nn.Module):
    """Parameter names match HF ``JambaMambaMixer`` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj).

    ``forward`` is the mixer's math, written once; ``ssm_ops.decide_mamba`` plans how it runs (the layout of the
    projections, the conv and scan backends, context parallelism) and the forward executes that plan, recording it
    in ``last_plan`` (what the start-up report printed is what ran: tests/test_fast_paths.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, r = cfg.mamba_d_inner, cfg.mamba_d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.impl = cfg.mamba_impl
        # CUDA kernel path in the (d, batch*seq) layout (``_in_proj`` etc.); False: the generic layout (the A/B of
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
        # Jamba's inner norms (model.mamba_dt_bc_norm); Identity: plain Mamba-1 (no parameters)
        norm = (lambda dim: RMSNorm(dim, cfg.rms_norm_eps, cfg.fused_rms_norm)) if cfg.mamba_dt_bc_norm \
            else (lambda dim: nn.Identity())
        self.dt_layernorm, self.b_layernorm, self.c_layernorm = norm(r), norm(n), norm(n)
        self.cp_group = None  # a context_parallel.CPGroup, set by context_parallel.apply (None: cp = 1)
        self.last_plan: MambaPlan | None = None  # the plan the last forward executed

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba's S4D-real init of the parameters this module owns directly: A = -(1..n), D = 1."""
        n = self.d_state
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=self.A_log.device))
                         .expand(self.d_inner, n))
        self.D.fill_(1.0)

    def plan(self, device_type: str, doc_reset: bool) -> MambaPlan:
        return decide_mamba(self.impl, device_type, doc_reset, self.kernel_layout, self.compile_elementwise,
                            self.cp_group.size if self.cp_group is not None else 1)

    def forward(self, x: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, seq, hidden) -> (batch, seq, hidden). reset: optional bool (batch, seq) document starts.
        Under context parallelism x is this rank's slice of the sequence and ``reset`` the whole sequence's starts
        (``JambaLM`` gathers them once)."""
        plan = self.start(x, reset)
        kl = plan.layout == "kernel"
        u, z = self._in_proj(x, kl)  # (b, d, l) each
        return self._out_proj(self.mix(u, z, reset, plan), kl)

    def start(self, x: torch.Tensor, reset: torch.Tensor | None) -> MambaPlan:
        """The plan this forward executes (recorded in ``last_plan``), refused when it cannot run."""
        plan = self.plan(x.device.type, reset is not None)
        if plan.error:
            raise RuntimeError(plan.error)
        self.last_plan = plan
        return plan

    def mix(self, u: torch.Tensor, z: torch.Tensor, reset: torch.Tensor | None, plan: MambaPlan) -> torch.Tensor:
        """Between the projections: conv, x_proj / dt_proj and the scan, (b, d, l) -> y (b, d, l). The custom
        kernels are here, so ``compiled_blocks`` compiles the projections on either side and leaves this eager."""
        cp = self.cp_group
        cpx = context_parallel() if cp is not None else None
        kl = plan.layout == "kernel"
        u = self._conv(u, reset, plan.conv, cp)
        delta, B, C = self._x_proj(u, kl)  # (b, d, l), (b, n, l), (b, n, l)
        A, D, delta_bias = -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()
        if cp is not None:  # channel layout for the scan: the whole sequence, d_inner / cp channels
            u, delta, z = (cpx.seq_to_channels(t, cp, dim=1) for t in (u, delta, z))
            B, C = cpx.gather_seq(B, cp), cpx.gather_seq(C, cp)
            c = self.d_inner // cp.size
            A, D, delta_bias = (t[cp.rank * c:(cp.rank + 1) * c] for t in (A, D, delta_bias))
        y = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                           backend=plan.scan, reset=reset)  # (b, d, l)
        if cp is not None:
            y = cpx.channels_to_seq(y, cp, dim=1)
        return y

    # The layouts. "kernel" lays every (b, d, l) operand out as a view of a (d, b*l) matrix, as mamba-ssm's own Mamba
    # does: the kernels get stride(-1) == 1 inputs and outputs (their outputs follow the input strides) and every
    # projection is one GEMM, with no transposing copies of (b, d, l) activations forward or backward. "generic":
    # nn.Linear on (b, l, .) and transposed views.

    def _in_proj(self, x: torch.Tensor, kernel_layout: bool):
        if not kernel_layout:
            return self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        b, l, h = x.shape
        xz = weight_mm(self.in_proj, x.reshape(b * l, h).t())  # (2d, bl)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        return tuple(t.view(self.d_inner, b, l).permute(1, 0, 2) for t in xz.chunk(2, dim=0))  # (b, d, l) views

    def _x_proj(self, u: torch.Tensor, kernel_layout: bool):
        """u (b, d, l) -> delta before its bias (b, d, l) and the normed B, C (b, n, l)."""
        r, n = self.dt_rank, self.d_state
        if not kernel_layout:
            dt, B, C = torch.split(self.x_proj(u.transpose(1, 2)), [r, n, n], dim=-1)
            delta = self.dt_layernorm(dt) @ self.dt_proj.weight.t()
            return delta.transpose(1, 2), self.b_layernorm(B).transpose(1, 2), self.c_layernorm(C).transpose(1, 2)
        b, d, l = u.shape
        x_dbl = (self.x_proj.weight @ u.permute(1, 0, 2).reshape(d, b * l)).t().contiguous()  # (bl, r + 2n)
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        delta = (self.dt_proj.weight @ self.dt_layernorm(dt).t()).view(d, b, l).permute(1, 0, 2)
        B = self.b_layernorm(B).t().contiguous().view(n, b, l).permute(1, 0, 2)
        C = self.c_layernorm(C).t().contiguous().view(n, b, l).permute(1, 0, 2)
        return delta, B, C

    def _out_proj(self, y: torch.Tensor, kernel_layout: bool) -> torch.Tensor:
        if not kernel_layout:
            return self.out_proj(y.transpose(1, 2))
        b, d, l = y.shape
        out = weight_mm(self.out_proj, y.permute(1, 0, 2).reshape(d, b * l))  # (h, bl)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias[:, None].to(out.dtype)
        return out.t().view(b, l, -1)  # a transposed view: the residual add reads it, backward needs no copy

    def _conv(self, u: torch.Tensor, reset: torch.Tensor | None, backend: str, cp) -> torch.Tensor:
        """The causal depthwise conv + SiLU by ``backend``; with document starts the taps that reach back over a
        start are dropped. Under cp the previous rank's last d_conv - 1 tokens (and their document starts) are
        prepended as a halo (zeros on rank 0, as the causal padding)."""
        w, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        halo = w.shape[-1] - 1
        if cp is not None:
            cpx = context_parallel()
            l = u.shape[-1]
            u = torch.cat([cpx.previous_tail(u, halo, cp), u], dim=-1)
            if reset is not None:
                lo = cp.rank * l
                reset = reset[:, lo - halo:lo + l] if lo else F.pad(reset[:, :l], (halo, 0), value=False)
        if backend == "doc-compiled":
            out = causal_conv1d_doc(u, w, bias, reset, "silu", compiled=True)
        elif backend == "doc-eager":
            out = causal_conv1d_doc_ref(u, w, bias, reset)
        else:
            out = causal_conv1d(u, w, bias, "silu", backend)
        return out[..., halo:] if cp is not None else out


@torch.no_grad()
def init_dt_proj(dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's dt init: weight U(-r^-0.5, r^-0.5) for dt rank r; bias = softplus^-1(dt), dt log-uniform in
    [dt_min, dt_max], so softplus(dt_proj(.) + bias) starts in that range."""
    std = dt_proj.in_features ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features, device=dt_proj.bias.device) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=1e-4)
    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
