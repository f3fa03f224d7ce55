"""Small building blocks shared by the mixers and FFNs: the linear factory, RMSNorm, SwiGLU MLP, rotary embedding."""
from __future__ import annotations

import torch
import torch.nn as nn

from .fused_ops import silu_mul
from .ssm_ops import fused_rms_norm


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """Every projection of the model is built here (never ``nn.Linear`` directly): the one place a precision
    converter applied after the model is built (``jambatrain.quantization.float8``) and the parameter init look
    for. A plain ``nn.Linear``; the converter swaps the selected ones for torchao's ``Float8Linear``."""
    return nn.Linear(in_features, out_features, bias=bias)


def weight_mm(proj: nn.Linear, x_t: torch.Tensor) -> torch.Tensor:
    """``proj.weight @ x_t``, (out_features, n), for callers that keep activations as (features, tokens)
    matrices (the Mamba kernel layout): the same GEMM as ``proj(x_t.t()).t()`` without the transposing copy. A
    projection the FP8 converter swapped runs this GEMM through its own float8 matmul (same scaling, operands in
    the other order); a plain one is one bf16 GEMM."""
    if type(proj) is not nn.Linear:
        from ..quantization.float8 import float8_weight_mm

        return float8_weight_mm(proj, x_t)
    return proj.weight @ x_t


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (as HF ``JambaRMSNorm``). With ``fused`` (``model.fused_rms_norm``)
    it runs on CUDA as one fused Triton kernel each way when mamba-ssm imports (``ssm_ops.fused_rms_norm``);
    ``fused=False`` keeps the eager ops (the A/B of bench/throughput.py). Inside a compiled region
    (``model.compile_blocks``) the eager formula runs: Inductor fuses it with the ops around it (an FP8 cast)."""

    def __init__(self, dim: int, eps: float = 1e-6, fused: bool = True):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda and not torch.compiler.is_compiling():
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
        self.gate_proj = linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = linear(intermediate_size, hidden_size, bias=False)

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
