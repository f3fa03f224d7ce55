"""Expert parallelism (EP) for the stacked-expert MoE layers, under DeepSpeed ZeRO-0/1/2.

With ``parallel.expert_parallel_size = ep`` the world is cut into groups of ``ep`` consecutive ranks (EP groups;
consecutive so that an EP group sits inside a node when ep <= GPUs per node). EP rank ``i`` of a group holds the
experts [i*E/ep, (i+1)*E/ep) of every MoE layer; ranks with the same EP rank form an expert-data-parallel (EDP)
group of world/ep ranks that hold the same experts. Dense parameters (router included) stay replicated over all
ranks.

Forward of one MoE layer on one rank (``exchange``):
  1. the backend's ``permute`` groups this rank's T*k assignments by expert, which is also by owner rank;
  2. all-to-all of the (E,) token counts, then one device->host copy of the split sizes (as MegaBlocks and
     torchtitan do);
  3. all-to-all of the rows (autograd: its backward is the reverse all-to-all);
  4. received rows regrouped from sender-major to local-expert-major, the backend's ``expert_mlp`` on the local
     (E/ep, ffn, hidden) block, regrouped back;
  5. all-to-all of the results back to their senders; the backend's ``unpermute`` weights them by the router and
     sums the k slots.
ep = 1 never reaches this module: the layer runs ``unpermute(expert_mlp(permute(x)))`` on all experts.

Gradients: DeepSpeed marks a parameter as an expert parameter by ``allreduce = False`` and ``group_name``
(``deepspeed/moe/utils.py``); ZeRO then reduces (and shards) it over the EDP group only, dense ones over all
ranks, and divides every gradient by the full data-parallel size. Each rank's loss is the mean over its own
tokens, so what every rank applies is the gradient of the global-mean loss, for dense and expert parameters
alike (checked against one process in tests/test_expert_parallel.py). The engine turns its MoE handling on only
for modules that are instances of ``deepspeed.moe.layer.MoE``; ``apply`` makes each layer one (a marker base
class whose ``__init__`` is never run). DeepSpeed's own MoE checkpoint cannot save stacked experts (see
docs/design.md): jambatrain's checkpoint (``jambatrain/checkpoint.py``) saves experts by global id.
ZeRO-3 is refused with ep > 1: DeepSpeed 0.19 does not run native MoE layers under ZeRO-3.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from . import ds_compat


@dataclass
class ExpertParallel:
    size: int  # ep
    rank: int  # this rank's index in its EP group: it holds experts [rank*E/ep, (rank+1)*E/ep)
    group: object  # the EP group (all-to-all)
    edp_group: object  # the ranks holding the same experts (gradient reduction, ZeRO sharding)
    edp_rank: int
    group_name: str  # DeepSpeed's key of these groups, "ep_size_{ep}"


def create_groups(ep: int) -> ExpertParallel:
    """EP and EDP process groups, registered with DeepSpeed's group registry (where its ZeRO optimizer looks them
    up by ``group_name``). Call once, after ``init_distributed`` and before the model is built."""
    g = ds_compat.expert_groups(ep)  # DeepSpeed's private group registry
    return ExpertParallel(size=ep, rank=g["rank"], group=g["group"], edp_group=g["edp_group"], edp_rank=g["edp_rank"],
                          group_name=g["name"])


class _AllToAll(torch.autograd.Function):
    """Rows split by ``in_splits`` sent to the ranks of ``group``; ``out_splits`` rows received from each."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits, group)
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExchangeStats:
    """Rows this rank's experts received in the last forward of one layer (for the load metrics); host ints,
    read from the split sizes the exchange synced anyway."""

    def __init__(self):
        self.received = 0


def exchange(rows: torch.Tensor, tokens_per_expert: torch.Tensor, expert_mlp, *, ep: ExpertParallel,
             stats: ExchangeStats | None = None) -> torch.Tensor:
    """Rows grouped by global expert id -> the results of their experts, same order; see the module docstring.
    ``expert_mlp(rows, tokens_per_expert, counts)`` runs the local experts on rows grouped by local expert."""
    n = ep.size
    local = tokens_per_expert.shape[0] // n
    send_counts = tokens_per_expert.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)  # (n senders, local experts) after the exchange
    dist.all_to_all_single(recv_counts, send_counts, group=ep.group)
    host = torch.cat([send_counts, recv_counts]).tolist()  # the one device->host sync of the layer
    send, recv = host[:n * local], host[n * local:]
    send_splits = [sum(send[i * local:(i + 1) * local]) for i in range(n)]
    recv_splits = [sum(recv[i * local:(i + 1) * local]) for i in range(n)]
    local_counts = [sum(recv[i * local + e] for i in range(n)) for e in range(local)]
    if stats is not None:
        stats.received = sum(recv_splits)
    received = all_to_all(rows, recv_splits, send_splits, ep.group)  # sender-major, then local expert
    # regroup sender-major -> expert-major: a stable sort of the rows by their local expert id
    expert_of_row = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(n),
                                            recv_counts.to(rows.device))
    perm = torch.argsort(expert_of_row, stable=True)
    out = expert_mlp(received.index_select(0, perm), recv_counts.view(n, local).sum(0), local_counts)
    out = out.index_select(0, torch.argsort(perm))  # back to sender-major
    return all_to_all(out, send_splits, recv_splits, ep.group)


def apply(model: nn.Module, ep: ExpertParallel) -> int:
    """Shard every MoE layer of ``model`` by expert: keep this rank's E/ep experts of each stacked weight (meta
    tensors stay meta, so this runs before the model is materialised), mark them as expert parameters for
    DeepSpeed, and route the layer's experts through ``exchange``. Returns the number of layers sharded.
    Materialising a meta model makes new parameter objects: call ``mark_expert_params`` after it."""
    from ..models.moe import MoE

    layers = 0
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        E = module.num_experts
        if E % ep.size:
            raise ValueError(f"model.num_experts={E} is not divisible by parallel.expert_parallel_size={ep.size}")
        local = E // ep.size
        lo, hi = ep.rank * local, (ep.rank + 1) * local
        for name in ("w_gate", "w_up", "w_down"):
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(old.detach()[lo:hi].clone(), requires_grad=old.requires_grad))
        module.expert_range = (lo, hi)
        module.ep_stats = ExchangeStats()
        module.exchange = functools.partial(exchange, ep=ep, stats=module.ep_stats)
        ds_compat.mark_as_deepspeed_moe(module, ep.size, local, ep.group_name)  # the engine's MoE handling on
        layers += 1
    mark_expert_params(model, ep)
    return layers


def mark_expert_params(model: nn.Module, ep: ExpertParallel) -> None:
    """Flag the expert weights of the sharded layers the way DeepSpeed's ZeRO recognises them: ``allreduce =
    False`` (an expert parameter) and ``group_name`` (reduced and sharded over this EDP group only)."""
    for module in model.modules():
        if getattr(module, "exchange", None) is not None:
            for name in ("w_gate", "w_up", "w_down"):
                p = getattr(module, name)
                p.allreduce = False
                p.group_name = ep.group_name


def split_param_groups(groups: list[dict]) -> list[dict]:
    """DeepSpeed keeps a client optimizer's groups as they are: expert parameters must sit in groups of their own,
    flagged ``moe`` and named after their EDP group, which DeepSpeed's splitter builds from named groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)
