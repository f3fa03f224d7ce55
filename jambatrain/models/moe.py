"""Mixture-of-experts FFN: top-k softmax router + dropless SwiGLU experts.

Router convention (HF ``JambaSparseMoeBlock``): softmax over all experts, keep the top-k probabilities
without renormalising them. Losses, per MoE layer (the trainer averages over layers):
  load balancing (Switch / Megatron): aux = E * sum_e f_e * P_e, f_e = share of the T*k assignments that
    went to expert e, P_e = mean router probability of e; equals 1.0 when routing is uniform.
  router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
Expert weights are stacked (E, ffn, hidden) tensors, the layout MegaBlocks' grouped dMoE uses, so the
native and MegaBlocks backends share one parameter set. Under expert parallelism
(``jambatrain.parallel.expert_parallel.apply``) a layer holds only the experts ``expert_range`` of that stack and
``exchange`` sends each token's rows to the rank that owns its expert; at ep = 1 both are unset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import moe_backends
from .config import ModelConfig
from .fused_ops import activation
from .layers import linear


@dataclass
class Routing:
    weights: torch.Tensor  # (T, k) fp32 probabilities of the chosen experts
    experts: torch.Tensor  # (T, k) int64 expert ids
    aux_loss: torch.Tensor  # scalar load-balancing loss
    z_loss: torch.Tensor  # scalar router z-loss
    counts: torch.Tensor  # (E,) assignments per expert, for load metrics


def route(logits: torch.Tensor, top_k: int, cp=None) -> Routing:
    """logits: (T, E) router outputs. cp: a context_parallel.CPGroup: the losses' statistics are summed over the cp
    group, so they are those of the whole sequences (the rank's routing stays its own)."""
    T, E = logits.shape
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    counts = torch.bincount(experts.flatten(), minlength=E)
    if cp is None:
        f = counts.to(probs.dtype) / (T * top_k)
        aux = E * torch.sum(f * probs.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    else:
        from ..parallel.context_parallel import cp_sum

        tokens = T * cp.size
        f = cp_sum(counts.to(probs.dtype), cp) / (tokens * top_k)
        aux = E * torch.sum(f * (cp_sum(probs.sum(dim=0), cp) / tokens))
        z = cp_sum(torch.logsumexp(logits, dim=-1).pow(2).sum(), cp) / tokens
    return Routing(weights, experts, aux, z, counts)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.impl = cfg.moe_impl
        self.act = activation(cfg.compile_elementwise)
        self.router = linear(h, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, f, h))
        self.w_up = nn.Parameter(torch.empty(E, f, h))
        self.w_down = nn.Parameter(torch.empty(E, f, h))  # y = act @ w_down[e]
        self.expert_range = (0, E)  # global ids [lo, hi) of the experts this rank holds
        self.fp8 = False  # experts in FP8 grouped GEMMs: set by the FP8 converter (jambatrain/quantization/float8.py)
        self.exchange = None  # expert parallelism: callable(rows, tokens_per_expert, expert_mlp) -> rows
        self.last_counts: torch.Tensor | None = None
        self.cp_group = None  # context parallelism (context_parallel.apply): aux / z losses over the whole sequence

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = route(self.router(x), self.top_k, self.cp_group)
        self.last_counts = routing.counts.detach()
        backend = moe_backends.select(self.impl, x, self.w_gate, self.fp8)
        y = backend(x, routing, self.w_gate, self.w_up, self.w_down, self.act, exchange=self.exchange)
        return y.view(shape), routing

    @torch.no_grad()
    def init_experts(self, std: float, out_std: float) -> None:
        """Normal init of the whole (E, ffn, hidden) stack, of which this rank keeps ``expert_range``: the same
        weights for every expert-parallel size (and the same random stream as without it)."""
        lo, hi = self.expert_range
        for w, s in ((self.w_gate, std), (self.w_up, std), (self.w_down, out_std)):
            full = torch.empty((self.num_experts,) + tuple(w.shape[1:]), device=w.device, dtype=w.dtype)
            w.copy_(nn.init.normal_(full, 0.0, s)[lo:hi])
