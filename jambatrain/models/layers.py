"""Small building blocks shared by the mixers and FFNs: RMSNorm, SwiGLU MLP, rotary embedding."""
from __future__ import annotations

import torch
import torch.nn as nn

from .fused_ops import silu_mul
from .ssm_ops import fused_rms_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (as HF ``JambaRMSNorm``). With ``fused`` (``model.fused_rms_norm``)
    it runs on CUDA as one fused Triton kernel each way when mamba-ssm imports (``ssm_ops.fused_rms_norm``);
    ``fused=False`` keeps the eager ops (the A/B of bench/throughput.py)."""

    def __init__(self, dim: int, eps: float = 1e-6, fused: bool = True):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda:
            y = fused_rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, compile_elementwise: bool = True):
        super().__init__()
        self.compile_elementwise = compile_elementwise
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), self.compile_elementwise))


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype=torch.float32):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/HF convention) on (batch, heads, seq, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
