"""DeepSpeed engine from the Hydra config. The DeepSpeed JSON is generated here, never hand-written."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from ..optim import build_optimizer, build_scheduler, param_groups
from . import ds_compat
from .distributed import DistInfo
from .expert_parallel import ExpertParallel, split_param_groups


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.parallel.precision != "auto":
        return cfg.parallel.precision
    return "bf16" if device.type == "cuda" else "fp32"


def build_deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict:
    par = cfg.parallel
    precision = resolve_precision(cfg, device)
    zero: dict = {"stage": par.zero_stage}
    if par.zero_stage >= 1:
        zero.update(overlap_comm=device.type == "cuda", contiguous_gradients=True,
                    reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    if par.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=int(1e5), stage3_max_live_parameters=int(1e9),
                    stage3_prefetch_bucket_size=int(5e8), stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": par.micro_batch_size,
        "gradient_accumulation_steps": par.grad_accum_steps,
        # DeepSpeed's data-parallel group is the whole world (dp x cp: ZeRO shards and averages over every rank,
        # parallel/parallel_dims.py), so it counts world_size micro batches per micro step; the global batch in
        # sequences is ParallelDims.global_batch (a cp group shares its sequences)
        "train_batch_size": par.micro_batch_size * par.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: TrainConfig, dist: DistInfo, ds_config: dict,
                 ep: ExpertParallel | None = None):
    """Wrap the model with DeepSpeed (ZeRO, bf16 with fp32 master weights, clipping, grad accumulation); with
    expert parallelism the expert parameters get optimizer groups of their own (reduced over their EDP group)."""
    import deepspeed

    groups = param_groups(model, cfg.optim.weight_decay)
    if ep is not None:
        groups = split_param_groups(groups)
    optimizer = build_optimizer(groups, cfg.optim, fused=dist.device.type == "cuda")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.trainer.max_steps),
    )
    ds_compat.drop_construction_step(engine)  # ZeRO-0 bf16 starts as every other stage does
    return engine
