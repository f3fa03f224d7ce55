"""Deterministic, resumable, data-parallel batches over token shards: one global sample stream.

The stream (the same for every rank, data-parallel size, micro batch and grad accumulation): epoch ``e`` permutes
the shards (numpy generator seeded with ``(seed, e)``) and the samples inside each shard (``(seed, e, shard)``;
``shuffle=False``: manifest order); the epochs are concatenated, so global position ``p`` is sample ``p % N`` of
epoch ``p // N``. Like Megatron's ``consumed_samples``, micro step ``k`` of all ranks consumes positions
``[c + k * D * B, c + (k + 1) * D * B)`` (``c`` the samples consumed before, ``D`` ranks, micro batch ``B``) and
rank ``r`` takes the ``B`` of them from ``c + k * D * B + r * B``. A step of ``A`` accumulated micro batches is
then the ``G = D * B * A`` consecutive samples ``[c + i * G, c + (i + 1) * G)`` whatever ``D``, ``B`` and ``A``:
global batch ``i`` is the same samples in the same order on 1 or 16 GPUs, and a resume on another geometry
continues from ``consumed_samples`` exactly (context-parallel ranks of a group pass the same dp rank/size).

I/O per rank is its share: shards written by ``write_shards`` hold fixed-size tar records and a ``.idx`` of one
blake2b-128 digest per record (its sha256 in the manifest), so a rank reads the index and only the records it
needs (``os.pread`` locally, HTTP Range requests remotely) and checks each against its digest. Shards without an
index (older builds) are read whole and checked against their sha256, as before.

Batch ``g`` of a rank is a pure function of ``g``; with ``num_workers = W`` worker ``w`` builds the batches
``start + w + k * W`` and torch's DataLoader returns them round-robin, i.e. in order, so the batch sequence does
not depend on ``num_workers`` (nor on ``prefetch``, the batches read ahead by threads: 4 for a URL, else 0).

Bad data. A shard found missing or of the wrong size at construction (a truncated copy) raises ``ShardDataError``
with ``on_error="raise"``; with ``on_error="skip"`` it is left out of the stream (every epoch is the other shards'
samples: batches stay full, no sample repeats) and its samples are counted as skipped once per epoch. A bad sample
met while reading (corrupt record, wrong dtype/shape, token id out of range, digest/sha256 mismatch, a shard
that cannot be fetched) raises, or with ``"skip"`` its row is left out of the loss (labels -100, no other sample
takes its place, so none is repeated), a rate-limited warning names shard and sample, and it is counted in
``skipped``. Each rank counts its own skips; the trainer sums them over ranks at log steps
(``uncounted_skips``/``count_skips``), so the ``skipped`` of ``state_dict()`` is the run's total over all ranks.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from jambatrain.data.remote import LocalStore, StoreError, is_url, open_store
from jambatrain.data.shards import (INDEX_DIGEST, REPAIR_HINT, ShardDataError, read_manifest, record_digest,
                                    shard_file_problem)
from jambatrain.data.sources import BatchSource

STATE_FORMAT = 2  # 1: per-rank contiguous slices (converted on load)


def decode_shard(path: str, entry: dict, seq_len: int, vocab_size: int,
                 verify_checksum: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """Read a whole shard with webdataset's tar iterator.

    Returns ``(tokens, bad)``: tokens is ``(num_samples, seq_len + 1)`` int32,
    ``bad`` maps sample offsets to an error message naming file and key (an
    unreadable file or a sha256 mismatch makes every sample bad).
    """
    tokens, bad, problem, first_bad = read_shard(path, entry, seq_len, vocab_size, verify_checksum)
    for i in range(first_bad, int(entry["num_samples"])):
        bad[i] = problem.replace("{key}", sample_key(entry, i))
    return tokens, bad


def sample_key(entry: dict, offset: int) -> str:
    """The ``__key__`` of sample ``offset`` of a shard (``#offset`` for a manifest without first indices)."""
    first = entry.get("first_index")
    return f"{first + offset:010d}" if first is not None else f"#{offset}"


def read_shard(path: str, entry: dict, seq_len: int, vocab_size: int, verify_checksum: bool = True,
               data: bytes | None = None) -> tuple[np.ndarray, dict[int, str], str | None, int]:
    """``decode_shard`` with shard-level damage reported once: ``(tokens, bad, problem, first_bad)``, where
    ``bad`` holds the per-sample problems and every sample from ``first_bad`` on is unusable because of
    ``problem`` (a message with a ``{key}`` placeholder; None and ``num_samples`` when the shard is whole)."""
    n = int(entry["num_samples"])
    tokens = np.zeros((n, seq_len + 1), dtype=np.int32)
    bad: dict[int, str] = {}
    fix = "rebuild the shards (re-run python -m data_prep.write_shards; it rewrites damaged shards)"
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        return tokens, bad, f"cannot read shard {path} ({exc}) [sample {{key}}]: {fix}", 0
    if verify_checksum and "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        what = "truncated" if "bytes" in entry and len(data) < entry["bytes"] else "corrupt or replaced"
        return (tokens, bad, f"shard {path}: sha256 differs from the manifest (file {what}) [sample {{key}}]: "
                f"{fix}", 0)
    got = 0

    def check(sample: dict) -> None:
        nonlocal got
        if got >= n:
            raise ShardDataError(f"shard {path} holds more than the {n} samples its manifest lists: "
                                 "the manifest is from another build; rebuild the shards")
        expected = sample_key(entry, got) if entry.get("first_index") is not None else None
        problem = _sample_problem(sample, expected, seq_len, vocab_size)
        if problem:
            bad[got] = f"shard {path}: sample {sample['__key__']}: {problem}"
        else:
            tokens[got] = sample["tokens.npy"]
        got += 1

    current: dict | None = None  # one sample = the tar members sharing a key
    try:
        source = [{"url": path, "stream": io.BytesIO(data)}]
        for member in wds.tariterators.tar_file_expander(source, eof_value=None):
            key, suffix = wds.tariterators.base_plus_ext(member["fname"])
            if current is not None and key != current["__key__"]:
                check(current)
                current = None
            current = current or {"__key__": key}
            current[suffix] = member["data"]
    except ShardDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile raises several types on damage
        reason = f"tar stream broken ({type(exc).__name__}: {exc.args[0] if exc.args else exc})"
        if current is not None and "tokens.npy" in current:
            check(current)  # members are read whole, so this sample is complete
    else:
        reason = "shard truncated"
        if current is not None:
            check(current)
    if got == n:
        return tokens, bad, None, n
    return (tokens, bad, f"shard {path}: sample {{key}}: {reason}: read {got} of {n} samples; "
            "rebuild the shards (python -m data_prep.write_shards)", got)


def _sample_problem(sample: dict, expected_key: str | None, seq_len: int, vocab_size: int) -> str | None:
    """Why ``sample`` is unusable (None if fine); decodes ``tokens.npy`` in place."""
    if expected_key is not None and sample["__key__"] != expected_key:
        return f"key {sample['__key__']!r}, expected {expected_key!r} (samples out of order or from another build)"
    if "tokens.npy" not in sample:
        return f"no tokens.npy entry (has {sorted(k for k in sample if not k.startswith('__'))})"
    try:
        arr = np.lib.format.read_array(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad sample
        return f"tokens.npy is not a valid .npy array ({exc})"
    if arr.dtype != np.int32 or arr.shape != (seq_len + 1,):
        return f"tokens.npy is {arr.dtype}{list(arr.shape)}, expected int32[{seq_len + 1}]"
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        return (f"token id {high if high >= vocab_size else low} outside [0, vocab_size={vocab_size}): "
                "retokenize or raise model.vocab_size")
    sample["tokens.npy"] = arr
    return None


class _RateLimitedWarnings:
    """Prints the first ``burst`` warnings to stderr, then at most one per ``interval`` seconds with the number
    held back (per process: each DataLoader worker has its own)."""

    def __init__(self, burst: int = 10, interval: float = 60.0):
        self.burst, self.interval = burst, interval
        self.printed, self.held, self.last = 0, 0, 0.0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if self.printed >= self.burst and now - self.last < self.interval:
            self.held += 1
            return
        if self.held:
            message += f" ({self.held} more skipped since the last warning)"
        print(message, file=sys.stderr, flush=True)
        self.printed, self.held, self.last = self.printed + 1, 0, now


_SKIP_WARNINGS = _RateLimitedWarnings()


class _Plan:
    """Maps (batch number, row) of one rank to a sample of the global stream and reads it; picklable (the
    DataLoader workers get a copy), thread-safe (the prefetch threads share one)."""

    def __init__(self, data_dir: str, manifest: dict, split: str, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool, vocab_size: int, on_error: str, verify: bool,
                 excluded: frozenset = frozenset(), store_options: dict | None = None):
        self.data_dir, self.split, self.seed, self.shuffle = data_dir, split, seed, shuffle
        self.batch, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seq_len, self.vocab_size, self.on_error, self.verify = manifest["seq_len"], vocab_size, on_error, verify
        self.store_options = store_options or {}
        self.store = open_store(data_dir, **self.store_options)
        self.shards = manifest["splits"][split]["shards"]
        self.counts = np.array([int(s["num_samples"]) for s in self.shards], dtype=np.int64)
        self.excluded = excluded  # shards known unusable up front (data.on_error=skip): not in the stream
        self.keep = np.array([i not in excluded for i in range(len(self.shards))], dtype=bool)
        self.num_samples = int(self.counts[self.keep].sum())  # samples per epoch of the stream
        self.excluded_samples = int(self.counts[~self.keep].sum())
        self.origin = 0  # global stream position of this rank's batch 0 (consumed_samples at the resume point)
        self._init_caches()

    def _init_caches(self) -> None:
        self._lock = threading.Lock()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: OrderedDict = OrderedDict()
        self._index_cache: OrderedDict = OrderedDict()
        self._shard_cache: OrderedDict = OrderedDict()
        self._reader: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_lock", "_epoch_cache", "_perm_cache", "_index_cache", "_shard_cache", "_reader"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    @property
    def step_samples(self) -> int:
        """Samples one micro step of all ranks consumes (``dp_size * micro_batch_size``)."""
        return self.dp_size * self.batch

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.arange(len(self.counts))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            order = order[self.keep[order]]
            self._epoch_cache = (epoch, order, np.cumsum(self.counts[order]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _within(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._perm_cache:
            n = int(self.counts[shard])
            perm = np.arange(n)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, shard]).permutation(n)
            self._perm_cache[key] = perm
            while len(self._perm_cache) > 8:
                self._perm_cache.popitem(last=False)
        return self._perm_cache[key]

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, offset in shard) of global stream position ``position``."""
        epoch, x = divmod(position, self.num_samples)
        with self._lock:
            order, cum = self._epoch_layout(epoch)
            slot = int(np.searchsorted(cum, x, side="right"))
            start = int(cum[slot - 1]) if slot else 0
            shard = int(order[slot])
            return shard, int(self._within(epoch, shard)[x - start])

    def _cached(self, cache: OrderedDict, key: int, size: int, load):
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = load()
        with self._lock:
            cache[key] = value
            while len(cache) > size:
                cache.popitem(last=False)
        return value

    def _read_problem(self, what: str, exc: Exception) -> str:
        fix = "rebuild the shards (re-run python -m data_prep.write_shards; it rewrites damaged shards)"
        if isinstance(exc, FileNotFoundError):
            return f"{what} is missing ({exc}) [sample {{key}}]: {fix}"
        if isinstance(exc, StoreError):  # already names the URL and the attempts
            return f"{exc} [sample {{key}}]"
        return f"cannot read {what} ({exc}) [sample {{key}}]"

    def _index(self, shard: int) -> bytes | str:
        """The shard's record digests, or a problem message (with a ``{key}`` placeholder)."""
        entry = self.shards[shard]

        def load():
            name = entry["index"]["name"]
            try:
                data = self.store.read(name)
            except (OSError, ShardDataError) as exc:
                return self._read_problem(f"record index {self.store.url(name)}", exc)
            if len(data) != INDEX_DIGEST * int(entry["num_samples"]) or \
                    (self.verify and hashlib.sha256(data).hexdigest() != entry["index"]["sha256"]):
                return (f"record index {self.store.url(name)}: sha256 differs from the manifest (file truncated, "
                        "corrupt or replaced) [sample {key}]: rebuild the shards (python -m data_prep.write_shards)")
            return data

        return self._cached(self._index_cache, shard, 64, load)

    def _whole(self, shard: int) -> tuple[np.ndarray, dict[int, str]]:
        """A shard without a record index (built before indexes existed): read and decoded whole."""
        entry = self.shards[shard]

        def load():
            url = self.store.url(entry["name"])
            try:
                data = self.store.read(entry["name"])
            except (OSError, ShardDataError) as exc:
                problem, data = self._read_problem(f"shard {url}", exc), None
            if data is not None:
                tokens, bad, problem, first = read_shard(url, entry, self.seq_len, self.vocab_size, self.verify,
                                                         data=data)
            else:
                tokens, bad, first = None, {}, 0
            for i in range(first, int(entry["num_samples"])):
                bad[i] = problem.replace("{key}", sample_key(entry, i))
            return tokens, bad

        return self._cached(self._shard_cache, shard, 2, load)

    def sample(self, shard: int, offset: int) -> tuple[np.ndarray | None, str | None]:
        """Sample ``offset`` of ``shard`` as ``(tokens, None)``, or ``(None, why it is unusable)``."""
        entry = self.shards[shard]
        record = entry.get("record_bytes")
        if not record or not isinstance(entry.get("index"), dict):
            tokens, bad = self._whole(shard)
            return (None, bad[offset]) if offset in bad else (tokens[offset], None)
        key = sample_key(entry, offset)
        index = self._index(shard)
        if isinstance(index, str):
            return None, index.replace("{key}", key)
        url = self.store.url(entry["name"])
        try:
            data = self.store.read_range(entry["name"], offset * record, record)
        except (OSError, ShardDataError) as exc:
            return None, self._read_problem(f"shard {url}", exc).replace("{key}", key)
        fix = "rebuild the shards (python -m data_prep.write_shards)"
        if len(data) != record:
            return None, f"shard {url}: sample {key}: shard truncated (record cut short): {fix}"
        if self.verify and record_digest(data) != index[offset * INDEX_DIGEST:(offset + 1) * INDEX_DIGEST]:
            return None, f"shard {url}: sample {key}: checksum differs from the record index (corrupt): {fix}"
        name = data[:100].split(b"\0", 1)[0].decode(errors="replace")
        try:
            size = int(data[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None, f"shard {url}: sample {key}: not a tar record: {fix}"
        sample = {"__key__": name.split(".", 1)[0], "tokens.npy": data[512:512 + size]}
        if not name.endswith(".tokens.npy"):
            sample = {"__key__": sample["__key__"]}
        problem = _sample_problem(sample, key if entry.get("first_index") is not None else None,
                                  self.seq_len, self.vocab_size)
        if problem:
            return None, f"shard {url}: sample {sample['__key__']}: {problem}"
        return sample["tokens.npy"], None

    def make_batch(self, g: int) -> tuple[int, dict[str, torch.Tensor], int]:
        """Batch number ``g`` of this rank: ``(g, batch, number of skipped samples)``. It holds global stream
        positions ``origin + g * dp_size * B + dp_rank * B + [0, B)``."""
        base = self.origin + g * self.step_samples + self.dp_rank * self.batch
        samples = [self.locate(base + j) for j in range(self.batch)]
        if self.batch > 1 and not isinstance(self.store, LocalStore):  # remote: a batch's requests overlap
            with self._lock:
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(8, thread_name_prefix="jambatrain-read")
            got = list(self._reader.map(lambda s: self.sample(*s), samples))
        else:
            got = [self.sample(*s) for s in samples]
        rows, masked = [], []
        for j, (tokens, problem) in enumerate(got):
            if problem is not None:
                if self.on_error == "raise":
                    raise ShardDataError(problem)
                _SKIP_WARNINGS.warn(f"jambatrain: WARNING: rank {self.dp_rank} skipped a bad sample "
                                    f"(data.on_error=skip; its row is left out of the loss): {problem}")
                masked.append(j)
                tokens = np.zeros(self.seq_len + 1, dtype=np.int32)
            rows.append(tokens)
        data = torch.from_numpy(np.stack(rows).astype(np.int64))
        batch = {"input_ids": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}
        if masked:
            batch["labels"][masked] = -100
        return g, batch, len(masked)


class _BatchStream(IterableDataset):
    """Batches ``start + worker_id + k * num_workers`` (< ``stop``) of one rank, ``prefetch`` of them read ahead
    by threads (I/O-bound remote reads overlap; the order stays fixed)."""

    def __init__(self, plan: _Plan, start: int, stop: int | None, prefetch: int = 0):
        super().__init__()
        self.plan, self.start, self.stop, self.prefetch = plan, start, stop, prefetch

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        g = self.start + worker
        if self.prefetch <= 0:
            while self.stop is None or g < self.stop:
                yield self.plan.make_batch(g)
                g += workers
            return
        pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="jambatrain-prefetch")
        pending: deque = deque()
        try:
            while True:
                while len(pending) < self.prefetch and (self.stop is None or g < self.stop):
                    pending.append(pool.submit(self.plan.make_batch, g))
                    g += workers
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class TokenShardLoader(BatchSource):
    """Iterable over ``{"input_ids", "labels"}`` LongTensor(B, seq_len) batches of one DP rank.

    Iterates forever (or ``max_epochs``, after which a new ``iter()`` starts over). ``state_dict()`` is
    identical on all ranks once ``count_skips()`` has summed the ranks' skipped samples (the trainer does it at
    log steps and before a checkpoint). ``data_dir`` is a directory or a URL (``jambatrain.data.remote``).
    """

    def __init__(self, data_dir: str, split: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, vocab_size: int | None = None,
                 on_error: str = "raise", seq_len: int | None = None, max_epochs: int | None = None,
                 verify_checksums: bool = True, prefetch_factor: int = 2, pin_memory: bool = False,
                 prefetch: int | None = None, store_options: dict | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= dp_rank < dp_size or micro_batch_size < 1 or num_workers < 0:
            raise ValueError(f"bad loader geometry: dp_rank={dp_rank} dp_size={dp_size} "
                             f"micro_batch_size={micro_batch_size} num_workers={num_workers}")
        manifest = read_manifest(data_dir, check_files=False, store_options=store_options)
        excluded = set()
        if split in manifest["splits"] and not is_url(data_dir):  # a missing or truncated shard: refused now, or
            for i, entry in enumerate(manifest["splits"][split]["shards"]):  # left out of the stream
                if (problem := shard_file_problem(data_dir, entry)) and on_error == "raise":
                    raise ShardDataError(f"{problem}: {REPAIR_HINT}, or pass data.on_error=skip to skip its samples")
                if problem:
                    excluded.add(i)
                    if dp_rank == 0:
                        print(f"jambatrain: WARNING: {problem}: its {entry['num_samples']} samples are left out of "
                              f"every epoch (data.on_error=skip); {REPAIR_HINT}", file=sys.stderr, flush=True)
        if seq_len is not None and manifest["seq_len"] != seq_len:
            raise ShardDataError(f"shards in {data_dir} have seq_len={manifest['seq_len']} but seq_len={seq_len} "
                                 "was requested: rebuild the shards with that seq_len or change data.seq_len")
        if vocab_size is not None and manifest["vocab_size"] > vocab_size:
            raise ShardDataError(f"shards in {data_dir} use vocab_size={manifest['vocab_size']} > model "
                                 f"vocab_size={vocab_size}: retokenize with a smaller vocab or raise "
                                 "model.vocab_size")
        if split not in manifest["splits"]:
            raise ShardDataError(f"{data_dir}/manifest.json has no split {split!r} "
                                 f"(has {sorted(manifest['splits'])})")
        self.data_dir, self.split, self.manifest = data_dir, split, manifest
        self.seq_len, self.vocab_size = manifest["seq_len"], manifest["vocab_size"]
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.prefetch = (4 if is_url(data_dir) else 0) if prefetch is None else prefetch
        self.max_epochs = max_epochs
        self._plan = _Plan(data_dir, manifest, split, micro_batch_size, dp_rank, dp_size, seed, shuffle,
                           self.vocab_size, on_error, verify_checksums, frozenset(excluded), store_options)
        self.num_samples = int(manifest["splits"][split]["num_samples"])  # the manifest's (state check)
        self.batches_per_epoch = self._plan.num_samples // self._plan.step_samples
        if self.batches_per_epoch == 0:
            raise ShardDataError(f"split {split!r} of {data_dir} has {self._plan.num_samples} usable samples, fewer "
                                 f"than dp_size*micro_batch_size={self._plan.step_samples}: build more data "
                                 "or lower the micro batch size")
        self.dropped_per_epoch = self._plan.num_samples - self._plan.step_samples * self.batches_per_epoch
        self._skips_counted = 0  # skipped samples of all ranks up to the last count_skips() (or the checkpoint)
        self._skips_uncounted = 0  # skipped by this rank since then
        self._counted_at = 0  # self._position at the last count_skips()
        self._position = 0  # batches consumed since the origin
        self._epoch_entered = -1  # the last epoch whose left-out shards were counted as skipped

    @property
    def consumed_samples(self) -> int:
        """Samples of the global stream consumed by all ranks so far (Megatron's ``consumed_samples``)."""
        return self._plan.origin + self._position * self._plan.step_samples

    @property
    def skipped(self) -> int:
        """Bad samples skipped: all ranks' up to the last ``count_skips()`` plus this rank's since then (with one
        rank, or right after ``count_skips()``, the exact total of the run)."""
        return self._skips_counted + self._skips_uncounted

    def uncounted_skips(self, device=None) -> torch.Tensor:
        """This rank's skipped samples not yet in the total, as a 1-element float32 tensor on ``device``: sum it
        over the ranks (e.g. inside the all-reduce of the logged metrics) and pass the sum to ``count_skips``."""
        return torch.tensor([float(self._skips_uncounted)], device=device)

    def count_skips(self, total) -> int:
        """Add ``total`` (the sum over ranks of ``uncounted_skips()``) to the run's count; return it (an int)."""
        n = int(round(float(total)))
        self._skips_counted += n
        self._skips_uncounted = 0
        self._counted_at = self._position
        return n

    @property
    def skips_counted(self) -> bool:
        """No batch read since the last ``count_skips()``: the same answer on every rank (they read in step), so
        ranks can agree to skip the all-reduce of an extra count (e.g. before a checkpoint)."""
        return self._position == self._counted_at

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self._plan.num_samples

    @property
    def batch_in_epoch(self) -> int:
        return self.consumed_samples % self._plan.num_samples // self._plan.step_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        p = self._plan
        stop = None
        if self.max_epochs is not None:
            stop = (self.max_epochs * p.num_samples - p.origin) // p.step_samples
            if self._position >= stop:
                self._position, p.origin, self._epoch_entered = 0, 0, -1
                stop = self.max_epochs * p.num_samples // p.step_samples
        stream = _BatchStream(p, self._position, stop, self.prefetch)
        if self.num_workers == 0:
            source = iter(stream)
        else:
            source = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                     prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory))
        for g, batch, skipped in source:
            if g != self._position:
                raise RuntimeError(f"loader produced batch {g}, expected {self._position} (worker order broken)")
            self._position += 1
            self._skips_uncounted += skipped
            epoch = (self.consumed_samples - 1) // p.num_samples  # of this micro step's last sample
            if epoch > self._epoch_entered:  # the left-out shards' samples count as skipped once per epoch
                if p.dp_rank == 0:
                    self._skips_uncounted += p.excluded_samples * (epoch - max(self._epoch_entered, -1))
                self._epoch_entered = epoch
            if self.pin_memory and self.num_workers == 0:  # DataLoader pins for the worker path
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch

    def state_dict(self) -> dict:
        p = self._plan
        return {"format": STATE_FORMAT, "split": self.split, "consumed_samples": self.consumed_samples,
                "epoch": self.epoch, "seed": p.seed, "shuffle": p.shuffle, "num_samples": self.num_samples,
                "dp_size": p.dp_size, "micro_batch_size": p.batch, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        """Resume right after the last consumed sample of ``sd``, with any data-parallel size and micro batch:
        the stream is global, so batch i of the new geometry continues exactly where the old one stopped."""
        p = self._plan
        if sd.get("format") == 1:  # the per-rank-slice order of older checkpoints: continue at the same depth
            consumed = sd["epoch"] * p.num_samples + sd["batch_in_epoch"] * sd["dp_size"] * sd["micro_batch_size"]
            if sd.get("segments"):
                consumed += p.num_samples - int(sum(b - a for a, b in sd["segments"]))
            print(f"jambatrain: WARNING: the checkpoint's loader state is from the older per-rank data order: "
                  f"continuing at epoch {sd['epoch']}, sample {consumed - sd['epoch'] * p.num_samples} of the "
                  "global stream (the samples after it differ from what that order would have given)",
                  file=sys.stderr, flush=True)
            sd = dict(sd, format=STATE_FORMAT, consumed_samples=consumed)
        for key, mine in (("format", STATE_FORMAT), ("split", self.split), ("seed", p.seed),
                          ("shuffle", p.shuffle), ("num_samples", self.num_samples)):
            if sd.get(key) != mine:
                raise ValueError(f"loader state has {key}={sd.get(key)!r} but this loader has {mine!r}: "
                                 "resume with the same data and data settings")
        p.origin, self._position = int(sd["consumed_samples"]), 0
        self._epoch_entered = (p.origin - 1) // p.num_samples if p.origin else -1
        self._counted_at = self._position
        self._skips_counted, self._skips_uncounted = int(sd.get("skipped", 0)), 0


def make_val_loader(data_dir: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                    vocab_size: int | None = None, num_workers: int = 0, **kwargs) -> TokenShardLoader:
    """One unshuffled pass over the val split per ``iter()``."""
    return TokenShardLoader(data_dir, "val", micro_batch_size, dp_rank, dp_size, num_workers=num_workers,
                            shuffle=False, vocab_size=vocab_size, max_epochs=1, **kwargs)
