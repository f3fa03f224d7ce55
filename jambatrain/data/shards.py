"""Tokenize documents, pack them into fixed windows and write webdataset shards.

Layout of a data directory::

    manifest.json          written last: its presence means the build is complete
    tokenizer.model        copy of the tokenizer used (absent for synthetic data)
    train-000000.tar ...   samples {"__key__": "%010d" % index_in_split,
    val-000000.tar ...              "tokens.npy": int32 array of seq_len + 1 tokens}

Every document gets an EOS appended; the documents of a split are concatenated
and cut into non-overlapping ``seq_len + 1`` windows, the trailing partial
window is dropped. Document ``i`` goes to the val split iff
``floor((i + 1) * val_fraction) > floor(i * val_fraction)`` (exactly every
``1/val_fraction``-th document), so no document is shared by the two splits.

Resuming: ``progress.json`` records every finished shard with the (document,
token offset) where the next shard starts, so a re-run tokenizes only from
the first unfinished shard on; an existing shard file with the same bytes is
never rewritten. Shards are written to a temporary name and renamed. A re-run on
a complete build re-verifies every shard (and the tokenizer copy) by sha256 and
rewrites the build from the first damaged shard on: that is how shards are repaired.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from typing import Callable, Iterable, Iterator

import numpy as np

from jambatrain.data.tokenizer import expand_inputs, file_sha256, iter_documents, load_tokenizer
from jambatrain.fileio import atomic_write

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")
BUILD_HINT = "python -m data_prep.write_shards --inputs GLOB --tokenizer TOK.model --out {dir} --seq-len N"
REPAIR_HINT = ("re-run the write_shards command that built them (it re-verifies every shard and rewrites the bad "
               "ones; python -m data_prep.default_corpus for the built-in corpus)")


class ShardDataError(ValueError):
    """Missing, inconsistent or corrupt token shard data."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def samples_for_size(seq_len: int, target_shard_mb: float) -> int:
    """Samples per shard so that a shard is about ``target_shard_mb`` MiB."""
    sample_bytes = 512 + 512 * math.ceil((128 + 4 * (seq_len + 1)) / 512)  # tar header + npy payload
    return max(1, int(target_shard_mb * 2**20) // sample_bytes)


def is_val_document(doc_index: int, val_fraction: float) -> bool:
    return math.floor((doc_index + 1) * val_fraction) > math.floor(doc_index * val_fraction)


def _write_json(path: str, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def write_shard_file(out_dir: str, name: str, first_index: int, samples: Iterable[np.ndarray]) -> dict:
    """Write one shard atomically (skipped if an identical file exists); return its manifest entry."""
    import webdataset as wds  # imports torch: keep it out of module import (fast CLI --help)

    buf = io.BytesIO()
    count = 0
    with wds.TarWriter(buf, mtime=0, compress=False) as writer:
        for count, tokens in enumerate(samples, 1):
            writer.write({"__key__": f"{first_index + count - 1:010d}", "tokens.npy": tokens})
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    _write_if_changed(out_dir, name, data, sha)
    entry = {"name": name, "num_samples": count, "sha256": sha, "bytes": len(data), "first_index": first_index}
    record = record_layout(data, count)
    if record:  # fixed-size records: a reader can fetch (and verify) one sample's bytes alone
        index = record_digests(data, count, record)
        entry["record_bytes"] = record
        entry["index"] = {"name": index_name(name), "sha256": hashlib.sha256(index).hexdigest()}
        _write_if_changed(out_dir, index_name(name), index, entry["index"]["sha256"])
    return entry


def _write_if_changed(out_dir: str, name: str, data: bytes, sha: str) -> None:
    path = os.path.join(out_dir, name)
    if not (os.path.isfile(path) and os.path.getsize(path) == len(data) and file_sha256(path) == sha):
        atomic_write(path, data, tmp=os.path.join(out_dir, f".{name}.tmp"))  # stale ones: cleaned below


INDEX_DIGEST = 16  # bytes of blake2b per record in a shard's .idx file


def index_name(shard: str) -> str:
    """The record index of shard ``train-000000.tar``: ``train-000000.idx`` (one blake2b-128 per sample)."""
    return shard[: -len(".tar")] + ".idx" if shard.endswith(".tar") else shard + ".idx"


def record_digest(record: bytes) -> bytes:
    return hashlib.blake2b(record, digest_size=INDEX_DIGEST).digest()


def record_digests(data: bytes, count: int, record: int) -> bytes:
    return b"".join(record_digest(data[i * record:(i + 1) * record]) for i in range(count))


def record_layout(data: bytes, count: int) -> int | None:
    """The fixed record size of a shard whose ``count`` samples are each one tar member of the same size at
    ``i * record`` (a 512-byte header, then the payload padded to 512), or None if the tar is laid out otherwise."""
    import tarfile

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError:
        return None
    if count == 0 or len(members) != count:
        return None
    record = 512 + -(-members[0].size // 512) * 512
    for i, m in enumerate(members):
        if m.offset != i * record or m.offset_data != i * record + 512 or m.size != members[0].size:
            return None
    return record


class SplitWriter:
    """Packs one split's token stream into ``seq_len + 1`` windows and writes shards."""

    def __init__(self, out_dir: str, split: str, seq_len: int, samples_per_shard: int,
                 done_shards: list[dict] = (), on_shard: Callable[[], None] | None = None):
        self.out_dir, self.split, self.window = out_dir, split, seq_len + 1
        self.samples_per_shard = samples_per_shard
        self.shards = list(done_shards)
        self.start = tuple(self.shards[-1]["next"]) if self.shards else (0, 0)
        self.on_shard = on_shard
        self.segments: deque[list] = deque()  # [doc_index, token_offset, tokens]
        self.buffered = 0
        self.windows: list[np.ndarray] = []
        self.last_doc = self.start[0] - 1

    def add(self, doc_index: int, tokens: np.ndarray) -> None:
        """Append the tokens (EOS included) of document ``doc_index``."""
        if doc_index < self.start[0]:
            return
        offset = self.start[1] if doc_index == self.start[0] else 0
        self.last_doc = doc_index
        if len(tokens) > offset:
            self.segments.append([doc_index, offset, tokens[offset:]])
            self.buffered += len(tokens) - offset
        while self.buffered >= self.window:
            self.windows.append(self._take(self.window))
            if len(self.windows) == self.samples_per_shard:
                self._flush()

    def finish(self) -> int:
        """Write the last (partial) shard; return the number of dropped tail tokens."""
        if self.windows:
            self._flush()
        return self.buffered

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n:
            seg = self.segments[0]
            part = seg[2][:n]
            parts.append(part)
            n -= len(part)
            self.buffered -= len(part)
            if len(part) == len(seg[2]):
                self.segments.popleft()
            else:
                seg[1] += len(part)
                seg[2] = seg[2][len(part):]
        return np.concatenate(parts).astype(np.int32, copy=False)

    def _flush(self) -> None:
        first = sum(s["num_samples"] for s in self.shards)
        entry = write_shard_file(self.out_dir, shard_name(self.split, len(self.shards)), first, self.windows)
        head = self.segments[0][:2] if self.segments else [self.last_doc + 1, 0]
        entry["next"] = [int(head[0]), int(head[1])]
        self.shards.append(entry)
        self.windows = []
        if self.on_shard is not None:
            self.on_shard()


_WORKER_SP = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_SP
    _WORKER_SP = load_tokenizer(tokenizer_path)


def _encode(item: tuple[int, str]) -> tuple[int, np.ndarray]:
    index, text = item
    ids = _WORKER_SP.encode(text)
    ids.append(_WORKER_SP.eos_id())
    return index, np.asarray(ids, dtype=np.int32)


def tokenize_documents(docs: Iterable[tuple[int, str]], tokenizer_path: str, num_workers: int,
                       block_chars: int = 1 << 25) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(doc_index, tokens + [eos])`` in input order, tokenizing in a process pool.

    The pool's workers are spawned, never forked: the caller may be a trainer whose process group (gloo) and
    intra-op threads already run, and a child forked while another thread holds a lock (allocator, OpenMP, gloo)
    waits for it forever."""
    if num_workers <= 1:
        _init_worker(tokenizer_path)
        yield from map(_encode, docs)
        return
    with mp.get_context("spawn").Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        block, chars = [], 0
        for item in docs:
            block.append(item)
            chars += len(item[1])
            if chars >= block_chars or len(block) >= 4096:
                yield from pool.imap(_encode, block, chunksize=max(1, len(block) // (8 * num_workers)))
                block, chars = [], 0
        yield from pool.imap(_encode, block, chunksize=max(1, len(block) // (8 * num_workers)))


def shard_file_problem(data_dir: str, entry: dict, checksum: bool = False) -> str | None:
    """Why the file of manifest entry ``entry`` is unusable (missing, wrong size, with ``checksum`` a sha256
    that differs from the manifest), or None."""
    path = os.path.join(data_dir, entry["name"])
    if not os.path.isfile(path):
        return f"shard {path} listed in {os.path.join(data_dir, MANIFEST)} is missing"
    if "bytes" in entry and os.path.getsize(path) != entry["bytes"]:
        return (f"shard {path} has {os.path.getsize(path)} bytes, {os.path.join(data_dir, MANIFEST)} says "
                f"{entry['bytes']}: it is truncated or was replaced")
    if checksum and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return f"shard {path}: sha256 differs from the manifest (file corrupt or replaced)"
    if checksum and isinstance(entry.get("index"), dict):
        index = os.path.join(data_dir, entry["index"]["name"])
        if not os.path.isfile(index) or file_sha256(index) != entry["index"]["sha256"]:
            return f"record index {index} of shard {path} is missing or differs from the manifest's sha256"
    return None


def damaged_shards(data_dir: str, manifest: dict) -> list[str]:
    """One message per shard of ``manifest`` whose file is missing or differs from its sha256 (reads them all)."""
    return [problem for info in manifest["splits"].values() for entry in info["shards"]
            if (problem := shard_file_problem(data_dir, entry, checksum=True))]


def tokenizer_problem(data_dir: str, manifest: dict, path: str | None = None) -> str | None:
    """Why the tokenizer (``path``, default the data dir's copy) is not the one the shards were tokenized with
    (its sha256 differs from the manifest's, or it is missing), or None. Synthetic data has no tokenizer."""
    info = manifest.get("tokenizer")
    if not isinstance(info, dict) or not info.get("sha256"):
        return None
    path = path or os.path.join(data_dir, info.get("path", "tokenizer.model"))
    source = f" (it was copied from {info['source']})" if info.get("source") else ""
    if not os.path.isfile(path):
        return (f"tokenizer {path} listed in {os.path.join(data_dir, MANIFEST)} is missing: copy back the "
                f"tokenizer the shards were built with{source}, or rebuild the shards")
    sha = file_sha256(path)
    if sha != info["sha256"]:
        return (f"tokenizer {path} has sha256 {sha[:12]}... but {os.path.join(data_dir, MANIFEST)} says "
                f"{info['sha256'][:12]}...: it was replaced after the shards were tokenized. Put back the "
                f"tokenizer the shards were built with{source}, or re-run write_shards with the new tokenizer "
                "into a fresh --out directory")
    return None


def _valid_prefix(out_dir: str, shards: list[dict]) -> list[dict]:
    """The leading shards whose files exist with the recorded sha256."""
    good = []
    for entry in shards:
        if "next" not in entry or shard_file_problem(out_dir, entry, checksum=True):
            break
        good.append(entry)
    return good


def _split_summary(shards: list[dict], seq_len: int, dropped: int = 0) -> dict:
    n = sum(s["num_samples"] for s in shards)
    return {"num_samples": n, "num_tokens": n * (seq_len + 1), "dropped_tail_tokens": dropped,
            "shards": shards}


def write_shards(inputs: list[str] | str, tokenizer_path: str, out_dir: str, seq_len: int,
                 samples_per_shard: int | None = None, target_shard_mb: float = 64.0,
                 num_workers: int = 2, val_fraction: float = 0.01, vocab_size: int | None = None,
                 overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` (globs) into train/val shards in ``out_dir``; return the manifest.

    Re-running with the same arguments returns the existing manifest, or resumes
    an interrupted build. Different arguments on an existing directory raise
    ``ShardDataError`` unless ``overwrite=True``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = expand_inputs(inputs)
    sp = load_tokenizer(tokenizer_path)
    tok_vocab, eos_id = sp.get_piece_size(), sp.eos_id()
    if eos_id < 0:
        raise ShardDataError(f"tokenizer {tokenizer_path} has no EOS piece: retrain it with eos_id=2")
    if vocab_size is not None and tok_vocab > vocab_size:
        raise ShardDataError(f"tokenizer {tokenizer_path} has {tok_vocab} pieces > vocab_size={vocab_size}: "
                             "retrain the tokenizer with a smaller vocab or raise vocab_size")
    samples_per_shard = samples_per_shard or samples_for_size(seq_len, target_shard_mb)
    tok_sha = file_sha256(tokenizer_path)
    inputs_sha = hashlib.sha256(json.dumps([[p, os.path.getsize(p)] for p in paths]).encode()).hexdigest()
    config = {"seq_len": seq_len, "samples_per_shard": samples_per_shard, "val_fraction": val_fraction,
              "tokenizer_sha256": tok_sha, "inputs_sha256": inputs_sha, "num_input_files": len(paths)}
    os.makedirs(out_dir, exist_ok=True)
    manifest_path, progress_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PROGRESS)
    if overwrite:
        old = [p for s in SPLITS for ext in ("tar", "idx") for p in glob.glob(os.path.join(out_dir, f"{s}-*.{ext}"))]
        for path in [manifest_path, progress_path, *old]:
            if os.path.isfile(path):
                os.remove(path)
    previous = None
    for path in (manifest_path, progress_path):
        if os.path.isfile(path):
            with open(path) as f:
                previous = json.load(f)
            break
    if previous is not None and previous.get("config") != config:
        raise ShardDataError(f"{out_dir} holds shards built with other settings ({previous.get('config')}, "
                             f"now {config}): use another --out directory or pass --overwrite")
    if previous is not None and os.path.isfile(manifest_path):
        try:  # every shard re-verified by sha256: a bit flip keeps a file's size
            problems = damaged_shards(out_dir, read_manifest(out_dir, check_files=False, check_tokenizer=False))
            problems += filter(None, [tokenizer_problem(out_dir, previous)])
        except (ShardDataError, KeyError, TypeError) as exc:
            problems = [f"{manifest_path}: {exc}"]
        if not problems:
            return add_record_indexes(out_dir, previous)
        for problem in problems:  # resume from the first bad shard; identical later files are kept
            print(f"write_shards: {problem}: rewriting it", file=sys.stderr)
    for stale in glob.glob(os.path.join(out_dir, ".*.tmp")):
        os.remove(stale)
    if os.path.isfile(manifest_path):
        os.remove(manifest_path)
    local_tok = os.path.join(out_dir, "tokenizer.model")
    if not os.path.exists(local_tok) or not os.path.samefile(tokenizer_path, local_tok):
        shutil.copyfile(tokenizer_path, local_tok)

    done = {s: _valid_prefix(out_dir, previous["splits"][s]["shards"]) if previous else [] for s in SPLITS}
    writers: dict[str, SplitWriter] = {}

    def save_progress() -> None:
        _write_json(progress_path, {"config": config, "splits": {
            s: {"shards": w.shards} for s, w in writers.items()}})

    for split in SPLITS:
        writers[split] = SplitWriter(out_dir, split, seq_len, samples_per_shard, done[split], save_progress)
    first_doc = min(w.start[0] for w in writers.values())

    from jambatrain.data.prep_tasks import Progress, empty_message

    sizes = {p: os.path.getsize(p) for p in paths}
    before = dict(zip(paths, np.cumsum([0] + [sizes[p] for p in paths[:-1]]).tolist()))
    progress = Progress("write_shards", sum(sizes.values()))
    read = {"path": paths[0], "chars": 0}

    def wanted() -> Iterator[tuple[int, str]]:
        for index, doc_id, text in iter_documents(paths, start=first_doc):
            path = doc_id if doc_id in sizes else doc_id.rsplit(":", 1)[0]
            if path != read["path"]:
                read["path"], read["chars"] = path, 0
            read["chars"] += len(text or "")
            split = "val" if is_val_document(index, val_fraction) else "train"
            if text and index >= writers[split].start[0]:
                yield index, text

    for index, tokens in tokenize_documents(wanted(), tokenizer_path, num_workers):
        writers["val" if is_val_document(index, val_fraction) else "train"].add(index, tokens)
        path = read["path"]
        progress.update(before.get(path, 0) + min(read["chars"], sizes.get(path, 0)), progress.tokens + len(tokens))
    dropped = {s: w.finish() for s, w in writers.items()}
    progress.update(progress.total, progress.tokens, force=True)
    print(progress.summary(num_workers), file=sys.stderr, flush=True)
    if not writers["train"].shards:
        raise ShardDataError(empty_message(config, dropped["train"]))
    manifest = {
        "format": FORMAT, "seq_len": seq_len, "vocab_size": tok_vocab, "eos_id": eos_id,
        "tokenizer": {"path": "tokenizer.model", "source": os.path.abspath(tokenizer_path), "sha256": tok_sha},
        "config": config,
        "splits": {s: _split_summary(w.shards, seq_len, dropped[s]) for s, w in writers.items()},
    }
    _write_json(manifest_path, manifest)
    if os.path.isfile(progress_path):
        os.remove(progress_path)
    return manifest


def add_record_indexes(out_dir: str, manifest: dict) -> dict:
    """Give the shards of a build made before record indexes existed their ``.idx`` (so that the loader reads
    only each rank's records), rewriting the manifest; a no-op when every shard has one."""
    changed = False
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if isinstance(entry.get("index"), dict):
                continue
            with open(os.path.join(out_dir, entry["name"]), "rb") as f:
                data = f.read()
            record = record_layout(data, int(entry["num_samples"]))
            if record:
                index = record_digests(data, int(entry["num_samples"]), record)
                entry["record_bytes"] = record
                entry["index"] = {"name": index_name(entry["name"]), "sha256": hashlib.sha256(index).hexdigest()}
                _write_if_changed(out_dir, index_name(entry["name"]), index, entry["index"]["sha256"])
                changed = True
    if changed:
        print(f"write_shards: added record indexes (.idx) to the shards of {out_dir}", file=sys.stderr)
        _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def write_synthetic_shards(out_dir: str, num_samples: dict[str, int], seq_len: int, vocab_size: int,
                           samples_per_shard: int, seed: int = 0) -> dict:
    """Write shards of uniform random tokens (benchmarks, tests); return the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split in SPLITS:
        writer = SplitWriter(out_dir, split, seq_len, samples_per_shard)
        for i in range(num_samples.get(split, 0)):
            writer.add(i, rng.integers(0, vocab_size, seq_len + 1, dtype=np.int32))
        splits[split] = _split_summary(writer.shards, seq_len, writer.finish())
    manifest = {"format": FORMAT, "seq_len": seq_len, "vocab_size": vocab_size, "eos_id": -1,
                "tokenizer": None, "config": {"synthetic_seed": seed}, "splits": splits}
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def manifest_summary(manifest: dict) -> str:
    """One line per split: samples, shards, tokens (what the data_prep CLIs print when done)."""
    return "\n".join(f"{split}: {info['num_samples']} samples, {len(info['shards'])} shards, "
                     f"{info['num_tokens']} tokens" for split, info in manifest["splits"].items())


def read_manifest(data_dir: str, check_files: bool = True, check_tokenizer: bool = True,
                  store_options: dict | None = None) -> dict:
    """Load and validate ``data_dir/manifest.json``; raise ``ShardDataError`` naming the problem.

    ``check_files``: every shard exists with its recorded size (no checksums: the loader verifies each
    shard's sha256 when it reads it). ``check_tokenizer``: the data dir's tokenizer copy has the manifest's
    sha256 (a replaced tokenizer would silently mismatch the token ids)."""
    from jambatrain.data.remote import StoreError, is_url, open_store

    remote = is_url(data_dir)
    path = f"{data_dir.rstrip('/')}/{MANIFEST}" if remote else os.path.join(data_dir, MANIFEST)
    rebuild = f"rebuild with {BUILD_HINT.format(dir=data_dir)}"
    if remote:  # the shards' sizes and the tokenizer are checked when read (no request per shard up front)
        check_files = check_tokenizer = False
        try:
            manifest = json.loads(open_store(data_dir, **(store_options or {})).read(MANIFEST))
        except FileNotFoundError as exc:
            raise ShardDataError(f"{path} not found ({exc}): check data.dir, or upload the directory that "
                                 "write_shards built (manifest.json, *.tar, *.idx)") from exc
        except StoreError as exc:
            raise ShardDataError(str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise ShardDataError(f"{path} is unreadable ({exc})") from exc
    elif not os.path.isfile(path):
        raise ShardDataError(f"{MANIFEST} missing in {data_dir}: the shards were never built or the build "
                             f"did not finish; run {BUILD_HINT.format(dir=data_dir)} "
                             "(or python -m data_prep.default_corpus for the built-in corpus)")
    else:
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise ShardDataError(f"{path} is unreadable ({exc}): {rebuild}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardDataError(f"{path}: expected a manifest with format {FORMAT}: {rebuild}")
    for key in ("seq_len", "vocab_size"):
        if not isinstance(manifest.get(key), int) or manifest[key] <= 0:
            raise ShardDataError(f"{path}: {key!r} must be a positive integer: {rebuild}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise ShardDataError(f"{path}: no 'splits'/'train' entry: {rebuild}")
    for split, info in splits.items():
        try:
            counts = [int(s["num_samples"]) for s in info["shards"]]
            names = [s["name"] for s in info["shards"]]
            total = int(info["num_samples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardDataError(f"{path}: split {split!r} is malformed ({exc!r}): {rebuild}") from exc
        if sum(counts) != total:
            raise ShardDataError(f"{path}: split {split!r} says {total} samples but its shards hold "
                                 f"{sum(counts)}: {rebuild}")
        for entry in info["shards"] if check_files else ():
            if problem := shard_file_problem(data_dir, entry):
                raise ShardDataError(f"{problem}: {REPAIR_HINT}, or {rebuild}")
    if check_tokenizer and (problem := tokenizer_problem(data_dir, manifest)):
        raise ShardDataError(problem)
    return manifest
