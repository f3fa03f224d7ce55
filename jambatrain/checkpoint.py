"""Checkpoints: DeepSpeed engine state + everything else a bit-exact resume needs, saved together.

Layout: RUN_DIR/checkpoints/step_00000100/ holds DeepSpeed's files (model, ZeRO optimizer shards,
scheduler), ``train_state.json`` (step, tokens, loader position, config digest) and ``rng_rank{R}.pt``
per rank. ``checkpoints/latest`` is written by DeepSpeed only once all files of a tag exist, so a crash
mid-save leaves the previous checkpoint as latest. Old tags are pruned only after a newer one completed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .data.loader import resume_geometry_problem
from .parallel.distributed import barrier


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    loader: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)  # world_size and zero_stage of the run that wrote it


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_tag(run_dir: str) -> str | None:
    path = os.path.join(ckpt_root(run_dir), "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isfile(os.path.join(ckpt_root(run_dir), tag, "train_state.json")) else None


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(engine, run_dir: str, state: TrainState, rank: int, keep: int) -> str:
    tag = f"step_{state.step:08d}"
    root = ckpt_root(run_dir)
    tag_dir = os.path.join(root, tag)
    os.makedirs(tag_dir, exist_ok=True)
    barrier()
    torch.save(_rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        tmp = os.path.join(tag_dir, "train_state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f, indent=1)
        os.replace(tmp, os.path.join(tag_dir, "train_state.json"))
    barrier()
    engine.save_checkpoint(root, tag=tag)  # writes `latest` last, after every rank's shard is on disk
    barrier()
    if rank == 0:
        _prune(root, keep, current=tag)
    return tag_dir


def _prune(root: str, keep: int, current: str) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("step_") and t != current)
    for t in tags[: max(0, len(tags) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def read_state(run_dir: str, tag: str) -> TrainState:
    with open(os.path.join(ckpt_root(run_dir), tag, "train_state.json")) as f:
        return TrainState(**json.load(f))


def check_resumable(run_dir: str, tag: str, model_config: dict, world_size: int, zero_stage: int,
                    micro_batch_size: int) -> list[str]:
    """What makes checkpoint ``tag`` unloadable by this run, read from its train_state.json alone, so it is said
    before any data is prepared or model built (each problem with its fix; empty when it can be resumed)."""
    state = read_state(run_dir, tag)
    tag_dir = os.path.join(ckpt_root(run_dir), tag)
    problems = []
    diff = {k: (state.model_config.get(k), v) for k, v in model_config.items()
            if k in state.model_config and state.model_config[k] != v and k not in _RUNTIME_ONLY_KEYS}
    if diff:
        problems.append(f"checkpoint {tag_dir} was trained with a different model config (key: checkpoint vs "
                        f"now): {diff}. Use a new run dir (hydra.run.dir=...) or matching model overrides.")
    saved_world = state.parallel.get("world_size", state.loader.get("dp_size"))
    saved_stage = state.parallel.get("zero_stage", zero_stage)
    if saved_world is not None and saved_world != world_size and max(saved_stage, zero_stage) >= 1:
        problems.append(
            f"checkpoint {tag_dir} was written by {saved_world} data-parallel ranks and ZeRO shards the optimizer "
            f"state per rank; this run has {world_size}. Resume on {saved_world} ranks, or carry the weights (not "
            "the optimizer state) into a new run dir: python -m jambatrain.export_hf RUN_DIR OUT, then "
            "model.init_from=OUT")
    elif state.loader:
        geometry = resume_geometry_problem(state.loader, world_size, micro_batch_size)
        if geometry:
            problems.append(f"checkpoint {tag_dir}: {geometry}")
    return problems


def load(engine, run_dir: str, tag: str, rank: int) -> TrainState:
    """Restore engine + RNG + loader position (``check_resumable`` has vetted the checkpoint)."""
    tag_dir = os.path.join(ckpt_root(run_dir), tag)
    state = read_state(run_dir, tag)
    load_path, _ = engine.load_checkpoint(ckpt_root(run_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


_RUNTIME_ONLY_KEYS = ("mamba_impl", "moe_impl", "activation_checkpointing", "loss_chunk_tokens", "init_from", "name")
