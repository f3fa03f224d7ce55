"""Optimizer parameter groups and the learning-rate schedule (a pure function of the step)."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig

NO_DECAY_NAMES = ("A_log", "D", "bias")


def lr_at(step: int, opt: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``decay_steps``."""
    decay_steps = opt.decay_steps or max_steps
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    span = max(1, decay_steps - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    floor = opt.lr * opt.min_lr_ratio
    return floor + 0.5 * (opt.lr - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: no decay for norms, biases and Mamba's A_log / D."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if p.dim() < 2 or leaf in NO_DECAY_NAMES else decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], opt: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """torch AdamW over ``groups`` as DeepSpeed's client optimizer (no JIT-compiled DeepSpeed op; fused on CUDA)."""
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, opt, max_steps) / opt.lr)
