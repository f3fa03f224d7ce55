"""Deterministic, resumable, data-parallel batches over token shards.

Sample order of epoch ``e`` (numpy generators seeded with ``(seed, e)`` and
``(seed, e, shard)``): the shards are permuted, the samples inside each shard
are permuted, and the result is read as one stream of ``N`` samples
(``shuffle=False``: manifest order). Rank ``r`` takes the contiguous stream
slice ``[r * n, (r + 1) * n)`` with ``n = batches_per_epoch * micro_batch_size``
and ``batches_per_epoch = N // (dp_size * micro_batch_size)``; the last
``dropped_per_epoch`` samples of the stream are not used in that epoch (a
different set each epoch when shuffling). Batch ``b`` of a rank is the next
``micro_batch_size`` samples of its slice, so ranks read mostly disjoint shards.

Batches are numbered globally (``epoch * batches_per_epoch + b``); with
``num_workers = W`` worker ``w`` builds the batches ``start + w + k * W`` and
torch's DataLoader returns them round-robin, i.e. in order. The batch sequence
therefore does not depend on ``num_workers`` and resuming only needs the
batch number: the shard holding it is found from the manifest counts.

A change of data-parallel size or micro batch mid-epoch (a job resumed on fewer nodes) keeps the epoch going
without repeating or losing a sample: the samples not yet consumed (and not yet dropped) are kept as a list of
``segments`` of the epoch stream, and the rest of that epoch is those segments, read as one stream and split
between the new ranks the same way (its remainder dropped). Later epochs use the full stream again.

A bad sample (corrupt/truncated tar, wrong dtype/shape, token id out of range,
shard sha256 mismatch, missing shard) raises ``ShardDataError``; with
``on_error="skip"`` it is replaced by the next valid sample of the epoch stream
(so that sample appears twice), a rate-limited warning names shard and sample,
and it is counted in ``skipped``. Each rank counts its own skips; the trainer
sums them over ranks at log steps (``uncounted_skips``/``count_skips``), so the
``skipped`` of ``state_dict()`` is the run's total over all ranks.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from collections import OrderedDict
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from jambatrain.data.shards import REPAIR_HINT, ShardDataError, read_manifest, shard_file_problem
from jambatrain.data.sources import BatchSource

STATE_FORMAT = 1


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


def read_shard(path: str, entry: dict, seq_len: int, vocab_size: int,
               verify_checksum: bool = True) -> tuple[np.ndarray, dict[int, str], str | None, int]:
    """``decode_shard`` with shard-level damage reported once: ``(tokens, bad, problem, first_bad)``, where
    ``bad`` holds the per-sample problems and every sample from ``first_bad`` on is unusable because of
    ``problem`` (a message with a ``{key}`` placeholder; None and ``num_samples`` when the shard is whole)."""
    n = int(entry["num_samples"])
    tokens = np.zeros((n, seq_len + 1), dtype=np.int32)
    bad: dict[int, str] = {}
    fix = "rebuild the shards (re-run python -m data_prep.write_shards; it rewrites damaged shards)"
    try:
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


class _EpochPlan:
    """Maps (global batch number, row) to (shard index, sample offset); pure and picklable."""

    def __init__(self, data_dir: str, manifest: dict, split: str, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool, vocab_size: int, on_error: str, verify: bool):
        self.data_dir, self.split, self.seed, self.shuffle = data_dir, split, seed, shuffle
        self.batch, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seq_len, self.vocab_size, self.on_error, self.verify = manifest["seq_len"], vocab_size, on_error, verify
        self.shards = manifest["splits"][split]["shards"]
        self.counts = np.array([int(s["num_samples"]) for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.batches_per_epoch = self.num_samples // (dp_size * micro_batch_size)
        # the epoch the batch numbering starts in, and its remaining stream (None: the whole stream)
        self.origin_epoch, self.origin_segments = 0, None
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: OrderedDict = OrderedDict()
        self._shard_cache: OrderedDict = OrderedDict()

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.arange(len(self.counts))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
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

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(shard index, offset in shard) of stream position ``position`` of ``epoch``."""
        order, cum = self._epoch_layout(epoch)
        slot = int(np.searchsorted(cum, position, side="right"))
        start = int(cum[slot - 1]) if slot else 0
        shard = int(order[slot])
        return shard, int(self._within(epoch, shard)[position - start])

    def _load(self, shard: int) -> tuple[np.ndarray, dict[int, str]]:
        if shard not in self._shard_cache:
            path = os.path.join(self.data_dir, self.shards[shard]["name"])
            self._shard_cache[shard] = decode_shard(path, self.shards[shard], self.seq_len,
                                                    self.vocab_size, self.verify)
            while len(self._shard_cache) > 2:
                self._shard_cache.popitem(last=False)
        else:
            self._shard_cache.move_to_end(shard)
        return self._shard_cache[shard]

    def origin_batches(self) -> int:
        """Batches per rank in the origin epoch (fewer than ``batches_per_epoch`` when it resumed part-way)."""
        if self.origin_segments is None:
            return self.batches_per_epoch
        return segments_length(self.origin_segments) // (self.dp_size * self.batch)

    def where(self, g: int) -> tuple[int, int, list | None]:
        """(epoch, batch in that epoch's stream, that epoch's segments) of batch number ``g``."""
        first = self.origin_batches()
        if g < first:
            return self.origin_epoch, g, self.origin_segments
        e, b = divmod(g - first, self.batches_per_epoch)
        return self.origin_epoch + 1 + e, b, None

    def make_batch(self, g: int) -> tuple[int, dict[str, torch.Tensor], int]:
        """Batch number ``g`` of this rank: ``(g, batch, number of skipped samples)``."""
        epoch, b, segments = self.where(g)
        per_rank = (self.origin_batches() if segments is not None else self.batches_per_epoch) * self.batch
        base = self.dp_rank * per_rank + b * self.batch
        rows, skipped = [], 0
        for virtual in range(base, base + self.batch):
            position = virtual if segments is None else segment_position(segments, virtual)
            for attempt in range(self.num_samples):
                shard, offset = self.locate(epoch, (position + attempt) % self.num_samples)
                tokens, bad = self._load(shard)
                if offset not in bad:
                    rows.append(tokens[offset])
                    break
                if self.on_error == "raise":
                    raise ShardDataError(bad[offset])
                if attempt == 0:  # count each bad sample once, not every failed replacement
                    skipped += 1
                    _SKIP_WARNINGS.warn(f"jambatrain: WARNING: rank {self.dp_rank} skipped a bad sample "
                                        f"(data.on_error=skip): {bad[offset]}")
            else:
                raise ShardDataError(f"no valid sample left in split {self.split!r} of {self.data_dir}")
        data = torch.from_numpy(np.stack(rows).astype(np.int64))
        return g, {"input_ids": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}, skipped


class _BatchStream(IterableDataset):
    """Batches ``start + worker_id + k * num_workers`` (< ``stop``) of one rank."""

    def __init__(self, plan: _EpochPlan, start: int, stop: int | None):
        super().__init__()
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        g = self.start + worker
        while self.stop is None or g < self.stop:
            yield self.plan.make_batch(g)
            g += workers


class TokenShardLoader(BatchSource):
    """Iterable over ``{"input_ids", "labels"}`` LongTensor(B, seq_len) batches of one DP rank.

    Iterates epoch after epoch forever (or ``max_epochs``, after which a new
    ``iter()`` starts over). ``state_dict()`` is identical on all ranks once ``count_skips()`` has summed the
    ranks' skipped samples (the trainer does it at log steps and before a checkpoint).
    """

    def __init__(self, data_dir: str, split: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, vocab_size: int | None = None,
                 on_error: str = "raise", seq_len: int | None = None, max_epochs: int | None = None,
                 verify_checksums: bool = True, prefetch_factor: int = 2, pin_memory: bool = False):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= dp_rank < dp_size or micro_batch_size < 1 or num_workers < 0:
            raise ValueError(f"bad loader geometry: dp_rank={dp_rank} dp_size={dp_size} "
                             f"micro_batch_size={micro_batch_size} num_workers={num_workers}")
        manifest = read_manifest(data_dir, check_files=False)
        if split in manifest["splits"]:  # a missing or truncated shard: refused now, or all its samples skipped
            for entry in manifest["splits"][split]["shards"]:
                if (problem := shard_file_problem(data_dir, entry)) and on_error == "raise":
                    raise ShardDataError(f"{problem}: {REPAIR_HINT}, or pass data.on_error=skip to skip its samples")
                if problem and dp_rank == 0:
                    print(f"jambatrain: WARNING: {problem}: its samples will be skipped (data.on_error=skip); "
                          f"{REPAIR_HINT}", file=sys.stderr, flush=True)
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
        self.max_epochs = max_epochs
        self._plan = _EpochPlan(data_dir, manifest, split, micro_batch_size, dp_rank, dp_size, seed, shuffle,
                                self.vocab_size, on_error, verify_checksums)
        if self._plan.batches_per_epoch == 0:
            raise ShardDataError(f"split {split!r} of {data_dir} has {self._plan.num_samples} samples, fewer than "
                                 f"dp_size*micro_batch_size={dp_size * micro_batch_size}: build more data "
                                 "or lower the micro batch size")
        self.num_samples = self._plan.num_samples
        self.batches_per_epoch = self._plan.batches_per_epoch
        self.dropped_per_epoch = self.num_samples - dp_size * micro_batch_size * self.batches_per_epoch
        self._skips_counted = 0  # skipped samples of all ranks up to the last count_skips() (or the checkpoint)
        self._skips_uncounted = 0  # skipped by this rank since then
        self._counted_at = 0  # self._position at the last count_skips()
        self._position = 0  # batches consumed so far, over all epochs

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
        return self._plan.where(self._position)[0]

    @property
    def batch_in_epoch(self) -> int:
        return self._plan.where(self._position)[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        p = self._plan
        stop = None if self.max_epochs is None else \
            p.origin_batches() + (self.max_epochs - p.origin_epoch - 1) * self.batches_per_epoch
        if stop is not None and self._position >= stop:
            self._position, p.origin_epoch, p.origin_segments = 0, 0, None
        stream = _BatchStream(self._plan, self._position, stop)
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
            if self.pin_memory and self.num_workers == 0:  # DataLoader pins for the worker path
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch

    def state_dict(self) -> dict:
        p = self._plan
        epoch, b, segments = p.where(self._position)
        return {"format": STATE_FORMAT, "split": self.split, "epoch": epoch, "batch_in_epoch": b,
                "segments": segments, "seed": p.seed, "shuffle": p.shuffle, "dp_size": p.dp_size,
                "micro_batch_size": p.batch, "num_samples": self.num_samples, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        """Resume right after the last consumed batch of ``sd``, with this loader's data-parallel size and micro
        batch (another geometry mid-epoch continues with the samples the old one had not consumed)."""
        p = self._plan
        for key, mine in (("format", STATE_FORMAT), ("split", self.split), ("seed", p.seed),
                          ("shuffle", p.shuffle), ("num_samples", self.num_samples)):
            if sd.get(key) != mine:
                raise ValueError(f"loader state has {key}={sd.get(key)!r} but this loader has {mine!r}: "
                                 "resume with the same data and data settings")
        segments = sd.get("segments")
        if (sd["dp_size"], sd["micro_batch_size"]) == (p.dp_size, p.batch) or sd["batch_in_epoch"] == 0:
            p.origin_epoch, p.origin_segments, self._position = sd["epoch"], segments, sd["batch_in_epoch"]
        else:
            p.origin_epoch, p.origin_segments = sd["epoch"], remaining_segments(
                segments or [[0, self.num_samples]], sd["dp_size"], sd["micro_batch_size"], sd["batch_in_epoch"])
            self._position = 0
        if p.origin_segments is not None and p.origin_batches() == 0:  # too little left for one batch
            p.origin_epoch, p.origin_segments = p.origin_epoch + 1, None
        self._counted_at = self._position
        self._skips_counted, self._skips_uncounted = int(sd.get("skipped", 0)), 0


def segments_length(segments: list) -> int:
    return int(sum(b - a for a, b in segments))


def segment_position(segments: list, virtual: int) -> int:
    """Position in the epoch stream of position ``virtual`` of the stream made of ``segments``."""
    for a, b in segments:
        if virtual < b - a:
            return a + virtual
        virtual -= b - a
    raise IndexError("position past the end of the segments")


def remaining_segments(segments: list, dp_size: int, micro_batch_size: int, batch_in_epoch: int) -> list:
    """The part of the stream ``segments`` not consumed after ``batch_in_epoch`` batches per rank of
    ``dp_size`` ranks with ``micro_batch_size`` (rank r reads its contiguous slice from its start)."""
    per_rank = (segments_length(segments) // (dp_size * micro_batch_size)) * micro_batch_size
    used = batch_in_epoch * micro_batch_size
    keep, start = [], 0  # in positions of the segment stream
    for r in range(dp_size):
        keep.append((start, r * per_rank))
        start = r * per_rank + used
    keep.append((start, segments_length(segments)))
    out = []
    for a, b in keep:  # each kept run of the segment stream, mapped through the segments
        offset = 0
        for s0, s1 in segments:
            lo, hi = max(a, offset), min(b, offset + s1 - s0)
            if lo < hi:
                if out and out[-1][1] == s0 + lo - offset:
                    out[-1][1] = s0 + hi - offset
                else:
                    out.append([s0 + lo - offset, s0 + hi - offset])
            offset += s1 - s0
    return out


def make_val_loader(data_dir: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                    vocab_size: int | None = None, num_workers: int = 0, **kwargs) -> TokenShardLoader:
    """One unshuffled pass over the val split per ``iter()``."""
    return TokenShardLoader(data_dir, "val", micro_batch_size, dp_rank, dp_size, num_workers=num_workers,
                            shuffle=False, vocab_size=vocab_size, max_epochs=1, **kwargs)
