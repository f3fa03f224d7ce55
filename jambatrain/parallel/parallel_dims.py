"""The parallel layout of a run: one object owns every mesh axis (data, context, expert) and its process groups.

    world = dp x cp            rank = dp_rank * cp + cp_rank

* **cp** (context parallel, ``parallel.context_parallel_size``): the ranks of one cp group hold one sequence split
  into ``cp`` contiguous slices. cp groups are **consecutive ranks** ([0..cp-1], [cp..2cp-1], ...), so a sequence's
  shards sit on neighbouring GPUs of one node (the mixers exchange activations every layer: all-to-all, NVLink).
* **dp** (data parallel) = world / cp: the ranks with the same ``cp_rank`` see different samples. The loader is
  asked for ``dp_rank`` of ``dp``; the ranks of one cp group get the same samples and each keeps its slice.
* **ep** (expert parallel): groups of ``ep`` consecutive ranks over the whole world (DeepSpeed's
  ``_create_expert_and_data_parallel``, ``expert_parallel.create_groups``); MoE/FFN layers are token-local, so an EP
  group may hold ranks of one cp group, of several, or of several dp replicas ("parallel folding", Megatron);
  the expert-data-parallel (EDP) group is the world/ep ranks with the same EP rank.
* **ZeRO** sees every rank as a replica: its data-parallel group is the whole world = dp x cp. Parameters are
  replicated over dp x cp, so ZeRO-1/2 shard the optimizer state and gradients over all world ranks and reduce
  gradients over them (expert parameters over their EDP group), dividing by the world size. The loss each rank
  backpropagates is its sequence's whole loss (``context_parallel.cp_sum``: forward all-reduce over the cp group,
  backward all-reduce of the gradient), so each rank's gradient is cp x its share, and the world average is the
  mean over the dp replicas of each sequence's gradient (see ``context_parallel``'s docstring).

Modules take what they need from here (the loader dp rank/size, the global batch, tokens per step, the cp and EP
groups) instead of reading the world size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as tdist


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    cp: int = 1
    ep: int = 1
    cp_group: object = None  # this rank's cp group (None at cp = 1)
    ep_state: object = None  # expert_parallel.ExpertParallel (None at ep = 1)

    @property
    def dp(self) -> int:
        return self.world_size // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    def cp_ranks(self) -> list[int]:
        """Global ranks of this rank's cp group (consecutive)."""
        lo = self.dp_rank * self.cp
        return list(range(lo, lo + self.cp))

    def global_batch(self, micro_batch_size: int, grad_accum_steps: int) -> int:
        """Sequences per optimizer step: one per dp replica per micro batch (a cp group shares its sequences)."""
        return micro_batch_size * grad_accum_steps * self.dp

    def describe(self) -> str:
        return f"world {self.world_size} = dp {self.dp} x cp {self.cp}, ep {self.ep}"

    @staticmethod
    def problems(world_size: int, cp: int, ep: int, seq_len: int | None, num_heads: int, num_kv_heads: int,
                 has_attention: bool) -> list[str]:
        """Every rule the (world, cp, ep) layout breaks, each naming the fix."""
        p = []
        if cp < 1 or world_size % cp:
            fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
            p.append(f"parallel.context_parallel_size={cp} must divide the world size ({world_size} ranks): choose "
                     f"one of {fits}")
            return p
        if seq_len is not None and seq_len % cp:
            p.append(f"parallel.context_parallel_size={cp} must divide data.seq_len={seq_len} (each rank holds "
                     f"seq_len / cp tokens): choose a cp dividing {seq_len}, or a data.seq_len divisible by {cp}")
        if cp > 1 and has_attention:
            # Ulysses: the ranks split the query heads; the KV heads are split too (cp <= KV heads, cp | KV heads)
            # or each rank gets one replicated KV head (KV heads | cp)
            if num_heads % cp or not (num_kv_heads % cp == 0 or cp % num_kv_heads == 0):
                ok = [d for d in range(2, num_heads + 1) if num_heads % d == 0
                      and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
                p.append(f"parallel.context_parallel_size={cp} cannot split the attention heads (model."
                         f"num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}): cp must divide the "
                         f"query heads and divide or be a multiple of the KV heads; choose cp in {ok or [1]}")
        return p


def build(world_size: int, rank: int, cp: int, ep: int = 1, ep_state=None) -> ParallelDims:
    """The layout, with the cp process groups created (every rank creates every group, as torch requires; call
    once, after the default process group exists and before the model is built)."""
    dims = ParallelDims(world_size, rank, cp, ep, ep_state=ep_state)
    if cp > 1:
        for lo in range(0, world_size, cp):
            g = tdist.new_group(list(range(lo, lo + cp)))
            if lo == dims.dp_rank * cp:
                dims.cp_group = g
    return dims
