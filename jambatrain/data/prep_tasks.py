"""Corpus preparation split over N tasks (a SLURM array, or machines sharing a filesystem), with the result
byte-identical to one ``write_shards`` process over the same inputs.

Task ``k`` of ``N`` (``tasks.py``'s three stages, all run by ``write_shards_task``):

1. tokenize: the input files ``i`` with ``i % N == k`` (sorted file list), each into ``OUT/.work/NNNNNN.bin``
   (its documents' tokens + EOS, int32) and ``NNNNNN.lens.npy`` (tokens per document; written last, so a task
   killed mid-file redoes only that file);
2. pack: once every file is tokenized (the task waits for the others), the split streams are known exactly (the
   documents' global order, which split each belongs to, their lengths), so task ``k`` writes the shards ``j``
   with ``j % N == k`` of each split (identical files are not rewritten) and lists them in ``entries-K.json``;
3. finish (task 0): once every task listed its shards, one ``manifest.json`` (the one ``write_shards`` writes),
   the tokenizer copy, and ``.work`` removed.

Re-running a task resumes it; re-running after ``manifest.json`` exists re-verifies nothing and returns it (use
``write_shards`` on the directory to re-verify and repair).
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import time

import numpy as np

from jambatrain.data.shards import (MANIFEST, SPLITS, ShardDataError, _split_summary, _write_json,
                                    samples_for_size, shard_name, tokenize_documents, write_shard_file)
from jambatrain.data.tokenizer import expand_inputs, file_sha256, iter_documents, load_tokenizer

WORK = ".work"


class Progress:
    """Prints ``label: done/total MB (pct), N tokens, X tokens/s, ETA`` to stderr at most every ``every`` s."""

    def __init__(self, label: str, total_bytes: int, every: float = 10.0):
        self.label, self.total, self.every = label, max(1, total_bytes), every
        self.start = self.last = time.monotonic()
        self.done_bytes, self.tokens = 0, 0

    def update(self, done_bytes: int, tokens: int, force: bool = False) -> None:
        self.done_bytes, self.tokens = min(done_bytes, self.total), tokens
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            frac = self.done_bytes / self.total
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
            print(f"{self.label}: {self.done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB ({100 * frac:.0f}%), "
                  f"{self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tokens/s, ETA {_duration(eta)}",
                  file=sys.stderr, flush=True)

    def summary(self, workers: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.label}: {self.tokens:,} tokens in {elapsed:.1f} s: {self.tokens / elapsed:,.0f} tokens/s "
                f"({self.tokens / elapsed / max(1, workers):,.0f} per tokenizer process)")


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def build_config(paths: list[str], tokenizer_path: str, seq_len: int, samples_per_shard: int,
                 val_fraction: float) -> dict:
    """The ``config`` of the manifest (the same dict ``write_shards`` records)."""
    import hashlib

    inputs_sha = hashlib.sha256(json.dumps([[p, os.path.getsize(p)] for p in paths]).encode()).hexdigest()
    return {"seq_len": seq_len, "samples_per_shard": samples_per_shard, "val_fraction": val_fraction,
            "tokenizer_sha256": file_sha256(tokenizer_path), "inputs_sha256": inputs_sha,
            "num_input_files": len(paths)}


def _wait(what: str, ready, timeout_s: float, poll_s: float = 2.0) -> None:
    t0, said = time.monotonic(), False
    while not ready():
        if time.monotonic() - t0 > timeout_s:
            raise ShardDataError(f"waited {timeout_s:.0f} s for {what}: check that every task of the array runs "
                                 "(a task that died: re-run it with the same --task-index)")
        if not said:
            print(f"write_shards: waiting for {what}", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)


def tokenize_files(paths: list[str], tokenizer_path: str, work: str, task_index: int, num_tasks: int,
                   num_workers: int) -> Progress:
    mine = [i for i in range(len(paths)) if i % num_tasks == task_index]
    progress = Progress(f"tokenize [task {task_index}/{num_tasks}]", sum(os.path.getsize(paths[i]) for i in mine))
    done_bytes = 0
    for i in mine:
        lens_path = os.path.join(work, f"{i:06d}.lens.npy")
        size = os.path.getsize(paths[i])
        if os.path.isfile(lens_path):  # finished by an earlier attempt
            done_bytes += size
            continue
        lens: list[int] = []
        chars = {"n": 0}

        def docs():
            for index, _, text in iter_documents([paths[i]]):
                lens.append(0)
                chars["n"] += len(text or "")
                if text:
                    yield index, text

        tmp = os.path.join(work, f".{i:06d}.bin.tmp")
        with open(tmp, "wb") as f:
            for index, tokens in tokenize_documents(docs(), tokenizer_path, num_workers):
                lens[index] = len(tokens)
                f.write(tokens.tobytes())
                progress.update(done_bytes + min(chars["n"], size), progress.tokens + len(tokens))
        os.replace(tmp, os.path.join(work, f"{i:06d}.bin"))
        np.save(os.path.join(work, f".{i:06d}.lens.tmp.npy"), np.asarray(lens, dtype=np.int64))
        os.replace(os.path.join(work, f".{i:06d}.lens.tmp.npy"), lens_path)
        done_bytes += size
        progress.update(done_bytes, progress.tokens)
    progress.update(done_bytes, progress.tokens, force=True)
    return progress


class _SplitStream:
    """One split's token stream over the tokenized files: its documents in global order."""

    def __init__(self, work: str, file_lens: list[np.ndarray], split: str, val_fraction: float):
        self.work = work
        doc_file = np.concatenate([np.full(len(x), i, dtype=np.int64) for i, x in enumerate(file_lens)])
        doc_start = np.concatenate([np.cumsum(x) - x for x in file_lens])  # token offset inside its file
        lens = np.concatenate(file_lens)
        index = np.arange(len(lens))
        val = np.floor((index + 1) * val_fraction) > np.floor(index * val_fraction)  # is_val_document, vectorized
        keep = (val == (split == "val")) & (lens > 0)
        self.doc, self.file, self.file_start, self.lens = index[keep], doc_file[keep], doc_start[keep], lens[keep]
        self.start = np.cumsum(self.lens) - self.lens  # of each document in the split stream
        self.total = int(self.lens.sum())
        self._maps: dict[int, np.ndarray] = {}

    def _tokens(self, f: int) -> np.ndarray:
        if f not in self._maps:
            self._maps[f] = np.memmap(os.path.join(self.work, f"{f:06d}.bin"), dtype=np.int32, mode="r")
        return self._maps[f]

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens ``[a, b)`` of the split stream."""
        parts, i = [], int(np.searchsorted(self.start, a, side="right")) - 1
        while a < b:
            off = a - int(self.start[i])
            n = min(b - a, int(self.lens[i]) - off)
            s = int(self.file_start[i]) + off
            parts.append(self._tokens(int(self.file[i]))[s:s + n])
            a, i = a + n, i + 1
        return np.concatenate(parts).astype(np.int32)

    def where(self, t: int) -> tuple[int, int]:
        """(document index, token offset in it) of stream position ``t < total``."""
        i = int(np.searchsorted(self.start, t, side="right")) - 1
        return int(self.doc[i]), t - int(self.start[i])


def _next(stream: _SplitStream, t: int, finishing: bool) -> list[int]:
    """Where the shard after the one ending at stream position ``t`` starts, as ``SplitWriter`` records it: the
    next buffered token, or ``[last document added + 1, 0]`` when nothing is buffered."""
    if t < stream.total:
        doc, off = stream.where(t)
        if off or finishing:
            return [doc, off]
    return [stream.where(t - 1)[0] + 1, 0]


def pack_shards(work: str, out_dir: str, paths: list[str], task_index: int, num_tasks: int, config: dict) -> None:
    file_lens = [np.load(os.path.join(work, f"{i:06d}.lens.npy")) for i in range(len(paths))]
    window, per_shard = config["seq_len"] + 1, config["samples_per_shard"]
    entries: dict[str, dict] = {}
    for split in SPLITS:
        stream = _SplitStream(work, file_lens, split, config["val_fraction"])
        windows = stream.total // window
        shards = math.ceil(windows / per_shard)
        entries[split] = {"total_tokens": stream.total, "num_shards": shards, "shards": []}
        for j in range(task_index, shards, num_tasks):
            first, last = j * per_shard, min((j + 1) * per_shard, windows)
            tokens = stream.read(first * window, last * window).reshape(-1, window)
            entry = write_shard_file(out_dir, shard_name(split, j), first, (np.ascontiguousarray(w) for w in tokens))
            entry["next"] = _next(stream, last * window, finishing=last - first < per_shard)
            entries[split]["shards"].append(entry)
    _write_json(os.path.join(work, f"entries-{task_index:05d}.json"), entries)


def finish(work: str, out_dir: str, tokenizer_path: str, num_tasks: int, config: dict) -> dict:
    parts = []
    for k in range(num_tasks):
        with open(os.path.join(work, f"entries-{k:05d}.json")) as f:
            parts.append(json.load(f))
    sp = load_tokenizer(tokenizer_path)
    splits = {}
    for split in SPLITS:
        shards = sorted((e for p in parts for e in p[split]["shards"]), key=lambda e: e["name"])
        total, expected = parts[0][split]["total_tokens"], parts[0][split]["num_shards"]
        if len(shards) != expected:
            raise ShardDataError(f"{split}: the tasks listed {len(shards)} shards, expected {expected}: re-run the "
                                 "tasks (the build is inconsistent)")
        n = sum(s["num_samples"] for s in shards)
        splits[split] = _split_summary(shards, config["seq_len"], total - n * (config["seq_len"] + 1))
    if splits["train"]["num_samples"] == 0:
        raise ShardDataError(empty_message(config, splits["train"]["dropped_tail_tokens"]))
    local_tok = os.path.join(out_dir, "tokenizer.model")
    if not os.path.exists(local_tok) or not os.path.samefile(tokenizer_path, local_tok):
        shutil.copyfile(tokenizer_path, local_tok)
    manifest = {
        "format": 1, "seq_len": config["seq_len"], "vocab_size": sp.get_piece_size(), "eos_id": sp.eos_id(),
        "tokenizer": {"path": "tokenizer.model", "source": os.path.abspath(tokenizer_path),
                      "sha256": config["tokenizer_sha256"]},
        "config": config, "splits": splits,
    }
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def empty_message(config: dict, tokens: int) -> str:
    return (f"the inputs give 0 train samples ({config['num_input_files']} files, {tokens} train tokens, fewer than "
            f"seq_len + 1 = {config['seq_len'] + 1}): check --inputs (empty files? the wrong column/field?) or lower "
            "--seq-len")


def write_shards_task(inputs: list[str] | str, tokenizer_path: str, out_dir: str, seq_len: int, task_index: int,
                      num_tasks: int, samples_per_shard: int | None = None, target_shard_mb: float = 64.0,
                      num_workers: int = 2, val_fraction: float = 0.01, stage: str = "all",
                      wait_timeout_s: float = 7 * 24 * 3600.0, vocab_size: int | None = None) -> dict | None:
    """Task ``task_index`` of ``num_tasks`` (see the module doc); ``stage`` ``tokenize`` / ``pack`` / ``all``
    (``pack`` and ``all`` wait for the stages before them). Returns the manifest from task 0, else None."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} outside [0, --num-tasks={num_tasks})")
    paths = expand_inputs(inputs)
    manifest_path = os.path.join(out_dir, MANIFEST)
    samples_per_shard = samples_per_shard or samples_for_size(seq_len, target_shard_mb)
    config = build_config(paths, tokenizer_path, seq_len, samples_per_shard, val_fraction)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("config") != config:
            raise ShardDataError(f"{out_dir} holds shards built with other settings ({manifest.get('config')}, now "
                                 f"{config}): use another --out directory")
        return manifest if task_index == 0 else None
    sp = load_tokenizer(tokenizer_path)
    if sp.eos_id() < 0:
        raise ShardDataError(f"tokenizer {tokenizer_path} has no EOS piece: retrain it with eos_id=2")
    if vocab_size is not None and sp.get_piece_size() > vocab_size:
        raise ShardDataError(f"tokenizer {tokenizer_path} has {sp.get_piece_size()} pieces > vocab_size={vocab_size}: "
                             "retrain the tokenizer with a smaller vocab or raise vocab_size")
    work = os.path.join(out_dir, WORK)
    os.makedirs(work, exist_ok=True)
    config_path = os.path.join(work, "config.json")
    if not os.path.isfile(config_path):
        _write_json(config_path, {"config": config, "num_tasks": num_tasks})
    with open(config_path) as f:
        recorded = json.load(f)
    if recorded != {"config": config, "num_tasks": num_tasks}:
        raise ShardDataError(f"{work} belongs to a build with other settings ({recorded}): finish that one, or "
                             f"delete {work}")
    if stage in ("tokenize", "all"):
        progress = tokenize_files(paths, tokenizer_path, work, task_index, num_tasks, num_workers)
        print(progress.summary(num_workers), file=sys.stderr, flush=True)
    if stage == "tokenize":
        return None
    _wait(f"the tokenization of all {len(paths)} input files (the other tasks)",
          lambda: all(os.path.isfile(os.path.join(work, f"{i:06d}.lens.npy")) for i in range(len(paths))),
          wait_timeout_s)
    pack_shards(work, out_dir, paths, task_index, num_tasks, config)
    if task_index != 0:
        return None
    _wait(f"the shards of all {num_tasks} tasks",
          lambda: len(glob.glob(os.path.join(work, "entries-*.json"))) >= num_tasks, wait_timeout_s)
    return finish(work, out_dir, tokenizer_path, num_tasks, config)
