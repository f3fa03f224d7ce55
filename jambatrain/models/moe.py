"""Mixture-of-experts FFN: top-k softmax router + dropless SwiGLU experts.

Router convention (HF ``JambaSparseMoeBlock``): softmax over all experts, keep the top-k probabilities
without renormalising them. Losses, per MoE layer (the trainer averages over layers):
  load balancing (Switch / Megatron): aux = E * sum_e f_e * P_e, f_e = share of the T*k assignments that
    went to expert e, P_e = mean router probability of e; equals 1.0 when routing is uniform.
  router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
Expert weights are stacked (E, ffn, hidden) tensors, the layout MegaBlocks' grouped dMoE uses, so the
native and MegaBlocks backends share one parameter set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ModelConfig
from .fused_ops import activation, silu_mul_ref


@dataclass
class Routing:
    weights: torch.Tensor  # (T, k) fp32 probabilities of the chosen experts
    experts: torch.Tensor  # (T, k) int64 expert ids
    aux_loss: torch.Tensor  # scalar load-balancing loss
    z_loss: torch.Tensor  # scalar router z-loss
    counts: torch.Tensor  # (E,) assignments per expert, for load metrics


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """logits: (T, E) router outputs."""
    T, E = logits.shape
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    counts = torch.bincount(experts.flatten(), minlength=E)
    f = counts.to(probs.dtype) / (T * top_k)
    aux = E * torch.sum(f * probs.mean(dim=0))
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return Routing(weights, experts, aux, z, counts)


def experts_forward_native(x: torch.Tensor, routing: Routing, w_gate, w_up, w_down, act=silu_mul_ref) -> torch.Tensor:
    """Dropless: sort the T*k assignments by expert, run each expert on exactly its tokens, scatter back."""
    T, k = routing.experts.shape
    flat_experts = routing.experts.flatten()
    order = torch.argsort(flat_experts, stable=True)
    token_of = order // k  # source token of each sorted assignment
    counts = routing.counts.tolist()
    xs = x[token_of]
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c:
            xe = xs[start:start + c]
            h = act(xe @ w_gate[e].t(), xe @ w_up[e].t())
            outs.append(h @ w_down[e])
        start += c
    y_sorted = torch.cat(outs, dim=0) * routing.weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, y_sorted)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.impl = cfg.moe_impl
        self.act = activation(cfg.compile_elementwise)
        self.router = nn.Linear(h, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, f, h))
        self.w_up = nn.Parameter(torch.empty(E, f, h))
        self.w_down = nn.Parameter(torch.empty(E, f, h))  # y = act @ w_down[e]
        self.last_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = route(self.router(x), self.top_k)
        self.last_counts = routing.counts.detach()
        y = experts_forward(x, routing, self)
        return y.view(shape), routing


def experts_forward(x, routing: Routing, moe: MoE) -> torch.Tensor:
    """Backend dispatch point: the native loop here; GPU backends (grouped GEMM, MegaBlocks) in ``moe_backends``."""
    from . import moe_backends

    fn = moe_backends.select(moe.impl, x, moe.w_gate)
    return fn(x, routing, moe.w_gate, moe.w_up, moe.w_down, moe.act)
