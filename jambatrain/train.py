"""Entry point: ``python -m jambatrain.train [overrides]`` or ``torchrun --nproc_per_node N -m jambatrain.train``.

The path of a run: compose + validate config -> process group -> data (checked before anything expensive)
-> model -> DeepSpeed engine -> resume -> train loop -> checkpoints + metrics.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, profiling
from .config import ConfigError, TrainConfig, problems, register_schema, to_train_config
from .data.sources import BatchSource, data_kind, doc_starts
from .metrics import (MetricsLogger, Throughput, grad_norm, memory_stats, moe_load_stats, peak_flops, runtime_info,
                      train_flops_per_token)
from .models import JambaLM, ModelConfig
from .models import compiled_blocks
from .models.fast_paths import describe as describe_fast_paths
from .quantization import float8
from .parallel import barrier, build_deepspeed_config, build_engine, expert_parallel, init_distributed, reduce_mean
from .parallel.deepspeed_setup import resolve_precision
from .parallel.distributed import DistInfo, any_rank, collective_failure, export_submitit_env, set_phase
from .parallel.ds_compat import install_skip_hook, set_schedule_position
from .run_lock import RunLock
from .parallel.expert_parallel import ExpertParallel
from .parallel import context_parallel
from .parallel.parallel_dims import ParallelDims, build as build_parallel_dims
from .paths import CONF_DIR, require_configs
from .step_guard import StepGuard

register_schema()


def prepare_data(cfg: TrainConfig, dist: DistInfo) -> str:
    """The data kind's preparation (``data/sources.py`` KINDS; shards: build the embedded corpus on first use, then
    check the shards against the config, filling data.seq_len / vocab_size / eos_id left unset), before any model
    is built. Returns the data directory ("" for synthetic data)."""
    return data_kind(cfg).prepare(cfg, dist)


def keep_tokenizer(data_dir: str, run_dir: str, resuming: bool) -> None:
    """Copy the shards' tokenizer (checked against their manifest by ``prepare_data``) into the run dir, so that
    ``export_hf`` ships the one the run trained with even after the data dir (the embedded corpus' cache) is rebuilt.
    A resumed run whose copy differs from the data's tokenizer would continue on other token ids: refused."""
    import shutil

    from .data.tokenizer import file_sha256

    src, dst = os.path.join(data_dir, "tokenizer.model"), os.path.join(run_dir, "tokenizer.model")
    if not os.path.isfile(src):  # synthetic shards
        return
    if os.path.isfile(dst) and file_sha256(dst) != file_sha256(src):
        if resuming:
            raise SystemExit(f"jambatrain: {dst} (the tokenizer this run trained with) differs from {src}: the data "
                             "was retokenized since; point data.dir at the run's shards, or start a new run dir")
    elif os.path.isfile(dst):
        return
    os.makedirs(run_dir, exist_ok=True)
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def build_model(mcfg: ModelConfig, dist: DistInfo, ds_config: dict, ep: ExpertParallel | None = None) -> JambaLM:
    """ZeRO 0-2: built on the meta device, sharded by expert (``ep``), materialised on the target device,
    initialised (each rank keeps its experts of the same full init). ZeRO-3: built
    inside ``deepspeed.zero.Init`` so each rank only ever holds its partition (a 52B model never exists
    whole on one GPU), then initialised one module at a time, gathered, on rank 0 and re-partitioned."""
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        # no dtype argument: DeepSpeed 0.19's Init ignores it on accelerators without fp16 (CPU) and picks bf16;
        # left to the config it follows bf16.enabled
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None, pin_memory=False):
            model = JambaLM(mcfg)
        for name, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            if own:
                with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                    if dist.is_main:
                        model.init_module(name, m)
        float8.convert(model, mcfg, zero_stage=3)
        return model
    with torch.device("meta"):
        model = JambaLM(mcfg)
    if ep is not None:
        expert_parallel.apply(model, ep)
    model.to_empty(device=dist.device)  # JambaLM re-ties a tied LM head (to_empty gives each a new parameter)
    if ep is not None:
        expert_parallel.mark_expert_params(model, ep)  # to_empty made new parameter objects
    model.init_weights()
    if mcfg.init_from:
        from .hf_io import load_hf_pretrained

        load_hf_pretrained(model, mcfg.init_from)
        if dist.is_main:
            print(f"jambatrain: model.init_from: loaded all {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M "
                  f"weights from {mcfg.init_from} (HF Jamba)", flush=True)
    float8.convert(model, mcfg, ds_config.get("zero_optimization", {}).get("stage", 0))  # model.fp8 (none: no-op)
    return model


def preflight(cfg: TrainConfig, dist: DistInfo, run_dir: str):
    """Everything that can be refused before any data is prepared or model built: the config's cross-field
    problems, kernels asked for that cannot run here, and the checkpoint to resume. Returns the fast-path report
    and the tag to resume from (None: a fresh run)."""
    paths = describe_fast_paths(cfg.model, dist.device.type, resolve_precision(cfg, dist.device), cfg.data.doc_mask,
                                cfg.parallel.expert_parallel_size, cfg.parallel.context_parallel_size,
                                cfg.parallel.zero_stage)
    errors = problems(cfg, dist.world_size) + paths.errors
    if cfg.model.init_from:
        from .hf_io import init_from_problems

        errors += init_from_problems(cfg.model, cfg.model.init_from)
    if errors:
        raise ConfigError("jambatrain: invalid configuration:\n  - " + "\n  - ".join(errors))
    tr = cfg.trainer
    if tr.save_every:  # every rank looks (a node may see another disk); all stop if one cannot write
        with torch.device("meta"):
            n = JambaLM(cfg.model).num_params()
        storage = checkpoint.storage_problems(run_dir, checkpoint.checkpoint_bytes(n, cfg.parallel.zero_stage,
                                                                                   dist.world_size))
        if any_rank(bool(storage)):
            raise SystemExit("jambatrain: cannot checkpoint:\n  - " + "\n  - ".join(
                storage or ["another rank cannot write the checkpoint directory (see its message)"]))
    tag = choose_checkpoint(cfg, dist, run_dir)
    if tr.resume and tag is None:
        raise SystemExit(f"trainer.resume=true but {checkpoint.ckpt_root(run_dir)} has no complete checkpoint: "
                         f"point {_run_dir_key()} at the run to resume, or drop trainer.resume")
    if tag is None or not (tr.resume or tr.auto_resume or tr.resume_from):
        return paths, None
    errors = checkpoint.check_resumable(run_dir, tag, asdict(cfg.model), dist.world_size, cfg.parallel.zero_stage)
    saved_state = checkpoint.read_state(run_dir, tag)
    saved = saved_state.parallel
    dp = dist.world_size // cfg.parallel.context_parallel_size  # data-parallel replicas (ParallelDims.dp)
    gas, problem = checkpoint.resume_grad_accum(saved, dp, cfg.parallel.micro_batch_size,
                                                cfg.parallel.grad_accum_steps)
    errors += [problem] if problem else []
    if errors:
        raise SystemExit("jambatrain: cannot resume:\n  - " + "\n  - ".join(errors))
    horizon = saved_state.decay_steps
    if dist.is_main and (table := resume_changes(saved_state.config, flat_config(cfg), saved_state.step,
                                                    cfg.parallel.zero_stage)):
        print(f"jambatrain: resuming {tag} (step {saved_state.step}) with settings that differ from the "
              f"checkpoint's:\n{table}", flush=True)
    if cfg.optim.decay_steps is None and horizon and horizon != tr.max_steps:
        if dist.is_main:
            print(f"jambatrain: LR schedule: keeping the checkpoint's decay horizon (cosine decay to the floor at step "
                  f"{horizon}) although trainer.max_steps is now {tr.max_steps}; set optim.decay_steps to decay over "
                  "another horizon. optim.lr, warmup_steps and min_lr_ratio are this run's", flush=True)
        cfg.optim.decay_steps = horizon
    if gas != cfg.parallel.grad_accum_steps:
        if dist.is_main:
            print(f"jambatrain: the checkpoint was written by {saved.get('world_size')} ranks (context parallel "
                  f"{saved.get('context_parallel_size', 1)}); keeping its global batch "
                  f"of {saved['global_batch']} sequences with parallel.grad_accum_steps={gas} (configured "
                  f"{cfg.parallel.grad_accum_steps})", flush=True)
        cfg.parallel.grad_accum_steps = gas
    return paths, tag


def quiet_known_warnings() -> None:
    """Drop the one library warning every run prints, mid progress bar: DeepSpeed's ZeRO all-gather
    (deepspeed/comm/torch.py) calls torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates; the
    warning is attributed to torch's c10d_logger wrapper. Only that message from there (jambatrain never calls it)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning, module=r"torch\.distributed\.c10d_logger")


def flat_config(cfg: TrainConfig) -> dict:
    """The settings as ``{"optim.lr": 0.002, ...}`` (JSON values), saved with every checkpoint."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v.value if hasattr(v, "value") else v

    walk(asdict(cfg), "")
    return json.loads(json.dumps(out, default=str))


ZERO3_RESTORED = ("optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay")


def resume_changes(saved: dict, now: dict, step: int, zero_stage: int = 2) -> str:
    """A table of the settings that differ between the checkpoint's run (``saved``, from its train_state) and this
    one, and which value is in effect after the resume; "" when none differ (or the checkpoint predates the record).
    Keys left unset now (None: taken from the data manifest or the checkpoint) are not changes. The architecture
    (model.*) must match and is checked elsewhere; the global batch is the checkpoint's (said next), and so is the LR
    decay horizon while optim.decay_steps is unset; everything else is this run's from step ``step`` on (the LR
    schedule is a function of the step)."""
    rows = []
    for key in sorted(k for k in now if k in saved and saved[k] != now[k] and now[k] is not None):
        if key.startswith("model.") and key != "model.init_from":
            continue
        if key in ("parallel.grad_accum_steps", "parallel.micro_batch_size"):
            wins = "the checkpoint's global batch is kept"
        elif key == "model.init_from":
            wins = "ignored (the checkpoint's weights)"
        elif zero_stage == 3 and key in ZERO3_RESTORED:  # DeepSpeed loads the optimizer's param groups whole
            wins = "the checkpoint's (ZeRO-3 restores the optimizer's settings)"
        else:
            wins = f"now, from step {step}"
        rows.append((key, repr(saved[key]), repr(now[key]), wins))
    if not rows:
        return ""
    rows.insert(0, ("setting", "checkpoint", "now", "in effect"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows)


def choose_checkpoint(cfg: TrainConfig, dist: DistInfo, run_dir: str) -> str | None:
    """The tag to resume from: ``trainer.resume_from`` (verified; the newer tags moved aside), else the newest that
    is complete and verifies (``checkpoint.find_resumable``). A run dir whose only checkpoint dirs are saves that
    never committed (a crash during the first save) starts afresh with them moved aside; one whose committed
    checkpoints are all damaged is refused, each named with what is wrong."""
    root = checkpoint.ckpt_root(run_dir)
    done = checkpoint.rolled_back(run_dir)
    if cfg.trainer.resume_from and done and done.get("ref") == cfg.trainer.resume_from:
        if dist.is_main:  # a requeue or restart with the same command line must not roll back again
            print(f"jambatrain: trainer.resume_from={cfg.trainer.resume_from} was applied at {done.get('at')} "
                  f"(rolled back to {done.get('tag')}); resuming from the newest checkpoint since. Drop "
                  "trainer.resume_from from the command line", flush=True)
    elif cfg.trainer.resume_from:
        tag = checkpoint.resolve_tag(run_dir, cfg.trainer.resume_from)
        reason = checkpoint.verify_reason(os.path.join(root, tag), dist.rank, dist.world_size)
        if reason:
            raise SystemExit(f"jambatrain: trainer.resume_from={cfg.trainer.resume_from}: checkpoint "
                             f"{os.path.join(root, tag)} cannot be used ({reason}); choose another (this run has: "
                             f"{', '.join(checkpoint._tags(root))})")
        if dist.is_main:
            for moved in checkpoint.roll_back_to(run_dir, tag, cfg.trainer.resume_from):
                print(f"jambatrain: rolling back to {tag}: moved {moved} aside (kept; never pruned)", flush=True)
        barrier()
        return tag
    tag = checkpoint.find_resumable(run_dir, dist.rank, dist.world_size, report=dist.is_main)
    if tag is not None or not checkpoint.has_checkpoints(run_dir):
        return tag
    uncommitted, committed = checkpoint.leftovers(run_dir)
    if committed:
        why = [f"{d}: {checkpoint.incomplete_reason(d) or 'set aside (its name says why)'}" for d in committed]
        raise SystemExit(f"jambatrain: {root} holds checkpoints but none is complete and intact; not starting again "
                         "from step 0 over them:\n  - " + "\n  - ".join(why) + "\nRoll back to one with "
                         "trainer.resume_from=..., move them aside to start afresh, or point hydra.run.dir at a new "
                         "directory")
    barrier()  # every rank has looked before rank 0 renames
    if dist.is_main:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for d in uncommitted:
            aside = checkpoint._set_aside(d, f"aborted-{stamp}")
            print(f"jambatrain: {d} is a save that never completed (no manifest.json: the job died while writing "
                  f"the first checkpoint); moved aside to {aside} (kept) and starting afresh from step 0", flush=True)
    barrier()
    return None


@dataclass
class Run:
    """Everything a training run holds between steps (built by ``setup``)."""
    cfg: TrainConfig
    run_dir: str
    dist: DistInfo
    data_dir: str
    loader: BatchSource
    model: JambaLM
    engine: object
    ep: ExpertParallel | None
    state: checkpoint.TrainState
    guard: StepGuard
    logger: MetricsLogger
    meter: Throughput
    stop: "_StopFlag"
    tokens_per_step: int
    # losses since the last log step stay on the device: no host sync per micro step, so the CPU queues ahead
    window: torch.Tensor = None
    window_steps: int = 0
    last: dict = field(default_factory=dict)  # the last logged metrics
    save_due: bool = False
    dims: ParallelDims = None  # the parallel layout (dp x cp, ep) and its groups


def train(cfg: TrainConfig, run_dir: str, config_dict: dict) -> dict:
    """The loop: one optimizer step, then logging, evaluation and checkpointing as they fall due."""
    run = setup(cfg, run_dir, config_dict)
    tr, state = cfg.trainer, run.state
    pbar, prof, batches = _progress(cfg, run.dist, state.step), None, iter(run.loader)
    if run.dims.cp_enabled:  # the cp group's ranks read the same batches, each keeps its slice
        batches = context_parallel.shard_batches(batches, run.dims, cfg.data, run.dist.device)
    while state.step < tr.max_steps:
        if tr.profile_at and state.step + 1 == tr.profile_at:
            prof = profiling.StepProfiler(run.dist, run_dir, state.step + 1, tr.profile_steps)
        if prof is not None:
            prof.step_start()
        step_lr = run.engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        set_phase(f"step {state.step + 1} (forward, backward, optimizer step)")
        losses, skipped = train_step(run.engine, batches, run.guard, cfg, run.dist)
        set_phase(f"after step {state.step + 1} (logging, evaluation, checkpoint)")
        account(run, losses, skipped)
        if prof is not None:  # each profiled step leaves tokens/s as it ends, whichever log window it falls in
            run.meter.exclude(prof.step_end(state.step), run.tokens_per_step)
            prof = None if state.step == prof.last_step else prof
        if (state.step % tr.log_every == 0 or state.step == tr.max_steps) and run.window_steps:
            log_step(run, step_lr, pbar)
        if pbar is not None:
            pbar.update(1)
        t_aside = time.perf_counter()
        reached = False
        if tr.eval_every and state.step % tr.eval_every == 0:
            from .eval import evaluate_in_training  # val loss/perplexity, MQAR recall, passkey (eval.tasks)

            metrics = evaluate_in_training(run.engine.module, cfg, run.dist, run.data_dir, state.step, run_dir)
            run.logger.log(state.step, metrics)
            reached = bool(tr.stop_metric) and metrics.get(tr.stop_metric, -math.inf) > tr.stop_above
        preempted = run.stop.agreed()
        maybe_checkpoint(run, preempted or reached)
        if reached:
            if run.dist.is_main:
                print(f"jambatrain: {tr.stop_metric} {metrics[tr.stop_metric]:.4f} > trainer.stop_above="
                      f"{tr.stop_above} at step {state.step}: stopping early", flush=True)
            break
        run.meter.exclude(time.perf_counter() - t_aside)
        if preempted:
            if run.dist.is_main:
                saved = f"checkpointed step {state.step}" if tr.save_every and not run.guard.in_a_row else \
                    "no checkpoint (save_every=0, or inside a streak of skipped steps)"
                print(f"jambatrain: stop signal received, {saved}", flush=True)
            break
    if pbar is not None:
        pbar.close()
    run.logger.close()
    barrier()
    if run.guard.in_a_row:  # the last steps were all skipped: the weights in memory and run.last are not trustworthy
        last = checkpoint.latest_tag(run_dir)
        raise SystemExit(f"jambatrain: the run ended at step {state.step} inside a streak of {run.guard.in_a_row} "
                         f"skipped steps (non-finite or spiking loss): not a result, and nothing from the streak was "
                         f"checkpointed; the last checkpoint is {last or 'none'}. Roll back with "
                         "trainer.resume_from=<an earlier step> and lower optim.lr, or check the data")
    return {"step": state.step, **run.last}


def setup(cfg: TrainConfig, run_dir: str, config_dict: dict) -> Run:
    """Process groups, preflight checks, data, model, engine, resume, logger: everything before the first step."""
    stop = _StopFlag()  # first: a preemption signal during start-up is a stop at the first step, not a death
    quiet_known_warnings()
    dist = init_distributed(cfg.parallel)
    if any_rank(_lock.error is not None):  # rank 0 could not lock the run dir: every rank stops, before any work
        if dist.is_main:  # every rank's Hydra rewrote the holder's .hydra/ before this job could be refused
            _lock.restore()
        raise SystemExit(_lock.error if dist.is_main else 3)
    if dist.is_main and _lock.held is not None and _lock.held.took_over:
        print(f"jambatrain: {_lock.held.took_over}", flush=True)
    paths, resume_tag = preflight(cfg, dist, run_dir)
    tr, par = cfg.trainer, cfg.parallel
    torch.manual_seed(tr.seed)  # same init on every rank
    data_dir = prepare_data(cfg, dist)
    if dist.is_main and data_dir:
        keep_tokenizer(data_dir, run_dir, resuming=resume_tag is not None)

    from .data import make_loader

    ep = expert_parallel.create_groups(par.expert_parallel_size) if par.expert_parallel_size > 1 else None
    dims = build_parallel_dims(dist.world_size, dist.rank, par.context_parallel_size, par.expert_parallel_size, ep)
    loader = make_loader(cfg, "train", dims.dp_rank, dims.dp, data_dir,  # data.kind's (data/sources.py)
                         pin_memory=dist.device.type == "cuda")  # async host-to-device copies
    ds_config = build_deepspeed_config(cfg, dist.world_size, dist.device)
    model = build_model(cfg.model, dist, ds_config, ep)
    context_parallel.apply(model, dims)  # cp = 1: nothing
    compiled_blocks.apply(model, compiled_blocks.decide(cfg.model.compile_blocks, dist.device.type, par.zero_stage,
                                                        dims.cp, cfg.model.fp8))  # the report's decision
    engine = build_engine(model, cfg, dist, ds_config, ep)
    state = checkpoint.TrainState(model_config=asdict(cfg.model))
    if resume_tag is not None:
        state = checkpoint.load(engine, model, run_dir, resume_tag, dist.rank)
        float8.optimizer_stepped(model)  # new weights: no FP8 cast of the old ones may survive
        if par.zero_stage == 3 and engine.lr_scheduler is not None:
            # DeepSpeed's load restored the LambdaLR's base LR (the checkpoint's optim.lr): the configured one, as
            # under ZeRO-0..2 (the resume report says so)
            sched = engine.lr_scheduler
            sched.base_lrs = [cfg.optim.lr] * len(sched.base_lrs)
            set_schedule_position(engine, engine.global_steps, sched.last_epoch)
        loader.load_state_dict(state.loader)
        if dist.is_main:
            print(f"jambatrain: resumed from {run_dir}/checkpoints/{resume_tag} at step {state.step}", flush=True)
    else:  # a fresh run: per-rank streams for anything stochastic in training; a resumed one keeps its restored RNG
        torch.manual_seed(tr.seed + 1000 * dist.rank)
    if state.step >= tr.max_steps and dist.is_main:
        print(f"jambatrain: {run_dir} is already at step {state.step} (trainer.max_steps={tr.max_steps}): nothing to "
              f"train; raise trainer.max_steps to continue, or use another {_run_dir_key()} for a new run", flush=True)

    config_dict = {**config_dict, "runtime": runtime_info(dist, paths)}  # W&B config: what actually ran
    if dist.is_main:
        with open(os.path.join(run_dir, "run_info.json"), "w") as f:
            json.dump(config_dict["runtime"], f, indent=1)
    logger = MetricsLogger(cfg, run_dir, dist.is_main, config_dict)
    logger.resume_at(state.step)  # rows an earlier attempt logged past the checkpoint move aside: one row per step
    meter = Throughput(train_flops_per_token(cfg), peak_flops(cfg, dist), dist.world_size)
    if dist.is_main:
        print(f"jambatrain: {cfg.model.name}: {model.num_params() / 1e6:,.1f}M parameters "
              f"({model.num_active_params() / 1e6:,.1f}M active), layers [{cfg.model.layer_pattern()}], "
              f"{meter.flops_per_token / 1e9:.3f} GFLOP/token (training); {dist.world_size} x {dist.device.type}, "
              f"ZeRO-{par.zero_stage}, expert parallel {par.expert_parallel_size}, context parallel {dims.cp}, "
              f"{dims.global_batch(par.micro_batch_size, par.grad_accum_steps)} x {cfg.data.seq_len} tokens/step; "
              f"{loader.batches_per_epoch // par.grad_accum_steps} steps/epoch from {data_dir or 'synthetic data'}; "
              f"run dir {run_dir}", flush=True)
        print(f"jambatrain: fast paths: {paths.summary()}", flush=True)
        for w in paths.warnings:
            print(f"jambatrain: WARNING: {w}", flush=True)
    guard = StepGuard(engine, tr.skip_spike_factor, tr.skip_spike_warmup, tr.max_skipped_steps)
    install_skip_hook(engine.optimizer, guard.skip_requested)  # the guard's skips reach DeepSpeed's optimizer
    guard.load_state_dict(state.guard)
    engine.train()
    return Run(cfg, run_dir, dist, data_dir, loader, model, engine, ep, state, guard, logger, meter, stop,
               tokens_per_step=dims.global_batch(par.micro_batch_size, par.grad_accum_steps) * cfg.data.seq_len,
               window=torch.zeros(3, dtype=torch.float32, device=dist.device), dims=dims)


def account(run: Run, losses: torch.Tensor, skipped: str | None) -> None:
    """After a step: the step and token counters, the loss window (applied steps only), the skip count."""
    run.state.step += 1
    run.state.tokens += run.tokens_per_step
    run.meter.add(run.tokens_per_step)
    if skipped:
        run.state.skipped_steps += 1
        if run.dist.is_main:
            print(f"jambatrain: step {run.state.step} skipped ({skipped}): no update, weights, optimizer and LR "
                  f"schedule unchanged; {run.state.skipped_steps} skipped so far", flush=True)
    else:
        run.window += losses
        run.window_steps += run.cfg.parallel.grad_accum_steps


def log_step(run: Run, step_lr: float, pbar) -> None:
    """Reduce the window's losses over the ranks (with the bad-sample counts in the same all-reduce) and log."""
    state, loader, dist = run.state, run.loader, run.dist
    ce, aux, z, skips = reduce_mean(torch.cat([run.window / run.window_steps, loader.uncounted_skips(dist.device)]))
    run.window.zero_()
    run.window_steps = 0
    skips = loader.count_skips(skips * run.dims.dp)  # the ranks of a cp group read the same samples
    if skips and dist.is_main:
        print(f"jambatrain: step {state.step}: {loader.skipped} bad samples skipped so far, all ranks "
              f"(+{skips}; data.on_error=skip, the warnings name them)", flush=True)
    run.last = {"loss": ce, "aux_loss": aux, "z_loss": z, "lr": step_lr, "grad_norm": grad_norm(run.engine),
                "tokens": state.tokens, "epoch": loader.epoch, "skipped_samples": loader.skipped,
                "skipped_steps": state.skipped_steps, **run.meter.report(),
                **moe_load_stats(run.model.expert_counts(), run.model.expert_received()), **memory_stats(dist)}
    if not math.isfinite(ce):
        raise SystemExit(f"jambatrain: loss became {ce} at step {state.step}; the last checkpoint is "
                         "untouched. Lower optim.lr or check the data.")
    run.logger.log(state.step, run.last)
    if pbar is not None:
        pbar.set_postfix(loss=f"{ce:.3f}", lr=f"{step_lr:.2e}")


def maybe_checkpoint(run: Run, preempted: bool) -> None:
    """Checkpoint when one is due (``save_every``, the last step, a stop signal), never inside a streak of skipped
    steps (the weights may be what made them spike) nor with a non-finite loss or gradient norm since the last log
    step: a preempted run then resumes from the last good checkpoint."""
    tr, state, par, dist, loader = run.cfg.trainer, run.state, run.cfg.parallel, run.dist, run.loader
    run.save_due = run.save_due or bool(tr.save_every and (state.step % tr.save_every == 0
                                                           or state.step == tr.max_steps or preempted))
    if not run.save_due or run.guard.in_a_row:
        run.save_due = run.save_due and not preempted
        return
    run.save_due = False
    if any_rank(_diverged(run.window, run.engine)):  # never let a checkpoint of NaN weights prune good ones
        raise SystemExit(f"jambatrain: a non-finite loss or gradient norm before step {state.step}'s checkpoint; "
                         "not saving it, the last checkpoint is untouched. Lower optim.lr or check the data and "
                         "model.init_from.")
    if not loader.skips_counted:  # a save between log steps: every rank takes this branch alike
        loader.count_skips(reduce_mean(loader.uncounted_skips(dist.device))[0] * run.dims.dp)
    state.loader = loader.state_dict()
    state.guard = run.guard.state_dict()
    state.config = flat_config(run.cfg)
    state.decay_steps = run.cfg.optim.decay_steps or tr.max_steps
    state.parallel = {"world_size": dist.world_size, "zero_stage": par.zero_stage,
                      "expert_parallel_size": par.expert_parallel_size,
                      "context_parallel_size": run.dims.cp,
                      "global_batch": run.dims.global_batch(par.micro_batch_size, par.grad_accum_steps)}
    if any_rank(_lock.held is not None and _lock.held.lost is not None):
        raise SystemExit(f"jambatrain: the run-dir lock of {run.run_dir} was taken over by another job "
                         f"({_lock.held.lost if _lock.held else 'see rank 0'}) while this one was not heard from; "
                         f"stopping without writing step {state.step}'s checkpoint over its run")
    set_phase(f"the checkpoint of step {state.step}")
    checkpoint.save(run.engine, run.model, run.run_dir, state, dist.rank, tr.keep_checkpoints, run.ep,
                    max_weight_growth=tr.save_max_weight_growth)


def train_step(engine, batches, guard: StepGuard, cfg: TrainConfig, dist: DistInfo) -> tuple[torch.Tensor, str | None]:
    """One optimizer step: ``grad_accum_steps`` micro batches forward and backward, then the update, which
    ``guard`` skips on every rank when a rank's loss is non-finite or spikes (DeepSpeed also skips a step whose
    gradients are non-finite). Returns the summed (ce, aux, z) losses on the device, and why the step was skipped
    (None: applied). One host sync (the guard's), none per micro batch."""
    gas = cfg.parallel.grad_accum_steps
    losses = torch.zeros(4, dtype=torch.float32, device=dist.device)  # total loss, ce, aux, z
    skipped_before = engine.skipped_steps
    reason = None
    for i in range(gas):
        batch = next(batches)
        # under cp the batch holds the slice's document starts, found on the whole sequence
        starts = batch["doc_starts"] if "doc_starts" in batch else doc_starts(batch, cfg.data, dist.device)
        labels = batch["labels"]
        # counted on the host batch, so the labelled-only loss gathers its positions without a device sync
        extra = {"num_labeled": int((labels != -100).sum())} \
            if cfg.model.loss_labeled_only and labels.device.type == "cpu" else {}
        out = engine(input_ids=batch["input_ids"].to(dist.device, non_blocking=True),
                     labels=labels.to(dist.device, non_blocking=True),
                     doc_starts=starts, return_logits=False, **extra)
        engine.backward(out.loss)
        losses += torch.stack([out.loss.detach(), out.ce_loss.detach(), out.aux_loss.detach(),
                               out.z_loss.detach()]).float()
        if i == gas - 1 and cfg.trainer.step_guard:  # before the step that applies (or skips) the update
            reason = guard.check(losses[0], gas)
        engine.step()
    float8.optimizer_stepped(engine.module)  # the weights changed: the step's FP8 weight casts are stale
    skipped = guard.after_step(skipped_before)
    if skipped and reason is None:
        reason = "non-finite gradients"
    return losses[1:], reason if skipped else None


def _diverged(window: torch.Tensor, engine) -> bool:
    """Whether a loss since the last log step (still in ``window``) or the last gradient norm is NaN/inf: the
    weights may be poisoned. One host sync, paid only at checkpoint steps."""
    g = grad_norm(engine)
    return not bool(torch.isfinite(window).all()) or (g is not None and not math.isfinite(g))


def _progress(cfg: TrainConfig, dist: DistInfo, start: int):
    if not (dist.is_main and cfg.trainer.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.trainer.max_steps, initial=start, desc=cfg.name, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


class _StopFlag:
    """SIGTERM/SIGUSR1 (SLURM preemption, scancel, a launcher passing them on) and SIGINT (Ctrl-C) -> checkpoint at
    the next step boundary, then exit 0. Ranks agree through an all-reduce so they all stop at the same step. A
    second SIGINT more than 2 s after the first (a terminal sends one to every process, a launcher may pass it on
    again at once) aborts without a checkpoint. Under a launcher (torchrun) the trainer also asks the kernel for a
    SIGTERM if the launcher dies (PR_SET_PDEATHSIG), so a launcher killed by a signal it does not handle (plain
    torchrun and SIGUSR1) leaves no trainer running unsupervised: they checkpoint and exit."""

    def __init__(self):
        self.raised = None  # the first stop signal's name
        self.first_at = 0.0
        self.pid = os.getpid()  # forked DataLoader workers inherit the handler: there it only keeps them alive
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        if "LOCAL_RANK" in os.environ and sys.platform == "linux":
            _die_with_parent()

    def _handler(self, signum, _frame):
        if os.getpid() != self.pid:
            return
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.raised is not None:
            if signum == signal.SIGINT and now - self.first_at > 2.0:
                os.write(2, b"jambatrain: second SIGINT: aborting without a checkpoint\n")
                os._exit(130)
            return
        self.raised, self.first_at = name, now
        if int(os.environ.get("RANK", "0")) == 0:  # one line (os.write: safe inside a signal handler)
            os.write(2, f"jambatrain: {name} received: checkpointing at the end of this step, then exiting"
                        f"{' (Ctrl-C again to abort without one)' if signum == signal.SIGINT else ''}\n".encode())

    def agreed(self) -> bool:
        return any_rank(self.raised is not None)


def _die_with_parent() -> None:
    """SIGTERM to this process when its parent (the launcher) exits (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class _lock:
    """The run-dir lock held by global rank 0 of this process (run_lock.py); ``error``: why it could not be taken."""
    held: RunLock | None = None
    error: str | None = None
    restore = None  # puts the holder's copy of .hydra/ back (a refused job)


def _run_dir_key() -> str:
    """The option that picks this run's directory: ``hydra.sweep.dir`` for a job of a ``-m`` sweep (its dir is
    ``<sweep dir>/<job num>``; hydra.run.dir does not apply there), else ``hydra.run.dir``."""
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(raw: DictConfig) -> float | None:
    export_submitit_env()  # before the rank checks below: under submitit each task is a rank
    try:
        cfg = to_train_config(raw)
        run_dir = HydraConfig.get().runtime.output_dir
        config_dict = OmegaConf.to_container(raw, resolve=True)
        _lock.held, _lock.error = None, None
        if int(os.environ.get("RANK", "0")) == 0:
            os.makedirs(run_dir, exist_ok=True)
            subdir = HydraConfig.get().output_subdir
            lock = RunLock(run_dir, cfg.trainer.lock_stale_minutes * 60)
            try:  # before anything is written in the run dir; the other ranks learn the outcome in setup()
                lock.acquire()
            except SystemExit as exc:
                _lock.error = str(exc)
                _lock.restore = lambda: lock.restore_hydra(subdir)  # once every rank's Hydra has written (setup)
            else:
                _lock.held = lock
                lock.keep_hydra(subdir)
                OmegaConf.save(OmegaConf.create(config_dict), os.path.join(run_dir, "config.yaml"))
        try:
            result = train(cfg, run_dir, config_dict)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # a collective that timed out or lost a peer: say which rank, where, who is stalled
            message = collective_failure(exc, int(os.environ.get("RANK", "0")),
                                         int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel.timeout_minutes)
            if message is None:
                raise
            print(message, file=sys.stderr, flush=True)
            if _lock.held is not None:
                _lock.held.release()
            os._exit(1)  # not sys.exit: interpreter shutdown would wait on the process group that is stuck
        finally:
            if _lock.held is not None:
                _lock.held.release()
    except SystemExit as e:  # the advice of every check names the option that sets this job's dir
        code = e.code.replace("hydra.run.dir", _run_dir_key()) if isinstance(e.code, str) else e.code
        if "SUBMITIT_FOLDER" in os.environ and code not in (0, None):
            # a submitit job records an Exception in its result file, not a SystemExit: without one the sweep
            # cannot tell that the job failed (and polls sacct forever on a cluster without accounting)
            raise RuntimeError(code) from None
        raise type(e)(code) from None
    if int(os.environ.get("RANK", "0")) == 0 and "loss" in result:
        print(f"jambatrain: step {result['step']} loss {result['loss']:.4f}; metrics, checkpoints and W&B run in "
              f"{run_dir}", flush=True)
    return result.get("loss")  # the value a Hydra sweeper optimises


def cli() -> None:
    """Entry point: ``python -m jambatrain.train``, ``jambatrain-train``."""
    require_configs()
    from .config import override_key_problems

    if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:
        from .slurm_watch import install

        install()  # submitit's SLURM launcher: job states from squeue where sacct fails
    try:
        if bad := override_key_problems(sys.argv[1:], CONF_DIR):
            raise ConfigError("jambatrain: unknown config keys on the command line:\n  - " + "\n  - ".join(bad))
        main()
    except ConfigError as e:  # every rank found the same problem: rank 0 says it
        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(1) from None
        raise SystemExit(e.code) from None


if __name__ == "__main__":
    cli()
