"""Checkpoints: everything a resume needs, written so that a checkpoint is either complete or ignored.

Layout: ``RUN_DIR/checkpoints/step_00000100/`` holds

  train_state.json    step, tokens, loader position, model config, the writing run's parallel layout
  rng_rank{R}.pt      every rank's RNG streams
  params_r{R}_{k}.pt  (ZeRO 0-2, "portable") fp32 master weight + Adam moments of every parameter, whole tensors;
                      experts stored under their global expert ids (one entry per [lo, hi) range), each dense
                      parameter once; the writers are spread over the ranks
  scheduler.pt        the LR scheduler and the Adam step count
  (ZeRO-3)            DeepSpeed's partitioned model/optimizer files instead of params_* (same world size only)
  manifest.json       written last: every file of the tag with its size and content checksum (xxh3-128 of the
                      bytes as they were written, hashed while writing: no second pass), and where each parameter is

The portable format does not depend on the topology: a run saved on (world 4, ep 2) resumes on (4, 4), (2, 1),
(1, 1)... with the same weights and moments (tests/test_expert_parallel.py,
``test_checkpoint_saved_at_world4_ep2_resumes_on_other_topologies``); the trainer keeps the global
batch by adjusting gradient accumulation.

Commit protocol: the files are written into ``step_X.partial/`` and fsynced by the rank that wrote them; the
ranks agree (a collective), rank 0 writes ``manifest.json``, renames the directory to ``step_X`` and fsyncs the
parent; ``latest`` (a convenience for people and tools) is rewritten after that by write-temp + rename. Resume
trusts no pointer: ``find_resumable`` takes the newest tag whose manifest lists files that all exist with their
sizes and whose contents match their checksums (the ranks hash a share of the files each). A newer tag that is
not complete is reported and left in place; one whose contents do not match (bit rot, a torn copy) is reported and
moved aside as ``step_X.corrupt``, never deleted. Before it is published, a save checks the state it holds
(``state_problems``: finite weights and moments, weight norm within ``trainer.save_max_weight_growth`` x the last
checkpoint's), so a divergent update is not checkpointed. Pruning keeps the newest complete tags, never touches a
tag newer than the one written, and removes the leftovers of dead saves (``.partial``, ``.incomplete-*``) once a
newer checkpoint is complete; the run-dir lock (run_lock.py) guarantees no other job writes there.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as tdist

from .fileio import atomic_write
from .models.config import architecture_changes
from .parallel import ds_compat
from .parallel.distributed import barrier

FORMAT = 2
CHECKSUM = "xxh3_128"  # integrity, not security: ~26 GiB/s in memory (docs/benchmarks.md), so disk-bound
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
FILE_BYTES = 2 << 30  # a writer starts a new params file past this size (bounds host memory during a save)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    loader: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    # the layout of the run that wrote it: world_size, zero_stage, expert_parallel_size, global_batch
    parallel: dict = field(default_factory=dict)
    skipped_steps: int = 0  # optimizer steps skipped as bad (step_guard.py), whole run
    decay_steps: int | None = None  # the LR schedule's horizon (optim.decay_steps, else trainer.max_steps)
    guard: dict = field(default_factory=dict)  # the step guard's running loss mean
    config: dict = field(default_factory=dict)  # the run's settings, flat (train.py reports changes at resume)
    weight_norm: float | None = None  # L2 norm of the fp32 master weights saved (the next save's reference)


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


# ---------------------------------------------------------------- which tags are complete
def _tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted((t for t in os.listdir(root) if t.startswith("step_") and "." not in t), reverse=True)


def incomplete_reason(tag_dir: str) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint (None: complete)."""
    try:
        with open(os.path.join(tag_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return f"no readable manifest.json ({type(exc).__name__})"
    for rel, size in manifest["files"].items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


def latest_tag(run_dir: str, report: bool = False) -> str | None:
    """The newest complete tag (None: none). ``report``: say which newer tags were passed over and why."""
    root = ckpt_root(run_dir)
    for tag in _tags(root):
        reason = incomplete_reason(os.path.join(root, tag))
        if reason is None:
            return tag
        if report:
            print(f"jambatrain: WARNING: checkpoint {os.path.join(root, tag)} is incomplete ({reason}); it is left "
                  "in place and an older complete one is used", file=sys.stderr, flush=True)
    return None


def has_checkpoints(run_dir: str) -> bool:
    """Whether the run dir holds any checkpoint directory at all, complete or not."""
    root = ckpt_root(run_dir)
    return os.path.isdir(root) and any(t.startswith("step_") for t in os.listdir(root))


# ---------------------------------------------------------------- content checksums
def _hasher():
    import xxhash

    return xxhash.xxh3_128()


class _HashingWriter:
    """A file object that hashes what passes through it (torch.save and json writes stream through ``write``)."""

    def __init__(self, f):
        self.f, self.h = f, _hasher()

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()

    @property
    def name(self) -> str:  # the file's path, as a plain file object has (error messages, test hooks)
        return self.f.name


def file_checksum(path: str, chunk: int = 16 << 20) -> str:
    h = _hasher()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _checksums(tag_dir: str, rels: list[str], rank: int, world: int) -> dict[str, str]:
    """Checksums of ``rels`` (the same sorted list on every rank), each rank hashing a round-robin share; every
    rank returns all of them (a collective when ``world`` > 1)."""
    mine = {}
    for i, rel in enumerate(rels):
        if i % world == rank:
            try:
                mine[rel] = file_checksum(os.path.join(tag_dir, rel))
            except OSError as exc:
                mine[rel] = f"unreadable ({exc.strerror or exc})"
    out = {}
    for part in (_all_gather(mine) if world > 1 else [mine]):
        out.update(part)
    return out


def verify_reason(tag_dir: str, rank: int = 0, world: int = 1) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint with the contents its manifest records (None: it is). With
    ``world`` > 1 a collective: call it on every rank with the same arguments. A manifest without checksums (written
    before they existed) is checked by sizes only."""
    reason = incomplete_reason(tag_dir)
    if reason is not None:
        return reason
    with open(os.path.join(tag_dir, "manifest.json")) as f:
        manifest = json.load(f)
    expected = manifest.get("checksums")
    if not expected:
        return None
    got = _checksums(tag_dir, sorted(expected), rank, world)
    bad = [rel for rel in sorted(expected) if got.get(rel) != expected[rel]]
    if bad:
        return (f"contents differ from the manifest's {manifest.get('checksum', CHECKSUM)} checksum in "
                f"{len(bad)} file(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    return None


def _set_aside(path: str, suffix: str) -> str:
    """Rename ``path`` to ``path.<suffix>`` (kept, never pruned); a number is added if that name is taken."""
    dest, n = f"{path}.{suffix}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.{suffix}{n}"
    os.replace(path, dest)
    return dest


def _say(msg: str) -> None:
    print(f"jambatrain: {msg}", file=sys.stderr, flush=True)


def find_resumable(run_dir: str, rank: int = 0, world: int = 1, report: bool = True) -> str | None:
    """The newest tag that is complete and whose contents match their checksums (None: none). Newer tags that are
    not complete are reported and left in place; newer ones whose contents do not match are reported and moved
    aside to ``step_X.corrupt`` (by rank 0; kept, never pruned). A collective over the ranks when ``world`` > 1."""
    root = ckpt_root(run_dir)
    for tag in _tags(root):
        tag_dir = os.path.join(root, tag)
        reason = incomplete_reason(tag_dir)
        if world > 1:  # the ranks agree (a shared filesystem may show a tag late on one node)
            reason = next((r for r in _all_gather(reason) if r is not None), None)
        if reason is not None:
            if report:
                _say(f"WARNING: checkpoint {tag_dir} is incomplete ({reason}); it is left in place and an older "
                     "complete one is used")
            continue
        reason = verify_reason(tag_dir, rank, world)
        if reason is None:
            return tag
        if rank == 0:
            aside = _set_aside(tag_dir, "corrupt")
            _say(f"WARNING: checkpoint {tag_dir} is corrupt ({reason}); moved aside to {aside} (kept) and an older "
                 "checkpoint is used")
        barrier()
    return None


def leftovers(run_dir: str) -> tuple[list[str], list[str]]:
    """(dirs of saves that never committed: ``.partial``, tags without a manifest; every ``step_*`` dir that holds
    a manifest, i.e. was committed once, whatever became of it), under the checkpoints dir."""
    root = ckpt_root(run_dir)
    uncommitted, committed = [], []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not (name.startswith("step_") and os.path.isdir(path)) or _SET_ASIDE.search(name):
            continue
        (committed if os.path.isfile(os.path.join(path, "manifest.json")) else uncommitted).append(path)
    return uncommitted, committed


_SET_ASIDE = __import__("re").compile(r"\.(corrupt|rolled-back-|aborted-)")


def resolve_tag(run_dir: str, ref: str) -> str:
    """``trainer.resume_from``: a tag name (step_00000030), a step number (30) or the path of a tag dir of this run's
    checkpoints dir -> the tag name; SystemExit naming what exists when there is no such tag."""
    root = ckpt_root(run_dir)
    if ref.isdigit():
        tag = f"step_{int(ref):08d}"
    elif os.sep in ref or ref.startswith("."):
        path = os.path.abspath(ref.rstrip(os.sep))
        if os.path.dirname(path) != os.path.abspath(root):
            raise SystemExit(f"jambatrain: trainer.resume_from={ref} is not a checkpoint of this run ({root}); to "
                             "start a new run from another run's weights export them (jambatrain.export_hf) and use "
                             "model.init_from")
        tag = os.path.basename(path)
    else:
        tag = ref
    if not os.path.isdir(os.path.join(root, tag)):
        have = ", ".join(_tags(root)) or "none"
        raise SystemExit(f"jambatrain: trainer.resume_from={ref}: no checkpoint {os.path.join(root, tag)} (this run "
                         f"has: {have})")
    return tag


ROLLED_BACK = ".rolled_back.json"


def rolled_back(run_dir: str) -> dict | None:
    """The last ``trainer.resume_from`` applied to this run dir ({ref, tag, at}), if any."""
    try:
        with open(os.path.join(ckpt_root(run_dir), ROLLED_BACK)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def roll_back_to(run_dir: str, tag: str, ref: str) -> list[str]:
    """Move every tag newer than ``tag`` aside (``step_X.rolled-back-<UTC time>``, kept, never pruned) so that later
    restarts resume from ``tag`` and its successors, and record that ``ref`` was applied (a restart with the same
    command line does not roll back again); rank 0 only. Returns the new names."""
    import time

    root = ckpt_root(run_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = [_set_aside(os.path.join(root, t), f"rolled-back-{stamp}") for t in _tags(root) if t > tag]
    _fsync_write(os.path.join(root, "latest"), lambda f: f.write(tag.encode()))
    record = {"ref": ref, "tag": tag, "at": stamp, "moved": moved}
    _fsync_write(os.path.join(root, ROLLED_BACK), lambda f: f.write(json.dumps(record).encode()))
    return moved


# ---------------------------------------------------------------- files
def _fsync_write(path: str, write, sums: dict | None = None) -> int:
    """Write through ``write(fileobj)`` to ``path`` via a temp file, fsync, rename; returns the size. ``sums``: the
    checksum of the bytes written (hashed while writing, no second pass) goes to ``sums[basename]``."""
    if sums is None:
        return atomic_write(path, write, tmp=path + ".tmp")
    hashed = []

    def write_hashed(f):
        hashed.append(_HashingWriter(f))
        write(hashed[0])

    size = atomic_write(path, write_hashed, tmp=path + ".tmp")
    sums[os.path.basename(path)] = hashed[0].h.hexdigest()
    return size


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _all_gather(obj):
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        out = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, obj)
        return out
    return [obj]


# ---------------------------------------------------------------- fp32 masters and Adam moments
def _torch_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _full_state(engine, p: torch.Tensor, masters: dict) -> dict[str, torch.Tensor]:
    """fp32 master and Adam moments of ``p``, whole (collectives over ``p``'s ZeRO group), on the CPU. ``masters``:
    ``ds_compat.zero0_fp32_masters(engine)``."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if ds_compat.has_fp32_fragment(p):  # ZeRO-1/2, bf16 optimizer (mapping None where p has no
        vals = {"fp32": safe_get_full_fp32_param(p)}  # fragment on this rank), ZeRO-3
        for k in ADAM_KEYS:
            vals[k] = safe_get_full_optimizer_state(p, k)
    else:  # ZeRO-0: the torch optimizer steps the parameter (fp32) or DeepSpeed's fp32 copy of it (bf16)
        master = masters.get(p, p)
        st = _torch_optimizer(engine).state.get(master, {})
        vals = {"fp32": master.detach().float()}
        for k in ADAM_KEYS:
            vals[k] = st[k].detach().float() if k in st else torch.zeros_like(vals["fp32"])
    return {k: v.detach().cpu() for k, v in vals.items()}


def optimizer_states(engine, model) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 master and Adam moments (``fp32``, ``exp_avg``, ``exp_avg_sq``), whole, on the CPU, as
    a checkpoint saves them (collectives: every rank calls it; this rank's experts under expert parallelism)."""
    ds_compat.relink_optimizer_state(engine)
    masters = ds_compat.zero0_fp32_masters(engine)
    return {name: {k: v.clone() for k, v in _full_state(engine, p, masters).items()}  # copies: .cpu() aliases on CPU
            for name, p in model.named_parameters()}


def _adam_step(engine) -> float:
    for st in _torch_optimizer(engine).state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def _prepare_optimizer_state(engine, step: float) -> None:
    """A fresh engine has no Adam state until its first step: create it (zeros, ``step``) so it can be filled."""
    opt = _torch_optimizer(engine)
    fused = bool(opt.defaults.get("fused"))
    flats = ds_compat.fp32_partitions(engine)
    if flats is None:  # no ZeRO wrapper: the torch optimizer steps the parameters themselves
        flats = [p for g in opt.param_groups for p in g["params"]]
    for flat in flats:
        opt.state[flat] = {"step": torch.tensor(step, dtype=torch.float32, device=flat.device if fused else "cpu"),
                           "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    ds_compat.relink_optimizer_state(engine)


def _set_full_state(engine, p: torch.Tensor, vals: dict[str, torch.Tensor], masters: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if ds_compat.has_fp32_fragment(p, zero3=False):  # ZeRO-1/2 or bf16 optimizer (None where p has no fragment on this rank)
        safe_set_full_fp32_param(p, vals["fp32"].to(p.device))
        for k in ADAM_KEYS:
            safe_set_full_optimizer_state(p, vals[k].to(p.device), k)
    else:  # ZeRO-0: the parameter (fp32) or DeepSpeed's fp32 copy of it (bf16) is the master
        master = masters.get(p, p)
        st = _torch_optimizer(engine).state[master]
        for k in ADAM_KEYS:
            st[k].copy_(vals[k])
        if master is not p:
            with torch.no_grad():
                master.copy_(vals["fp32"])
    with torch.no_grad():
        p.copy_(vals["fp32"].to(p.dtype))  # the working (possibly bf16) copy every rank computes with


def expert_range(model, name: str) -> tuple[int, int] | None:
    """Global expert ids [lo, hi) held by parameter ``name`` (None: a dense parameter)."""
    from .models.moe import MoE

    owner, _, leaf = name.rpartition(".")
    m = model.get_submodule(owner) if owner else model
    return m.expert_range if isinstance(m, MoE) and leaf in ("w_gate", "w_up", "w_down") else None


def _save_params(engine, model, tag_dir: str, rank: int, world: int, ep) -> tuple[dict, dict, list, dict, dict]:
    """Every parameter's state, whole, written by one writer: dense parameters round-robin over all ranks,
    expert blocks round-robin over the ranks of their expert-data-parallel group. Returns (this rank's files
    with sizes, this rank's index entries {name: [[file, lo, hi], ...]}, write errors, the files' checksums, the
    state's statistics over what this rank wrote: {"sumsq": sum of the fp32 weights' squares, "nonfinite": names of
    entries with a NaN/inf weight or moment})."""
    ds_compat.relink_optimizer_state(engine)
    masters = ds_compat.zero0_fp32_masters(engine)
    files, index, buf, size, part, sums = {}, {}, {}, 0, 0, {}
    stats = {"sumsq": 0.0, "nonfinite": []}
    failed: list[str] = []  # a write that failed: this rank stops writing but keeps joining the collectives

    def flush():
        nonlocal buf, size, part
        if buf and not failed:
            rel = f"params_r{rank:05d}_{part:03d}.pt"
            try:
                files[rel] = _fsync_write(os.path.join(tag_dir, rel), lambda f, b=buf: torch.save(b, f), sums)
            except Exception as exc:  # noqa: BLE001 - ENOSPC surfaces from torch.save as a bare RuntimeError
                failed.append(_write_error(os.path.join(tag_dir, rel), exc))
            for key, (nm, lo, hi) in ((k, v["where"]) for k, v in buf.items()):
                index.setdefault(nm, []).append([rel, lo, hi])
        buf, size, part = {}, 0, part + 1

    dense_i = expert_i = 0
    for name, p in model.named_parameters():  # the same order on every rank: the gathers are collectives
        vals = _full_state(engine, p, masters)
        rng = expert_range(model, name)
        if rng is None:
            mine = dense_i % world == rank
            dense_i += 1
        else:
            edp_size = world // (ep.size if ep else 1)
            mine = expert_i % edp_size == (ep.edp_rank if ep else rank)
            expert_i += 1
        if mine:
            lo, hi = rng if rng else (None, None)
            buf[f"{name}@{lo}"] = {**vals, "where": (name, lo, hi)}
            size += sum(v.numel() * v.element_size() for v in vals.values())
            stats["sumsq"] += float(vals["fp32"].double().square().sum())
            if not all(bool(torch.isfinite(v).all()) for v in vals.values()):
                stats["nonfinite"].append(name if lo is None else f"{name}[experts {lo}:{hi}]")
            if size >= FILE_BYTES:
                flush()
    flush()
    return files, index, failed, sums, stats


def _write_error(path: str, exc: Exception) -> str:
    """What went wrong writing ``path``, with its cause and fix where that is known: a full disk (torch.save reports
    it as ``unexpected pos ...``, without the errno), the file size limit (``ulimit -f``: EFBIG, SIGXFSZ being
    ignored by Python), a read-only or unwritable directory."""
    import errno
    import resource

    try:
        free = shutil.disk_usage(os.path.dirname(path)).free
    except OSError:
        free = None
    code = exc.errno if isinstance(exc, OSError) else None
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    roomy = free is None or free >= (64 << 20)
    if code == errno.EFBIG or (fsize != resource.RLIM_INFINITY and code is None and roomy):
        why = (f"the file size limit (ulimit -f: {fsize} bytes) stopped the write; the disk has room. Raise the limit "
               "(ulimit -f unlimited) where the job starts")
    elif code == errno.ENOSPC or (code is None and free is not None and free < (64 << 20)):
        why = (f"no space left on the device ({free / 2**20:.0f} MiB free)" if free is not None else
               "no space left on the device") + ". Free space there (or point hydra.run.dir at a disk with room)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = (f"{os.strerror(code)}: the checkpoint directory is no longer writable (remounted read-only, or its "
               "permissions changed). Make it writable, or move the run dir to a writable disk")
    else:
        why = f"{type(exc).__name__}: {exc}"
    return f"{path}: {why}"


def _load_params(engine, model, tag_dir: str, manifest: dict) -> None:
    """Fill every parameter of this rank from the portable files, whatever layout wrote them (files are
    memory-mapped, so a rank reads the pages of the parts it needs)."""
    cache: dict[str, dict] = {}

    def entry(rel):
        if rel not in cache:
            cache[rel] = torch.load(os.path.join(tag_dir, rel), map_location="cpu", weights_only=True, mmap=True)
        return cache[rel]

    where = manifest["params"]
    _prepare_optimizer_state(engine, manifest["adam_step"])
    masters = ds_compat.zero0_fp32_masters(engine)
    for name, p in model.named_parameters():
        if name not in where:
            raise RuntimeError(f"checkpoint {tag_dir} holds no {name}: it was written by another model")
        rng = expert_range(model, name)
        if rng is None:
            rel, _, _ = where[name][0]
            vals = {k: v for k, v in entry(rel)[f"{name}@None"].items() if k != "where"}
        else:
            lo, hi = rng
            pieces = sorted((a, rel) for rel, a, b in where[name] if a < hi and b > lo)
            vals, covered = {k: [] for k in ("fp32",) + ADAM_KEYS}, lo
            for a, rel in pieces:
                e = entry(rel)[f"{name}@{a}"]
                b = e["where"][2]
                if max(lo, a) != covered:
                    break
                for k in vals:
                    vals[k].append(e[k][max(lo, a) - a:min(hi, b) - a])
                covered = min(hi, b)
            if covered != hi:
                raise RuntimeError(f"checkpoint {tag_dir}: experts [{lo}, {hi}) of {name} are not all there")
            vals = {k: torch.cat(v) for k, v in vals.items()}
        if tuple(vals["fp32"].shape) != tuple(p.shape):
            raise RuntimeError(f"checkpoint {tag_dir}: {name} is {tuple(vals['fp32'].shape)}, the model has "
                               f"{tuple(p.shape)}")
        _set_full_state(engine, p, vals, masters)


def portable_state_dict(tag_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a portable checkpoint as one state dict, experts whole (E, ffn, hidden)."""
    with open(os.path.join(tag_dir, "manifest.json")) as f:
        where = json.load(f)["params"]
    files: dict[str, dict] = {}
    sd = {}
    for name, parts in where.items():
        pieces = []
        for rel, lo, _ in sorted(parts, key=lambda p: -1 if p[1] is None else p[1]):
            if rel not in files:
                files[rel] = torch.load(os.path.join(tag_dir, rel), map_location="cpu", weights_only=True, mmap=True)
            pieces.append(files[rel][f"{name}@{lo}"]["fp32"])
        sd[name] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return sd


# ---------------------------------------------------------------- save / load
def save(engine, model, run_dir: str, state: TrainState, rank: int, keep: int, ep=None,
         max_weight_growth: float = 0.0) -> str:
    """Write checkpoint ``step_{state.step}`` by the commit protocol (module docstring); returns its directory.
    Nothing is published (SystemExit naming why, the previous checkpoints untouched) when a file cannot be written
    or the state fails ``state_problems`` (``max_weight_growth``: the weight norm's bound relative to the last
    checkpoint's, 0 = no bound)."""
    tag = f"step_{state.step:08d}"
    root = ckpt_root(run_dir)
    final, partial = os.path.join(root, tag), os.path.join(root, tag + ".partial")
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    failed, sums, stats = [], {}, {"sumsq": 0.0, "nonfinite": []}
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a save that died before its commit
            os.makedirs(partial)
        except OSError as exc:
            failed.append(_write_error(partial, exc))
    failed = [e for f in _all_gather(failed) for e in f]  # every rank learns that rank 0 could not make the dir
    if failed:
        _refuse(run_dir, final, partial, rank, failed)
    files, index = {}, {}
    rng_path = os.path.join(partial, f"rng_rank{rank}.pt")
    try:
        files[f"rng_rank{rank}.pt"] = _fsync_write(rng_path, lambda f: torch.save(_rng_state(), f), sums)
    except Exception as exc:  # noqa: BLE001
        failed.append(_write_error(rng_path, exc))
    zero3 = state.parallel.get("zero_stage") == 3
    if zero3:  # DeepSpeed's own partitioned format (its files are hashed below, a share per rank)
        try:
            engine.save_checkpoint(root, tag=tag + ".partial", save_latest=False)
        except Exception as exc:  # noqa: BLE001
            failed.append(_write_error(partial, exc))
        stats = _zero3_stats(model)
    else:
        mine, index, errors, psums, stats = _save_params(engine, model, partial, rank, world, ep)
        files.update(mine)
        sums.update(psums)
        failed += errors
    everyone = _all_gather((files, index, failed, sums, stats))  # also: every rank's files are on disk
    errors = [e for _, _, f, _, _ in everyone for e in f]
    if not errors:
        weight_norm = (sum(st["sumsq"] for *_, st in everyone) if not zero3 else stats["sumsq"]) ** 0.5
        errors = state_problems(weight_norm, [n for *_, st in everyone for n in st["nonfinite"]], state,
                                max_weight_growth, latest_tag(run_dir))
        state.weight_norm = weight_norm
    if errors:  # nothing is published: the partial tag goes, the previous checkpoints stay
        _refuse(run_dir, final, partial, rank, errors)
    if zero3:
        rels = sorted(os.path.relpath(os.path.join(d, n), partial) for d, _, ns in os.walk(partial) for n in ns)
        sums.update(_checksums(partial, rels, rank, world))
    if rank == 0:
        files, index = {}, {}
        for f, ix, _, sm, _ in everyone:
            files.update(f)
            sums.update(sm)
            for name, where in ix.items():
                index.setdefault(name, []).extend(where)
        try:
            files["train_state.json"] = _fsync_write(os.path.join(partial, "train_state.json"),
                                                     lambda f: f.write(json.dumps(asdict(state), indent=1).encode()),
                                                     sums)
            if zero3:  # DeepSpeed's files, listed after every rank returned from its save
                for dirpath, _, names in os.walk(partial):
                    for n in names:
                        rel = os.path.relpath(os.path.join(dirpath, n), partial)
                        files.setdefault(rel, os.path.getsize(os.path.join(dirpath, n)))
            else:
                # the schedule is a function of the step (optim.lr_at); its per-group state would tie the checkpoint
                # to this run's optimizer groups, which expert parallelism splits differently per topology
                sched = {"last_epoch": engine.lr_scheduler.last_epoch if engine.lr_scheduler else None}
                files["scheduler.pt"] = _fsync_write(os.path.join(partial, "scheduler.pt"),
                                                     lambda f: torch.save(sched, f), sums)
            manifest = {"format": FORMAT, "kind": "deepspeed-zero3" if zero3 else "portable", "step": state.step,
                        "adam_step": _adam_step(engine) if not zero3 else None, "files": files,
                        "checksum": CHECKSUM, "checksums": {rel: sums[rel] for rel in files}, "params": index}
            _fsync_write(os.path.join(partial, "manifest.json"), lambda f: f.write(json.dumps(manifest).encode()))
            _fsync_dir(partial)
            if os.path.isdir(final):  # an incomplete tag of the same step from an earlier attempt: set it aside
                os.replace(final, final + f".incomplete-{os.getpid()}")
            os.replace(partial, final)
            _fsync_dir(root)
            _fsync_write(os.path.join(root, "latest"), lambda f: f.write(tag.encode()))
            failed = []
        except OSError as exc:
            failed = [_write_error(partial, exc)]
    failed = [e for f in _all_gather(failed) for e in f]
    if failed:
        _refuse(run_dir, final, partial, rank, failed)
    if rank == 0:
        prune(root, keep, current=tag)
    barrier()
    return final


def _refuse(run_dir: str, final: str, partial: str, rank: int, errors: list[str]):
    """A save that is not published (on every rank): its partial files go, the previous checkpoints stay."""
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    previous = latest_tag(run_dir)
    kept = f"the last complete one, {previous}, is kept" if previous else "no earlier checkpoint exists"
    raise SystemExit(f"jambatrain: checkpoint {final} was not published (its partial files were removed); {kept}. "
                     "Fix the cause and restart (the run resumes from the last checkpoint):\n  - "
                     + "\n  - ".join(errors))


def state_problems(weight_norm: float, nonfinite: list[str], state: TrainState, max_growth: float,
                   previous_tag: str | None) -> list[str]:
    """Why the state about to be saved must not be checkpointed: a NaN/inf weight or Adam moment, or a weight norm
    more than ``max_growth`` x that of the last checkpoint (a divergent update with a finite loss; 0: no bound)."""
    fix = ("Roll back with trainer.resume_from=<an earlier step> and lower optim.lr (or raise "
           "optim.warmup_steps), or check the data")
    if nonfinite or not math.isfinite(weight_norm):
        names = ", ".join(nonfinite[:5]) + (" ..." if len(nonfinite) > 5 else "")
        return [f"step {state.step}'s state is not finite (NaN/inf in {names or 'the weights'}). {fix}"]
    ref = state.weight_norm
    if max_growth and ref and weight_norm > max_growth * ref:
        return [f"step {state.step}'s weights have norm {weight_norm:.4g}, {weight_norm / ref:.3g} x the last "
                f"checkpoint's {ref:.4g} ({previous_tag or 'the resumed one'}), over "
                f"trainer.save_max_weight_growth={max_growth:g}: a divergent update. {fix}"]
    return []


def _zero3_stats(model) -> dict:
    """ZeRO-3: the sum of squares of the fp32 partitions over all ranks (each element held once) and whether any
    is non-finite."""
    sumsq, bad = torch.zeros(1, dtype=torch.float64), []
    for name, p in model.named_parameters():
        t = getattr(p, "ds_tensor", p).detach()
        sumsq += t.double().square().sum().cpu()
        if not bool(torch.isfinite(t).all()):
            bad.append(name)
    if tdist.is_initialized():
        tdist.all_reduce(sumsq)
    return {"sumsq": float(sumsq), "nonfinite": [n for b in _all_gather(bad) for n in b]}


def prune(root: str, keep: int, current: str) -> None:
    """Keep the ``keep`` newest complete tags up to ``current``; never a newer tag, never an incomplete one, never
    one set aside (``.corrupt``, ``.rolled-back-*``, ``.aborted-*``). The leftovers of dead saves up to ``current``
    (``.partial`` dirs and same-step ``.incomplete-<pid>`` tags) go: ``current`` is complete and the run-dir lock
    means no live job writes them."""
    complete = [t for t in _tags(root) if t <= current and incomplete_reason(os.path.join(root, t)) is None]
    for t in complete[max(1, keep):]:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    for name in os.listdir(root):
        base, _, suffix = name.partition(".")
        if base.startswith("step_") and base <= current and (suffix == "partial" or suffix.startswith("incomplete-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_state(run_dir: str, tag: str) -> TrainState:
    with open(os.path.join(ckpt_root(run_dir), tag, "train_state.json")) as f:
        return TrainState(**json.load(f))


def load(engine, model, run_dir: str, tag: str, rank: int) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG; returns the train state (``check_resumable`` vetted it)."""
    tag_dir = os.path.join(ckpt_root(run_dir), tag)
    state = read_state(run_dir, tag)
    with open(os.path.join(tag_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest["kind"] == "deepspeed-zero3":
        load_path, _ = engine.load_checkpoint(ckpt_root(run_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    else:
        _load_params(engine, model, tag_dir, manifest)
        sched = torch.load(os.path.join(tag_dir, "scheduler.pt"), weights_only=True)
        ds_compat.set_schedule_position(engine, state.step, sched["last_epoch"])
    rng_file = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):  # a rank the writing run did not have starts from its seed stream
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


# ---------------------------------------------------------------- what may resume
def check_resumable(run_dir: str, tag: str, model_config: dict, world_size: int, zero_stage: int) -> list[str]:
    """What makes checkpoint ``tag`` unloadable by this run, from its train_state.json and manifest alone, so it
    is said before any data is prepared or model built (each problem with its fix; empty when it can resume)."""
    state = read_state(run_dir, tag)
    tag_dir = os.path.join(ckpt_root(run_dir), tag)
    with open(os.path.join(tag_dir, "manifest.json")) as f:
        kind = json.load(f)["kind"]
    problems = []
    diff = architecture_changes(state.model_config, model_config)  # run-time knobs (models/config.py) may change
    if diff:
        problems.append(f"checkpoint {tag_dir} was trained with a different model config (key: checkpoint vs "
                        f"now): {diff}. Use a new run dir (hydra.run.dir=...), remove {run_dir} to start afresh, or "
                        "pass model overrides matching the checkpoint.")
    saved_world = state.parallel.get("world_size")
    if kind == "deepspeed-zero3" and zero_stage != 3:
        problems.append(f"checkpoint {tag_dir} was written by ZeRO-3 (DeepSpeed's partitioned format); this run has "
                        f"parallel.zero_stage={zero_stage}. Resume with parallel.zero_stage=3 on {saved_world} ranks")
    elif kind == "deepspeed-zero3" and saved_world != world_size:
        problems.append(f"checkpoint {tag_dir} was written by ZeRO-3 on {saved_world} ranks, whose partitioned "
                        f"format only loads on the same number; this run has {world_size}. Resume on {saved_world} "
                        "ranks, or train with ZeRO-1/2, whose checkpoints load on any number of ranks")
    elif kind != "deepspeed-zero3" and zero_stage == 3:
        problems.append(f"checkpoint {tag_dir} was written by ZeRO-{state.parallel.get('zero_stage')}; loading it "
                        "into ZeRO-3 is not supported: resume with parallel.zero_stage=1 or 2 (any world size)")
    return problems


def checkpoint_bytes(num_params: int, zero_stage: int, world_size: int) -> int:
    """Bytes one checkpoint takes on disk: fp32 master + 2 Adam moments per parameter (portable); ZeRO-3 also
    writes the bf16/fp32 weights (DeepSpeed's files); plus per-rank RNG state."""
    per_param = 14 if zero_stage == 3 else 12
    return per_param * num_params + world_size * (64 << 10)


def storage_problems(run_dir: str, need_bytes: int) -> list[str]:
    """Whether the checkpoint directory can be written and has room for one more checkpoint (the older ones are
    pruned only after it is complete), said before any work."""
    root = ckpt_root(run_dir)
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_test.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as exc:
        return [f"the checkpoint directory {root} is not writable ({exc.strerror or exc}): fix its permissions or "
                "point hydra.run.dir somewhere writable"]
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        return [f"the checkpoint directory {root} has {free / 2**30:.2f} GiB free but one checkpoint of this model "
                f"takes about {need_bytes / 2**30:.2f} GiB: free space there, point hydra.run.dir at a larger disk, or "
                "set trainer.save_every=0 (no checkpoints)"]
    return []


def resume_grad_accum(saved: dict, world_size: int, micro_batch_size: int, grad_accum_steps: int,
                      ) -> tuple[int, str | None]:
    """The gradient accumulation that keeps the checkpoint's global batch (sequences per optimizer step) on
    ``world_size`` data-parallel replicas (``ParallelDims.dp`` = ranks / context_parallel_size: a cp group shares its
    sequences): (steps, None), or (the configured steps, the problem with its fix) when it cannot."""
    global_batch = saved.get("global_batch")
    if not global_batch or micro_batch_size * grad_accum_steps * world_size == global_batch:
        return grad_accum_steps, None
    per_step = micro_batch_size * world_size
    if global_batch % per_step == 0:
        return global_batch // per_step, None
    return grad_accum_steps, (
        f"the checkpoint's global batch is {global_batch} sequences per step; {world_size} data-parallel replicas x "
        f"parallel.micro_batch_size={micro_batch_size} cannot make it with whole accumulation steps: choose a micro "
        f"batch size m with {global_batch} divisible by m x {world_size}")
