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
from dataclasses import asdict

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, profiling
from .config import TrainConfig, data_problems, problems, register_schema, to_train_config
from .metrics import MetricsLogger, Throughput, moe_load_stats
from .models import JambaLM, ModelConfig
from .models.fast_paths import describe as describe_fast_paths
from .parallel import barrier, build_deepspeed_config, build_engine, expert_parallel, init_distributed, reduce_mean
from .parallel.deepspeed_setup import resolve_precision
from .parallel.expert_parallel import ExpertParallel
from .parallel.distributed import DistInfo, any_rank, export_submitit_env
from .paths import CONF_DIR, require_configs

register_schema()


def prepare_data(cfg: TrainConfig, dist: DistInfo) -> str:
    """Build the embedded corpus on first use (local rank 0 of every node, so nodes without a shared cache get
    their own copy; a file lock serialises builders on a shared one; the other ranks wait), then check the
    shards against the config before any model is built: data.seq_len / vocab_size / eos_id left unset are taken
    from the manifest, and every disagreement is reported at once."""
    from .data import read_manifest

    data_dir = os.path.expanduser(cfg.data.dir)
    if cfg.data.prepare == "stdlib":
        if dist.local_rank == 0:
            from .data.corpus import prepare_default_corpus

            prepare_default_corpus(data_dir, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
        barrier()
    manifest = read_manifest(data_dir, check_files=cfg.data.on_error == "raise")  # skip: the loader warns per shard
    errors = data_problems(cfg, manifest, data_dir)
    if errors:
        raise SystemExit("jambatrain: the data does not fit the config:\n  - " + "\n  - ".join(errors))
    return data_dir


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
        return model
    with torch.device("meta"):
        model = JambaLM(mcfg)
    if ep is not None:
        expert_parallel.apply(model, ep)
    model.to_empty(device=dist.device)
    if ep is not None:
        expert_parallel.mark_expert_params(model, ep)  # to_empty made new parameter objects
    model.init_weights()
    if mcfg.init_from:
        from .hf_io import load_hf_pretrained

        load_hf_pretrained(model, mcfg.init_from)
    return model


def preflight(cfg: TrainConfig, dist: DistInfo, run_dir: str):
    """Everything that can be refused before any data is prepared or model built: the config's cross-field
    problems, kernels asked for that cannot run here, and the checkpoint to resume. Returns the fast-path report
    and the tag to resume from (None: a fresh run)."""
    paths = describe_fast_paths(cfg.model, dist.device.type, resolve_precision(cfg, dist.device), cfg.data.doc_mask,
                                cfg.parallel.expert_parallel_size)
    errors = problems(cfg, dist.world_size) + paths.errors
    if errors:
        raise SystemExit("jambatrain: invalid configuration:\n  - " + "\n  - ".join(errors))
    tr = cfg.trainer
    tag = checkpoint.latest_tag(run_dir, report=dist.is_main)
    if tag is None and checkpoint.has_checkpoints(run_dir):
        raise SystemExit(f"jambatrain: {checkpoint.ckpt_root(run_dir)} holds checkpoint directories but none is "
                         "complete (see the warnings above); not starting again from step 0 over them. Move them "
                         "aside to start afresh, or point hydra.run.dir at a new directory")
    if tr.resume and tag is None:
        raise SystemExit(f"trainer.resume=true but {checkpoint.ckpt_root(run_dir)} has no complete checkpoint: "
                         "point hydra.run.dir at the run to resume, or drop trainer.resume")
    if tag is None or not (tr.resume or tr.auto_resume):
        return paths, None
    errors = checkpoint.check_resumable(run_dir, tag, asdict(cfg.model), dist.world_size, cfg.parallel.zero_stage)
    saved = checkpoint.read_state(run_dir, tag).parallel
    gas, problem = checkpoint.resume_grad_accum(saved, dist.world_size, cfg.parallel.micro_batch_size,
                                                cfg.parallel.grad_accum_steps)
    errors += [problem] if problem else []
    if errors:
        raise SystemExit("jambatrain: cannot resume:\n  - " + "\n  - ".join(errors))
    if gas != cfg.parallel.grad_accum_steps:
        if dist.is_main:
            print(f"jambatrain: the checkpoint was written by {saved.get('world_size')} ranks; keeping its global batch "
                  f"of {saved['global_batch']} sequences with parallel.grad_accum_steps={gas} (configured "
                  f"{cfg.parallel.grad_accum_steps})", flush=True)
        cfg.parallel.grad_accum_steps = gas
    return paths, tag


def train(cfg: TrainConfig, run_dir: str, config_dict: dict) -> dict:
    dist = init_distributed(cfg.parallel)
    paths, resume_tag = preflight(cfg, dist, run_dir)
    tr, par = cfg.trainer, cfg.parallel
    torch.manual_seed(tr.seed)  # same init on every rank
    data_dir = prepare_data(cfg, dist)

    from .data import TokenShardLoader

    loader = TokenShardLoader(data_dir, "train", par.micro_batch_size, dist.rank, dist.world_size,
                              num_workers=cfg.data.num_workers, seed=tr.seed, shuffle=cfg.data.shuffle,
                              vocab_size=cfg.model.vocab_size, on_error=cfg.data.on_error,
                              pin_memory=dist.device.type == "cuda")  # async host-to-device copies
    ds_config = build_deepspeed_config(cfg, dist.world_size, dist.device)
    ep = expert_parallel.create_groups(par.expert_parallel_size) if par.expert_parallel_size > 1 else None
    model = build_model(cfg.model, dist, ds_config, ep)
    engine = build_engine(model, cfg, dist, ds_config, ep)
    state = checkpoint.TrainState(model_config=asdict(cfg.model))
    if resume_tag is not None:
        state = checkpoint.load(engine, model, run_dir, resume_tag, dist.rank)
        loader.load_state_dict(state.loader)
        if dist.is_main:
            print(f"jambatrain: resumed from {run_dir}/checkpoints/{resume_tag} at step {state.step}", flush=True)
    else:  # a fresh run: per-rank streams for anything stochastic in training; a resumed one keeps its restored RNG
        torch.manual_seed(tr.seed + 1000 * dist.rank)

    config_dict = {**config_dict, "runtime": _runtime_info(dist, paths)}  # W&B config: what actually ran
    if dist.is_main:
        with open(os.path.join(run_dir, "run_info.json"), "w") as f:
            json.dump(config_dict["runtime"], f, indent=1)
    logger = MetricsLogger(cfg, run_dir, dist.is_main, config_dict)
    logger.resume_at(state.step)  # rows an earlier attempt logged past the checkpoint move aside: one row per step
    meter = Throughput(_train_flops_per_token(cfg), _peak_flops(cfg, dist), dist.world_size)
    if dist.is_main:
        print(f"jambatrain: {cfg.model.name}: {model.num_params() / 1e6:,.1f}M parameters "
              f"({model.num_active_params() / 1e6:,.1f}M active), layers [{cfg.model.layer_pattern()}], "
              f"{meter.flops_per_token / 1e9:.3f} GFLOP/token (training); {dist.world_size} x {dist.device.type}, "
              f"ZeRO-{par.zero_stage}, expert parallel {par.expert_parallel_size}, {ds_config['train_batch_size']} x {cfg.data.seq_len} tokens/step; "
              f"{loader.batches_per_epoch // par.grad_accum_steps} steps/epoch from {data_dir}; run dir {run_dir}", flush=True)
        print(f"jambatrain: fast paths: {paths.summary()}", flush=True)
        for w in paths.warnings:
            print(f"jambatrain: WARNING: {w}", flush=True)
    tokens_per_step = par.micro_batch_size * par.grad_accum_steps * cfg.data.seq_len * dist.world_size
    stop = _StopFlag()
    pbar = _progress(cfg, dist, state.step)
    batches = iter(loader)
    last = {}
    # losses stay on the device between log steps: no host sync per micro step, so the CPU can queue ahead
    window = torch.zeros(3, dtype=torch.float32, device=dist.device)
    window_steps = 0
    prof = None
    while state.step < tr.max_steps:
        if tr.profile_at and state.step + 1 == tr.profile_at:
            prof = _Profile(dist, run_dir, state.step + 1, tr.profile_steps)
        if prof is not None:
            prof.step_start()
        engine.train()
        step_lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        for _ in range(par.grad_accum_steps):
            batch = next(batches)
            out = engine(input_ids=batch["input_ids"].to(dist.device, non_blocking=True),
                         labels=batch["labels"].to(dist.device, non_blocking=True),
                         doc_starts=_doc_starts(batch, cfg, dist), return_logits=False)
            engine.backward(out.loss)
            engine.step()
            window += torch.stack([out.ce_loss.detach(), out.aux_loss.detach(), out.z_loss.detach()]).float()
        state.step += 1
        state.tokens += tokens_per_step
        meter.add(tokens_per_step)
        if prof is not None:  # each profiled step leaves tokens/s as it ends, whichever log window it falls in
            meter.exclude(prof.step_end(state.step), tokens_per_step)
            if state.step == prof.last_step:
                prof = None
        window_steps += par.grad_accum_steps
        if state.step % tr.log_every == 0 or state.step == tr.max_steps:
            # the ranks' skipped samples are summed in the same all-reduce as the losses
            ce, aux, z, skips = reduce_mean(torch.cat([window / window_steps,
                                                       loader.uncounted_skips(dist.device)]))
            window.zero_()
            window_steps = 0
            skips = loader.count_skips(skips * dist.world_size)
            if skips and dist.is_main:
                print(f"jambatrain: step {state.step}: {loader.skipped} bad samples skipped so far, all ranks "
                      f"(+{skips}; data.on_error=skip, the warnings name them)", flush=True)
            last = {"loss": ce, "aux_loss": aux, "z_loss": z, "lr": step_lr,
                    "grad_norm": _grad_norm(engine), "tokens": state.tokens, "epoch": loader.epoch,
                    "skipped_samples": loader.skipped,
                    **meter.report(), **moe_load_stats(model.expert_counts(), model.expert_received()),
                    **_memory(dist)}
            if not math.isfinite(ce):
                raise SystemExit(f"jambatrain: loss became {ce} at step {state.step}; the last checkpoint is "
                                 "untouched. Lower optim.lr or check the data.")
            logger.log(state.step, last)
            if pbar is not None:
                pbar.set_postfix(loss=f"{ce:.3f}", lr=f"{last['lr']:.2e}")
        if pbar is not None:
            pbar.update(1)
        t_aside = time.perf_counter()
        if tr.eval_every and state.step % tr.eval_every == 0:
            logger.log(state.step, {"val_loss": evaluate(engine, cfg, dist, data_dir)})
        preempted = stop.agreed()
        if tr.save_every and (state.step % tr.save_every == 0 or state.step == tr.max_steps or preempted):
            if any_rank(_diverged(window, engine)):  # never let a checkpoint of NaN weights prune good ones
                raise SystemExit(f"jambatrain: a non-finite loss or gradient norm before step {state.step}'s "
                                 "checkpoint; not saving it, the last checkpoint is untouched. Lower optim.lr or "
                                 "check the data and model.init_from.")
            if not loader.skips_counted:  # a save between log steps: every rank takes this branch alike
                loader.count_skips(reduce_mean(loader.uncounted_skips(dist.device))[0] * dist.world_size)
            state.loader = loader.state_dict()
            state.parallel = {"world_size": dist.world_size, "zero_stage": par.zero_stage,
                              "expert_parallel_size": par.expert_parallel_size,
                              "global_batch": par.micro_batch_size * par.grad_accum_steps * dist.world_size}
            checkpoint.save(engine, model, run_dir, state, dist.rank, tr.keep_checkpoints, ep)
        meter.exclude(time.perf_counter() - t_aside)
        if preempted:
            if dist.is_main:
                saved = f"checkpointed step {state.step}" if tr.save_every else "no checkpoint (save_every=0)"
                print(f"jambatrain: stop signal received, {saved}", flush=True)
            break
    if pbar is not None:
        pbar.close()
    logger.close()
    barrier()
    return {"step": state.step, **last}


@torch.no_grad()
def evaluate(engine, cfg: TrainConfig, dist: DistInfo, data_dir: str) -> float:
    from .data import make_val_loader

    engine.eval()
    val = make_val_loader(data_dir, cfg.parallel.micro_batch_size, dist.rank, dist.world_size,
                          vocab_size=cfg.model.vocab_size, on_error=cfg.data.on_error)
    losses = []
    for i, batch in enumerate(val):
        if i >= cfg.trainer.eval_batches:
            break
        out = engine(input_ids=batch["input_ids"].to(dist.device), labels=batch["labels"].to(dist.device),
                     doc_starts=_doc_starts(batch, cfg, dist))
        losses.append(out.ce_loss.float().item())
    engine.train()
    return reduce_mean(torch.tensor([sum(losses) / max(1, len(losses))], device=dist.device))[0]


def _doc_starts(batch: dict, cfg: TrainConfig, dist: DistInfo):
    """True at the token after each EOS: packed documents start there (data.doc_mask)."""
    if not cfg.data.doc_mask:
        return None
    ids = batch["input_ids"]
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == cfg.data.eos_id
    return starts.to(dist.device, non_blocking=True)


def _runtime_info(dist: DistInfo, paths) -> dict:
    """The facts of this (re)start that the config does not fix: devices, library versions, kernel paths."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"world_size": dist.world_size, "device": dist.device.type,
            "device_name": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None,
            "fast_paths": paths.paths, "fast_path_warnings": paths.warnings,
            "versions": {p: _version(p) for p in ("torch", "deepspeed", "mamba-ssm", "causal-conv1d", "megablocks",
                                                  "transformers")},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class _Profile:
    """torch.profiler over ``steps`` training steps from ``first``: a Chrome trace per rank in RUN/profile/ and the
    time-by-op-class table on rank 0 (jambatrain/profiling.py)."""

    def __init__(self, dist: DistInfo, run_dir: str, first: int, steps: int):
        self.dist, self.first, self.steps = dist, first, steps
        self.last_step = first + steps - 1
        self.trace = os.path.join(run_dir, "profile", f"steps{first}-{self.last_step}_rank{dist.rank}.json")
        self.cuda = dist.device.type == "cuda"
        self.wall = 0.0  # seconds inside the profiled steps
        self.prof = profiling.start(cuda=self.cuda)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.dist.device)
        return time.perf_counter()

    def step_start(self) -> None:
        self.t0 = self._now()

    def step_end(self, step: int) -> float:
        """Seconds this step took; after the last one, also stops, writes the trace and prints the table (that
        time included)."""
        seconds = self._now() - self.t0
        self.wall += seconds
        if step == self.last_step:
            kind = "CUDA kernels" if self.cuda else "CPU ops"
            profiling.stop(self.prof, self.cuda, self.steps, self.wall * 1e6, self.trace,
                           f"steps {self.first}-{self.last_step}, rank 0, {kind}", self.dist.is_main)
            if self.dist.is_main:
                print(f"jambatrain: profiler traces in {os.path.dirname(self.trace)}", flush=True)
            seconds = self._now() - self.t0
        return seconds


def _diverged(window: torch.Tensor, engine) -> bool:
    """Whether a loss since the last log step (still in ``window``) or the last gradient norm is NaN/inf: the
    weights may be poisoned. One host sync, paid only at checkpoint steps."""
    g = _grad_norm(engine)
    return not bool(torch.isfinite(window).all()) or (g is not None and not math.isfinite(g))


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if isinstance(g, torch.Tensor) else g)


def _memory(dist: DistInfo) -> dict:
    if dist.device.type != "cuda":
        return {}
    return {"max_memory_allocated_gb": torch.cuda.max_memory_allocated(dist.device) / 2**30}


def _train_flops_per_token(cfg: TrainConfig) -> float:
    from .flops import flops_per_token

    return flops_per_token(cfg.model, cfg.data.seq_len)["training"]


def _peak_flops(cfg: TrainConfig, dist: DistInfo) -> float | None:
    """trainer.peak_flops if set, else the GPU's dense bf16 peak by name; None on CPU (MFU then is null)."""
    from .flops import peak_flops_for_device

    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu"
    return peak_flops_for_device(name, override=cfg.trainer.peak_flops)


def _progress(cfg: TrainConfig, dist: DistInfo, start: int):
    if not (dist.is_main and cfg.trainer.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.trainer.max_steps, initial=start, desc=cfg.name, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


class _StopFlag:
    """SIGTERM/SIGUSR1 (SLURM preemption, scancel) -> checkpoint at the next step boundary, then exit.
    Ranks agree through an all-reduce so they all stop at the same step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, *_):
        self.raised = True

    def agreed(self) -> bool:
        return any_rank(self.raised)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(raw: DictConfig) -> float | None:
    export_submitit_env()  # before the rank checks below: under submitit each task is a rank
    cfg = to_train_config(raw)
    run_dir = HydraConfig.get().runtime.output_dir
    config_dict = OmegaConf.to_container(raw, resolve=True)
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(OmegaConf.create(config_dict), os.path.join(run_dir, "config.yaml"))
    result = train(cfg, run_dir, config_dict)
    if int(os.environ.get("RANK", "0")) == 0 and "loss" in result:
        print(f"jambatrain: step {result['step']} loss {result['loss']:.4f}; metrics, checkpoints and W&B run in "
              f"{run_dir}", flush=True)
    return result.get("loss")  # the value a Hydra sweeper optimises


def cli() -> None:
    """Entry point: ``python -m jambatrain.train``, ``jambatrain-train``."""
    require_configs()
    main()


if __name__ == "__main__":
    cli()
