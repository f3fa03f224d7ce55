"""Elementwise tails fused by ``torch.compile`` on CUDA, each beside its eager reference.

The reference function is what runs on CPU and what the compiled twin is tested against (``tests/test_gpu.py``).
Inductor turns ``silu(g) * u`` into one kernel forward and one backward (eager: 2 forward, 3 backward, each a full
pass over a tokens x ffn tensor), and the fp32 cross-entropy of bf16 logits into an online-softmax reduction
that never writes the fp32 copy of the (tokens x vocab) logits (4 GiB at 16k tokens and a 65k vocab), forward
or backward. Only these small functions are compiled: the CUDA kernels around them (GEMMs, scan, conv,
attention) stay as they are, and nothing is traced through DeepSpeed's hooks.

``model.compile_elementwise=false`` keeps the eager expressions everywhere. The first call per shape compiles
(seconds); Inductor's on-disk cache makes later runs start faster.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def cross_entropy_sum_ref(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of (tokens, vocab) logits; labels == -100 are ignored."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


_compiled: dict[Callable, Callable] = {}


def raise_recompile_limits(per_function: int, accumulated: int | None = None) -> None:
    """Let dynamo keep at least ``per_function`` graphs per compiled function (and ``accumulated`` in all, when
    given) before it falls back to eager: one compiled function serves many shapes and layouts. Never lowers."""
    dyn = torch._dynamo.config
    limits = {"recompile_limit": per_function, "cache_size_limit": per_function}
    if accumulated is not None:
        limits.update(accumulated_recompile_limit=accumulated, accumulated_cache_size_limit=accumulated)
    for k, v in limits.items():
        if hasattr(dyn, k):
            setattr(dyn, k, max(getattr(dyn, k), v))


def maybe_compiled(fn: Callable, compiled: bool) -> Callable:
    """``fn`` itself, or its compiled twin (built once per process) when ``compiled``; ``fn`` inside a region
    being compiled already (``model.compile_blocks``), which traces it into its own graph."""
    if not compiled or torch.compiler.is_compiling():
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def silu_mul(g: torch.Tensor, u: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    return maybe_compiled(silu_mul_ref, compiled and g.is_cuda)(g, u)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    return maybe_compiled(cross_entropy_sum_ref, compiled and logits.is_cuda)(logits, labels)


def activation(compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The SwiGLU product ``(g, u) -> silu(g) * u`` the FFNs and expert backends call."""
    return silu_mul if compiled else silu_mul_ref
