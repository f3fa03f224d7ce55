"""Every private DeepSpeed access of jambatrain, in one module, for the DeepSpeed versions it was written for.

DeepSpeed's public API does not cover ten things the trainer needs; each is a function here, used by one caller,
and held by a test in ``tests/test_ds_compat.py`` that fails when DeepSpeed changes what it relies on:

  hook                     caller                     what it touches (DeepSpeed 0.19)
  install_skip_hook        train.setup (StepGuard)    ZeRO-1/2 ``check_overflow`` / ``check_grad_overflow``; ZeRO-3
                                                      ``_overflow_check_and_loss_scale_update`` /
                                                      ``_loss_scale_update_and_overflow_cleanup``; bf16 optimizer
                                                      ``step`` / ``_global_grad_norm`` / ``clear_hp_grads``
  relink_optimizer_state   checkpoint (save, load)    ``_hp_optimizer_states_linked`` +
                                                      ``_lazy_init_hp_params_optimizer_state``
  fp32_partitions          checkpoint (load)          ``single_partition_of_fp32_groups`` / ``fp32_groups_flat_partition``
  zero0_fp32_masters       checkpoint (save, load)    ZeRO-0 bf16/fp16: ``FP16_UnfusedOptimizer``'s ``fp16_groups`` /
                                                      ``fp32_groups``
  drop_construction_step   deepspeed_setup            ZeRO-0 bf16: the step ``FP16_UnfusedOptimizer.__init__`` takes
                                                      (``initialize_optimizer_states``), undone
  has_fp32_fragment        checkpoint                 a parameter's ``_hp_mapping`` (ZeRO-1/2, bf16) / ``ds_id`` (ZeRO-3)
  set_schedule_position    checkpoint (load)          ``engine.global_steps``; torch ``LambdaLR._last_lr``
  expert_groups            expert_parallel            ``deepspeed.utils.groups._create_expert_and_data_parallel`` and
                                                      the ``_get_expert_*`` look-ups
  mark_as_deepspeed_moe    expert_parallel            ``module.__class__`` swap onto ``deepspeed.moe.layer.MoE``
  skip_cpu_shm_op_build    distributed (CPU)          ``deepspeed.comm.torch.build_shm_op``

``SUPPORTED`` is the range pyproject.toml pins; every hook checks the installed version against it first and
refuses another one (``JAMBATRAIN_UNTESTED_DEEPSPEED=1`` turns the refusal into a warning, to try a new release).
A port to a new DeepSpeed release changes this file and its test, nothing else.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import torch

SUPPORTED = ((0, 19, 8), (0, 20, 0))  # [lowest, first unsupported): pyproject.toml's "deepspeed>=0.19.8,<0.20"


def _parse(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def version_problem(version: str | None = None) -> str | None:
    """Why DeepSpeed ``version`` (default: the installed one) is not one these hooks were written for (None: it is)."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    lo, hi = SUPPORTED
    if lo <= _parse(version) < hi:
        return None
    fmt = ".".join
    return (f"DeepSpeed {version} is installed, but jambatrain's private DeepSpeed hooks (jambatrain/parallel/"
            f"ds_compat.py) were written for >={fmt(map(str, lo))},<{fmt(map(str, hi[:2]))}: pip install "
            f"'deepspeed>={fmt(map(str, lo))},<{fmt(map(str, hi[:2]))}' (pyproject.toml's pin), or set "
            "JAMBATRAIN_UNTESTED_DEEPSPEED=1 to try this one (then run tests/test_ds_compat.py)")


@functools.lru_cache(maxsize=None)
def check_version() -> None:
    """Refuse (or, with JAMBATRAIN_UNTESTED_DEEPSPEED=1, warn once about) a DeepSpeed outside ``SUPPORTED``."""
    problem = version_problem()
    if problem is None:
        return
    if os.environ.get("JAMBATRAIN_UNTESTED_DEEPSPEED") == "1":
        print(f"jambatrain: WARNING: {problem}", file=sys.stderr, flush=True)
        return
    raise RuntimeError(problem)


# ---------------------------------------------------------------- skipping a step inside the optimizer
def install_skip_hook(optimizer, skip_requested: Callable[[], bool]) -> str:
    """Make ``optimizer`` (``engine.optimizer``) skip its next step when ``skip_requested()`` is true, through the
    path DeepSpeed takes for an fp16 overflow: gradients dropped, no update, ``overflow`` set so that the engine
    neither steps the LR schedule nor counts the step (``engine.skipped_steps`` grows). Returns the path taken:

      zero12  ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``check_overflow`` (called every step once
              ``check_grad_overflow`` is on) also reports the skip
      zero3   ZeRO-3: ``_overflow_check_and_loss_scale_update`` also checks bf16/fp32 gradients (DeepSpeed checks
              only fp16) and reports the skip
      bf16    ``BF16_Optimizer`` (DeepSpeed's choice for ZeRO-1 with bf16 weights and fp32 gradient accumulation):
              ``step`` drops the gradients and reports overflow, as it does for a non-finite norm
      torch   ZeRO-0: the torch optimizer (fp32) or DeepSpeed's ``FP16_UnfusedOptimizer`` (bf16): its ``step`` is
              not run; ``overflow`` tells the engine not to step the schedule
    """
    check_version()
    opt = optimizer
    if hasattr(opt, "check_grad_overflow") and hasattr(opt, "check_overflow"):  # ZeRO-1/2
        opt.check_grad_overflow = True
        original = opt.check_overflow

        def check_overflow(*args, **kwargs):
            original(*args, **kwargs)
            opt.overflow = opt.overflow or skip_requested()

        opt.check_overflow = check_overflow
        return "zero12"
    if hasattr(opt, "_overflow_check_and_loss_scale_update"):  # ZeRO-3
        def overflow_check(update_scale=True):
            opt.overflow = False
            opt.check_overflow()  # bf16/fp32 gradients too
            opt.overflow = opt.overflow or skip_requested()
            if not update_scale:
                return opt.overflow
            return opt._loss_scale_update_and_overflow_cleanup()

        opt._overflow_check_and_loss_scale_update = overflow_check
        return "zero3"
    if hasattr(opt, "clear_hp_grads"):  # DeepSpeed's BF16_Optimizer
        original = opt.step

        def step(*args, **kwargs):
            if not skip_requested():
                return original(*args, **kwargs)
            opt.overflow = True
            opt._global_grad_norm = float("inf")
            opt.clear_hp_grads()
            opt.clear_lp_grads()

        opt.step = step
        return "bf16"
    original = opt.step  # ZeRO-0: torch's optimizer or FP16_UnfusedOptimizer; the engine zeroes the gradients after

    def step(*args, **kwargs):
        opt.overflow = skip_requested()
        if not opt.overflow:
            return original(*args, **kwargs)

    opt.step = step
    return "torch"


# ---------------------------------------------------------------- fp32 masters and Adam state (checkpoint.py)
def zero_wrapper(engine):
    """DeepSpeed's ZeRO-1/2 or bf16 optimizer (which keep the fp32 masters apart from the model), else None."""
    opt = engine.optimizer
    return opt if hasattr(opt, "_lazy_init_hp_params_optimizer_state") else None


def relink_optimizer_state(engine) -> None:
    """DeepSpeed 0.19 links each parameter's view of the Adam state once, after the first parameter group's first
    step, before later groups have state (and never for state created by hand): re-link so that every group's
    moments are reachable through ``safe_get/set_full_optimizer_state``."""
    check_version()
    z = zero_wrapper(engine)
    if z is not None:
        z._hp_optimizer_states_linked = False
        z._lazy_init_hp_params_optimizer_state()


def fp32_partitions(engine) -> list[torch.Tensor] | None:
    """The flat fp32 partitions the torch optimizer steps under DeepSpeed's ZeRO-1/2 or bf16 optimizer (its Adam
    state is keyed by them); None without such a wrapper (the torch optimizer steps the parameters)."""
    check_version()
    z = zero_wrapper(engine)
    if z is None:
        return None
    return getattr(z, "single_partition_of_fp32_groups", None) or getattr(z, "fp32_groups_flat_partition")


def zero0_fp32_masters(engine) -> dict[torch.Tensor, torch.Tensor]:
    """ZeRO-0 with bf16 (or fp16) weights: DeepSpeed wraps the torch optimizer in its ``FP16_UnfusedOptimizer``,
    which steps an fp32 copy of each trainable parameter (``fp32_groups``, parallel to the model's ``fp16_groups``;
    the torch optimizer's groups and Adam state hold the copies) and copies it into the parameter after each step.
    Returns {model parameter: its fp32 master}; empty where the torch optimizer steps the parameters themselves
    (ZeRO-0 in fp32) or a ZeRO / bf16 optimizer keeps the masters (``zero_wrapper``, ``has_fp32_fragment``)."""
    check_version()
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if isinstance(opt, FP16_Optimizer):  # only for DeepSpeed's FusedAdam/apex as client optimizer; optim.py never is
        raise RuntimeError("DeepSpeed chose its fused FP16_Optimizer (flat fp32 masters), which jambatrain's "
                           "checkpoints do not read: use torch AdamW (jambatrain.optim.build_optimizer) or "
                           "parallel.zero_stage>=1")
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return {}
    masters = {}
    for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp.shape != hp.shape or hp.dtype != torch.float32:
                raise RuntimeError(f"FP16_UnfusedOptimizer's fp32 copy of a {tuple(lp.shape)} parameter is "
                                   f"{hp.dtype} {tuple(hp.shape)}: update jambatrain/parallel/ds_compat.py")
            masters[lp] = hp
    return masters


def drop_construction_step(engine) -> bool:
    """``FP16_UnfusedOptimizer.__init__`` (ZeRO-0 with bf16 weights) runs one optimizer step on zero gradients
    (``initialize_optimizer_states``): Adam's step count would start at 1 (its bias correction a step late, the
    first update ~25% smaller) and the fp32 copies would be weight-decayed once at the peak LR, unlike under every
    other stage. Undo it: the copies equal their parameters again and the torch optimizer holds no state (it
    creates it at the first real step; a resume creates it from the checkpoint). Returns whether there was such a
    step to undo."""
    masters = zero0_fp32_masters(engine)
    if not masters:
        return False
    with torch.no_grad():
        for lp, hp in masters.items():
            hp.copy_(lp)
    engine.optimizer.optimizer.state.clear()
    return True


def has_fp32_fragment(p: torch.Tensor, zero3: bool = True) -> bool:
    """Whether ``p``'s fp32 master and Adam state live in a ZeRO optimizer (read through ``safe_get_full_*``): a
    ZeRO-1/2 or bf16-optimizer parameter (``_hp_mapping``, None where this rank holds no fragment of it) or, with
    ``zero3``, a ZeRO-3 partitioned one (``ds_id``)."""
    return hasattr(p, "_hp_mapping") or (zero3 and hasattr(p, "ds_id"))


def set_schedule_position(engine, step: int, last_epoch: int | None) -> None:
    """A resumed engine at optimizer step ``step``, its LambdaLR at ``last_epoch`` (None: leave the scheduler) with
    every group's learning rate set as the scheduler's own ``step`` would (``engine.get_lr`` reads the groups; torch
    keeps the last rates in ``_last_lr``, which ``get_last_lr`` returns)."""
    s = engine.lr_scheduler
    if s is not None and last_epoch is not None:
        s.last_epoch = last_epoch
        lrs = [base * fn(last_epoch) for base, fn in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs
    engine.global_steps = step


# ---------------------------------------------------------------- expert parallelism (expert_parallel.py)
def expert_groups(ep: int) -> dict:
    """The EP and EDP process groups of size ``ep``, registered in DeepSpeed's group registry (where its ZeRO
    optimizer looks them up by name; created on the first call): ``{"name", "rank", "group", "edp_group",
    "edp_rank"}``."""
    check_version()
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return {"name": name, "rank": groups._get_expert_parallel_rank(name),
            "group": groups._get_expert_parallel_group(name),
            "edp_group": groups._get_expert_data_parallel_group(name),
            "edp_rank": groups._get_expert_data_parallel_rank(name)}


@functools.lru_cache(maxsize=None)
def _marked_class(cls: type) -> type:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    return type(f"ExpertParallel{cls.__name__}", (cls, DeepSpeedMoE),
                {"set_deepspeed_parallelism": lambda self, *args, **kwargs: None})


def mark_as_deepspeed_moe(module: torch.nn.Module, ep_size: int, num_local_experts: int, group_name: str) -> None:
    """Make ``module`` an instance of ``deepspeed.moe.layer.MoE`` (the engine turns its expert-gradient handling on
    only for such modules) by a marker base class whose ``__init__`` never runs, with the bookkeeping attributes
    the engine reads; its ``set_deepspeed_parallelism`` (which would build DeepSpeed's own groups) is a no-op:
    ``expert_groups`` made them."""
    check_version()
    module.ep_size, module.num_local_experts, module.expert_group_name = ep_size, num_local_experts, group_name
    module.__class__ = _marked_class(type(module))


# ---------------------------------------------------------------- CPU start-up (distributed.py)
def skip_cpu_shm_op_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~40 s of g++) when its comm layer
    starts. It only speeds up CPU all-reduce; gloo is correct without it, so on CPU the build is skipped."""
    check_version()
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm's `torch` attribute is the real torch module
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(ds_torch_comm, "build_shm_op"):
        raise RuntimeError("deepspeed.comm.torch.build_shm_op is gone: update jambatrain/parallel/ds_compat.py")
    ds_torch_comm.build_shm_op = lambda: None
