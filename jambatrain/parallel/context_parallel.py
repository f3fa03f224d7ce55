"""Context parallelism (cp): one sequence split into ``cp`` contiguous slices over the ranks of a cp group.

Applied after the model is built (``apply(model, dims)``): it hands the cp group to the Mamba mixers, the attention
layers, the MoE routers and the LM loss; at cp = 1 nothing is set and the model runs exactly its single-GPU code.
Every rank feeds the model its slice [r*L/cp, (r+1)*L/cp) of the input ids, labels and document starts
(``shard_batch``).

Per layer (design and alternatives: docs/design.md, "Context parallelism"):
* **Mamba-1** (``models/mamba.py``): in_proj, the depthwise conv (with the last d_conv-1 pre-conv tokens of the
  previous rank as a halo; zeros on rank 0), x_proj, dt_proj and the dt/B/C norms run on the slice; x, delta and z
  go all-to-all from [L/cp, d_inner] to [L, d_inner/cp]; B, C and the document starts are all-gathered; the
  unchanged scan (mamba-ssm, the scan-reset kernel, or the reference) runs the whole sequence for d_inner/cp
  channels with their slices of A, D and the dt bias (Mamba-1 channels are independent through the scan); y goes
  all-to-all back; out_proj on the slice. Document resets are positions in the gathered sequence, so a document
  that starts or ends on another rank resets exactly where it would on one GPU; the conv halo carries the previous
  rank's document starts too.
* **Attention** (``models/attention.py``, Ulysses): q, k, v all-to-all from [L/cp, heads] to [L, heads/cp];
  attention over the whole sequence with its causal and document masks and RoPE at global positions; all-to-all
  back. KV heads are split while cp divides them, replicated (each rank one) when they divide cp.
* **MoE / FFN**: token-local; the router's load-balancing statistics and z-loss are summed over the cp group so the
  aux losses are those of the whole sequence.
* **Loss**: the cross-entropy sum and the label count of the slice are summed over the cp group (``cp_sum``): every
  rank holds the loss of the whole sequences (the true loss, logged as is).

Gradients. Every collective here is differentiated as what it is (all-to-all: the reverse all-to-all; all-gather:
reduce-scatter of the summed gradients; all-reduce: all-reduce), so each rank's backward of its loss gives
d(sum over the ranks' losses)/d(its parameter copy). The cp ranks of a replica hold the same loss L, so that is
cp x d L / d(copy); DeepSpeed sums over all world = dp x cp ranks and divides by the world size, which leaves the
mean over the dp replicas of dL/dtheta: the data-parallel gradient. (DeepSpeed's Ulysses registers a sequence-
parallel group instead and divides by world/sp, with a loss whose backward does not reduce: the same arithmetic.
We keep DeepSpeed's data-parallel group = the world, so ZeRO shards over dp x cp with no DeepSpeed group plumbing,
and expert parallelism composes unchanged.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class CPGroup:
    group: object
    rank: int
    size: int


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def cp_sum(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """Sum over the cp group; backward all-reduces the gradient (each rank's loss depends on every rank's term)."""
    return _AllReduceSum.apply(x, cp.group)


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 of a (cp, ...) tensor; its own inverse, so also its backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_channels(t: torch.Tensor, cp: CPGroup, dim: int) -> torch.Tensor:
    """(..., C at ``dim``, ..., L/cp last) -> (..., C/cp, ..., L): this rank's channel slice of the whole sequence."""
    n = cp.size
    shape = list(t.shape)
    c = shape[dim]
    # (..., n, C/n, ..., Lc) with the split axis moved to the front
    t = t.reshape(shape[:dim] + [n, c // n] + shape[dim + 1:]).movedim(dim, 0)
    t = _AllToAll.apply(t, cp.group)  # [r] = rank r's sequence slice of my channels
    t = t.movedim(0, -2)  # (..., C/n, ..., n, Lc)
    return t.reshape(t.shape[:-2] + (n * t.shape[-1],))


def channels_to_seq(t: torch.Tensor, cp: CPGroup, dim: int) -> torch.Tensor:
    """The inverse of ``seq_to_channels``: (..., C/cp, ..., L) -> (..., C, ..., L/cp)."""
    n = cp.size
    t = t.reshape(t.shape[:-1] + (n, t.shape[-1] // n)).movedim(-2, 0)  # (n, ..., C/n, ..., Lc)
    t = _AllToAll.apply(t, cp.group)  # [r] = channel slice r of my sequence slice
    t = t.movedim(0, dim)  # (..., n, C/n, ..., Lc)
    return t.reshape(t.shape[:dim] + (t.shape[dim] * t.shape[dim + 1],) + t.shape[dim + 2:])


def _gather(x: torch.Tensor, group, n: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _GatherSeq(torch.autograd.Function):
    """All-gather along the last dim; backward: the sum over ranks of the gradient of my slice (reduce-scatter,
    written as an all-to-all + sum so gloo runs it too)."""

    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n = group, n
        return _gather(x, group, n)

    @staticmethod
    def backward(ctx, grad):
        n = ctx.n
        g = grad.reshape(grad.shape[:-1] + (n, grad.shape[-1] // n)).movedim(-2, 0).contiguous()
        out = torch.empty_like(g)
        dist.all_to_all_single(out, g, group=ctx.group)
        return out.sum(0), None, None


def gather_seq(t: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """(..., L/cp) -> (..., L), differentiable."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        return _gather(t, cp.group, cp.size)
    return _GatherSeq.apply(t, cp.group, cp.size)


class _PreviousTail(torch.autograd.Function):
    """Forward: the previous rank's tail (zeros on rank 0), from one all-gather of the (small) tails. Backward: the
    halo's gradient goes back to the rank it came from (one all-gather of the halo gradients; the last rank's
    tail gets none). A Function of its own, so every rank runs the same collectives in backward, rank 0 included."""

    @staticmethod
    def forward(ctx, tail, group, rank, n):
        ctx.group, ctx.rank, ctx.n = group, rank, n
        w = tail.shape[-1]
        tails = _gather(tail, group, n)
        return torch.zeros_like(tail) if rank == 0 else tails[..., (rank - 1) * w:rank * w].contiguous()

    @staticmethod
    def backward(ctx, grad):
        w = grad.shape[-1]
        grads = _gather(grad, ctx.group, ctx.n)  # [r] = the gradient of rank r's halo = of rank r-1's tail
        nxt = ctx.rank + 1
        out = torch.zeros_like(grad) if nxt == ctx.n else grads[..., nxt * w:(nxt + 1) * w].contiguous()
        return out, None, None, None


def previous_tail(t: torch.Tensor, width: int, cp: CPGroup) -> torch.Tensor:
    """The last ``width`` positions (last dim) of the previous rank's ``t``; zeros on rank 0 (the conv halo).
    Differentiable: the gradient of the halo flows back to the previous rank's tail."""
    tail = t[..., -width:]
    if not (tail.requires_grad and torch.is_grad_enabled()):
        return _PreviousTail.forward(_NoCtx(), tail, cp.group, cp.rank, cp.size)
    return _PreviousTail.apply(tail, cp.group, cp.rank, cp.size)


class _NoCtx:
    """The ctx of a Function's forward called directly (no autograd)."""


def local_slice(t: torch.Tensor, cp: CPGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of a whole-sequence tensor along ``dim``."""
    n = t.shape[dim] // cp.size
    return t.narrow(dim, cp.rank * n, n).contiguous()


def shard_batch(batch: dict, cp: CPGroup) -> dict:
    """The cp rank's slice of a whole-sequence batch (``input_ids``, ``labels``, ``doc_starts``: (batch, seq))."""
    return {k: (local_slice(v, cp) if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in batch.items()}


def group_of(dims) -> CPGroup:
    """This rank's cp group (``dims``: a ``ParallelDims`` with cp > 1)."""
    return CPGroup(dims.cp_group, dims.cp_rank, dims.cp)


def shard_batches(batches, dims, data_cfg, device):
    """The trainer's batches under cp: every rank of a cp group reads the same whole-sequence batch (the loader is
    asked for the dp rank of dp ranks) and keeps its slice of input ids, labels and document starts (found on the
    whole sequence: a start at the first token of a slice comes from the EOS on the previous slice)."""
    from ..data.sources import doc_starts

    cp = group_of(dims)
    pin = device.type == "cuda"  # the slices are new host tensors: pinned, so the copies stay asynchronous
    for batch in batches:
        starts = doc_starts(batch, data_cfg, device)
        ids, labels = local_slice(batch["input_ids"], cp), local_slice(batch["labels"], cp)
        yield {"input_ids": ids.pin_memory() if pin else ids, "labels": labels.pin_memory() if pin else labels,
               "doc_starts": None if starts is None else local_slice(starts, cp)}


def apply(model: nn.Module, dims) -> int:
    """Give the model's cp-aware modules this rank's cp group (``dims``: a ``ParallelDims``); a no-op at cp = 1.
    Returns the number of modules set."""
    if not dims.cp_enabled:
        return 0
    cp = group_of(dims)
    n = 0
    for m in model.modules():
        if hasattr(m, "cp_group"):
            m.cp_group = cp
            n += 1
    return n
