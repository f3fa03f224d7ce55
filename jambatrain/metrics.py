"""Run metrics: throughput, MFU, MoE load; written to RUN_DIR/metrics.jsonl and W&B on rank 0 only.

After a restart from step k, metrics.jsonl holds one row per step: the rows past k of the attempt that died are
moved to metrics.superseded.jsonl (``MetricsLogger.resume_at``)."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from .config import TrainConfig
from .fileio import atomic_write


class Throughput:
    """Tokens/s and MFU over the steps since the last report."""

    def __init__(self, train_flops_per_token: float, peak_flops_per_device: float | None, world_size: int):
        self.flops_per_token = train_flops_per_token
        self.peak = peak_flops_per_device
        self.world = world_size
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def exclude(self, seconds: float, tokens: int = 0) -> None:
        """Leave time spent outside training steps (evaluation, checkpointing) out of the rate, or whole steps
        (``tokens`` > 0: profiled steps, whose speed the profiler perturbs)."""
        self.t0 += seconds
        self.tokens -= tokens

    def report(self) -> dict:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        tps = self.tokens / dt
        mfu = None
        if self.peak:
            mfu = tps * self.flops_per_token / (self.peak * self.world)
        self.t0, self.tokens = now, 0
        return {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world, "mfu": mfu}


def moe_load_stats(counts: list[torch.Tensor], received: list[int] | None = None) -> dict:
    """Expert load of the last micro batch, summed over all ranks: max/mean assignments per expert for each MoE
    layer (``moe_load/layer{i}``; 1.0 = perfectly balanced) and their mean over layers. With expert parallelism
    (``received``: rows this rank's experts got per layer), the max/mean over ranks of the rows received
    (``ep_recv_max_over_mean``): the imbalance all-to-all and the expert GEMMs wait on. Collective: every rank
    calls it at the same step."""
    if not counts:
        return {}
    import torch.distributed as dist

    load = torch.stack([c.float() for c in counts])  # (layers, experts)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(load)
    ratios = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
    out = {"moe_max_over_mean_load": sum(ratios) / len(ratios)}
    out.update({f"moe_load/layer{i}": r for i, r in enumerate(ratios)})
    if received:
        recv = torch.tensor(received, dtype=torch.float64, device=load.device)
        top, total = recv.clone(), recv.clone()
        if distributed:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            dist.all_reduce(total)
        mean = total / (dist.get_world_size() if distributed else 1)
        r = (top / mean.clamp(min=1e-9)).tolist()
        out["ep_recv_max_over_mean"] = sum(r) / len(r)
        out["ep_recv_tokens_max"] = max(top.tolist())
    return out


class MetricsLogger:
    """metrics.jsonl + W&B on rank 0; every other rank gets a logger that does nothing."""

    def __init__(self, cfg: TrainConfig, run_dir: str, is_main: bool, config_dict: dict):
        self.enabled = is_main
        self.wandb_run = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a", buffering=1)
        if cfg.logger.wandb and cfg.logger.wandb_mode != "disabled":
            import wandb

            # silent: W&B's ~30-line banner (per start and at finish) would bury the run's own lines; one line here
            self.wandb_run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name,
                                        dir=run_dir, mode=cfg.logger.wandb_mode, config=config_dict,
                                        tags=list(cfg.logger.tags), resume="allow",
                                        id=_stable_run_id(run_dir), settings=wandb.Settings(silent=True))
            where = os.path.dirname(self.wandb_run.dir.rstrip("/"))
            print(f"jambatrain: W&B run {self.wandb_run.id}: " + (
                f"{self.wandb_run.url}" if cfg.logger.wandb_mode == "online" else
                f"offline in {where} (upload: wandb sync {where})"), flush=True)

    def resume_at(self, step: int) -> int:
        """Keep one row per step after a restart from ``step`` (0: a fresh start): the rows past it, logged by an
        attempt whose steps are about to be redone, move to metrics.superseded.jsonl (appended, nothing is lost;
        as is a line torn by a crash). Returns how many rows moved."""
        if not self.enabled:
            return 0
        self.file.close()
        keep, moved = [], []
        with open(self.path) as f:
            for line in filter(str.strip, f):
                try:
                    row_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    row_step = None
                (keep if isinstance(row_step, int) and row_step <= step else moved).append(line.rstrip("\n") + "\n")
        if moved:
            with open(os.path.join(os.path.dirname(self.path), "metrics.superseded.jsonl"), "a") as f:
                f.writelines(moved)
                f.flush()
                os.fsync(f.fileno())
            atomic_write(self.path, "".join(keep))
        self.file = open(self.path, "a", buffering=1)
        return len(moved)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _stable_run_id(run_dir: str) -> str:
    """The same run dir resumes the same W&B run."""
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm (None where DeepSpeed takes none)."""
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if isinstance(g, torch.Tensor) else g)


def memory_stats(dist) -> dict:
    if dist.device.type != "cuda":
        return {}
    return {"max_memory_allocated_gb": torch.cuda.max_memory_allocated(dist.device) / 2**30}


def train_flops_per_token(cfg: TrainConfig) -> float:
    from .flops import flops_per_token

    return flops_per_token(cfg.model, cfg.data.seq_len)["training"]


def peak_flops(cfg: TrainConfig, dist) -> float | None:
    """trainer.peak_flops if set, else the GPU's dense bf16 peak by name; None on CPU (MFU then is null)."""
    from .flops import peak_flops_for_device

    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu"
    return peak_flops_for_device(name, override=cfg.trainer.peak_flops)


def runtime_info(dist, paths) -> dict:
    """The facts of this (re)start that the config does not fix: devices, library versions, kernel paths (written
    to RUN_DIR/run_info.json and the W&B config)."""
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
