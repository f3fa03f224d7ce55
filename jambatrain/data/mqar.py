"""Synthetic multi-query associative recall (MQAR, Arora et al. 2023, "Zoology", arXiv 2312.04927) and passkey
sequences, generated from the model's vocabulary with a seed: the recall study needs no corpus.

Token ids (``MqarConfig``, all >= ``first_id`` so none is the EOS / a special id):
  keys    ``[first_id, first_id + num_keys)``
  values  ``[first_id + num_keys, first_id + 2 * num_keys)``
  filler  the ``num_filler`` ids after the values (noise between queries; passkey haystack and marker)

One MQAR sequence of ``L = seq_len + 1`` tokens with ``N`` pairs: ``k1 v1 k2 v2 ... kN vN`` (distinct keys,
values drawn with replacement), then ``L - 2N`` tokens of random filler in which the ``N`` keys are asked again
in a random order, each query ``k v`` at a random place (query slots never overlap). The label of a query key's
position is its value; every other label is -100, so training and accuracy count only the recalled values
(as Zoology does). Needs ``4N <= L``.

``MqarLoader`` is the ``data=mqar`` training source: batch ``g`` of data-parallel rank ``r`` is drawn from a
numpy generator seeded with ``(seed, split, r, g)``, so the stream is deterministic per seed/rank/step and
resuming only needs the batch number (``state_dict`` / ``load_state_dict`` as ``TokenShardLoader``). The number of
pairs of each training sequence is uniform in ``[min_pairs, min(max_pairs, L // 4)]``. The val split is a
fixed set of ``val_samples`` sequences (sample ``i`` seeded with ``(seed, 1, i)``), cut over the ranks like the
shard loader's val split, so it is the same set at every world size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .sources import BatchSource

if TYPE_CHECKING:
    import torch

STATE_FORMAT = 1
_SPLITS = {"train": 0, "val": 1}
INFINITE_EPOCH = 10**12  # the training stream never repeats: epoch stays 0


@dataclass
class MqarConfig:
    first_id: int = 4  # lowest token id used (keeps clear of pad/bos/eos/unk)
    num_keys: int = 512  # key ids; as many value ids follow them
    num_filler: int = 64  # filler ids after the values
    min_pairs: int = 4  # training: pairs per sequence drawn uniformly in [min_pairs, max_pairs]
    max_pairs: int = 64
    val_samples: int = 256  # size of the fixed val split

    @property
    def vocab_needed(self) -> int:
        return self.first_id + 2 * self.num_keys + self.num_filler

    def problems(self, vocab_size: int) -> list[str]:
        p = []
        if self.vocab_needed > vocab_size:
            p.append(f"data.mqar needs token ids up to {self.vocab_needed - 1} (first_id + 2 * num_keys + num_filler)"
                     f" but model.vocab_size={vocab_size}: lower data.mqar.num_keys or raise model.vocab_size")
        if not 1 <= self.min_pairs <= self.max_pairs or self.max_pairs > self.num_keys:
            p.append(f"data.mqar.min_pairs={self.min_pairs}, max_pairs={self.max_pairs}: need 1 <= min_pairs <= "
                     f"max_pairs <= num_keys={self.num_keys}")
        if self.num_filler < 2 or self.first_id < 0 or self.val_samples < 1:
            p.append("data.mqar.num_filler must be >= 2, first_id >= 0 and val_samples >= 1")
        return p


def mqar_sequence(rng: np.random.Generator, cfg: MqarConfig, length: int, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64[length], labels int64[length - 1]): one MQAR sequence and its shifted labels (-100 except at
    query keys, where the label is the value)."""
    if 4 * num_pairs > length:
        raise ValueError(f"MQAR with {num_pairs} pairs needs at least {4 * num_pairs} tokens, got {length}")
    if num_pairs > cfg.num_keys:
        raise ValueError(f"MQAR with {num_pairs} pairs needs as many distinct keys; data.mqar.num_keys={cfg.num_keys}")
    keys = cfg.first_id + rng.choice(cfg.num_keys, size=num_pairs, replace=False)
    values = cfg.first_id + cfg.num_keys + rng.integers(0, cfg.num_keys, size=num_pairs)
    filler0 = cfg.first_id + 2 * cfg.num_keys
    tokens = filler0 + rng.integers(0, cfg.num_filler, size=length)
    tokens[0:2 * num_pairs:2], tokens[1:2 * num_pairs:2] = keys, values
    rest = length - 2 * num_pairs  # N two-token query slots without overlap: stars and bars over the free tokens
    gaps = np.sort(rng.choice(rest - num_pairs, size=num_pairs, replace=False))
    starts = 2 * num_pairs + gaps + np.arange(num_pairs)
    order = rng.permutation(num_pairs)
    tokens[starts], tokens[starts + 1] = keys[order], values[order]
    labels = np.full(length - 1, -100, dtype=np.int64)
    labels[starts] = values[order]
    return tokens.astype(np.int64), labels


def passkey_sequence(rng: np.random.Generator, cfg: MqarConfig, length: int, depth: float,
                     passkey_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) for passkey retrieval: a haystack of one random filler "sentence" of 16 tokens repeated,
    ``marker passkey`` inserted at ``depth`` (0 = start, 1 = just before the question), and the sequence ending
    in ``marker passkey`` again; labels are the passkey tokens of the ending (teacher-forced), -100 elsewhere.
    The marker is the first two filler ids (never in the haystack), the passkey tokens are value ids."""
    need = 2 * (2 + passkey_tokens) + 1
    if length < need:
        raise ValueError(f"a passkey of {passkey_tokens} tokens needs sequences of at least {need} tokens")
    filler0 = cfg.first_id + 2 * cfg.num_keys
    marker = np.array([filler0, filler0 + 1])
    sentence = filler0 + 2 + rng.integers(0, cfg.num_filler - 2, size=16)
    key = cfg.first_id + cfg.num_keys + rng.integers(0, cfg.num_keys, size=passkey_tokens)
    needle = np.concatenate([marker, key])
    hay_len = length - 2 * len(needle)
    tokens = np.concatenate([np.resize(sentence, hay_len), needle])
    at = int(round(depth * hay_len))
    tokens = np.concatenate([tokens[:at], needle, tokens[at:]])
    labels = np.full(length - 1, -100, dtype=np.int64)
    first = length - passkey_tokens  # positions of the final passkey tokens
    labels[first - 1:length - 1] = tokens[first:]
    return tokens.astype(np.int64), labels


class _NumberedBatches(BatchSource):
    """A synthetic source whose batch g = 0, 1, ... is ``make_batch(g)``: train iterates endlessly from the resume
    position, val one pass per ``iter()`` (like ``make_val_loader``). The state is the batch number; ``RESUME_KEYS``
    must agree between the checkpoint and this loader."""
    KIND = ""
    RESUME_KEYS: tuple[str, ...] = ()
    _position = 0

    @staticmethod
    def _check_geometry(split: str, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        if split not in _SPLITS:
            raise ValueError(f"MQAR data has splits {sorted(_SPLITS)}, not {split!r}")
        if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
            raise ValueError(f"bad loader geometry: dp_rank={dp_rank} dp_size={dp_size} "
                             f"micro_batch_size={micro_batch_size}")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.split == "val":
            self._position = 0
            for g in range(self.batches_per_epoch):
                self._position = g + 1
                yield self.make_batch(g)
            return
        while True:
            batch = self.make_batch(self._position)
            self._position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "kind": self.KIND, "split": self.split, "epoch": self.epoch,
                "batch_in_epoch": self._position % self.batches_per_epoch, "seed": self.seed,
                "dp_size": self.dp_size, "micro_batch_size": self.batch, "seq_len": self.seq_len, "skipped": 0}

    def load_state_dict(self, sd: dict) -> None:
        """Resume right after the last consumed batch of ``sd``."""
        mine = {**self.state_dict(), "format": STATE_FORMAT}
        for key in ("format", "kind", "split", "seed", *self.RESUME_KEYS):
            if sd.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={sd.get(key)!r} but this MQAR loader has {mine[key]!r}: "
                                 "resume with the same data settings, data-parallel size and micro batch")
        self._position = sd["epoch"] * self.batches_per_epoch + sd["batch_in_epoch"]


class MqarLoader(_NumberedBatches):
    """``{"input_ids", "labels"}`` LongTensor(B, seq_len) batches of one data-parallel rank (module docstring). A
    ``BatchSource`` that never skips a sample (the protocol's default accounting). Resume is bit-exact on the same
    data-parallel size and micro batch; each rank has its own endless stream, so on another geometry (a job resumed on
    fewer GPUs) the ranks continue from the same batch number with the new layout's streams, fresh synthetic samples."""
    KIND, RESUME_KEYS = "mqar", ("seq_len",)

    def __init__(self, cfg: MqarConfig, split: str, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int = 0, vocab_size: int | None = None, pin_memory: bool = False):
        self._check_geometry(split, micro_batch_size, dp_rank, dp_size)
        problems = cfg.problems(vocab_size if vocab_size is not None else cfg.vocab_needed)
        if 4 * cfg.min_pairs > seq_len + 1:
            problems.append(f"data.seq_len={seq_len} is too short for data.mqar.min_pairs={cfg.min_pairs} "
                            f"(needs seq_len + 1 >= {4 * cfg.min_pairs})")
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.split, self.seq_len, self.seed = cfg, split, seq_len, seed
        self.batch, self.dp_rank, self.dp_size, self.pin_memory = micro_batch_size, dp_rank, dp_size, pin_memory
        self.max_pairs = min(cfg.max_pairs, (seq_len + 1) // 4)
        if split == "train":
            self.num_samples = None
            self.batches_per_epoch = INFINITE_EPOCH
        else:
            self.num_samples = cfg.val_samples
            self.batches_per_epoch = cfg.val_samples // (dp_size * micro_batch_size)
            if self.batches_per_epoch == 0:
                raise ValueError(f"data.mqar.val_samples={cfg.val_samples} is fewer than dp_size*micro_batch_size="
                                 f"{dp_size * micro_batch_size}: raise it")
        self._position = 0

    @property
    def epoch(self) -> int:
        return self._position // self.batches_per_epoch

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pairs = int(rng.integers(self.cfg.min_pairs, self.max_pairs + 1))
        return mqar_sequence(rng, self.cfg, self.seq_len + 1, pairs)

    def make_batch(self, g: int) -> dict[str, torch.Tensor]:
        import torch  # here, so that the config schema can import MqarConfig without torch

        if self.split == "train":
            rng = np.random.default_rng([self.seed, 0, self.dp_rank, g])
            rows = [self._row(rng) for _ in range(self.batch)]
        else:
            base = (self.dp_rank * self.batches_per_epoch + g % self.batches_per_epoch) * self.batch
            rows = [self._row(np.random.default_rng([self.seed, 1, i])) for i in range(base, base + self.batch)]
        tokens = torch.from_numpy(np.stack([t for t, _ in rows]))
        labels = torch.from_numpy(np.stack([lab for _, lab in rows]))
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch



# ------------------------------------------------------------------------------------------------------------------
# MQAR exactly as Zoology / Based generate it (``data.kind=mqar_zoology``)
#
# HazyResearch/zoology at dbcb60d2bd10a3cc7a89ee60c446c44900a4687f (the last commit before d88d6f5):
# zoology/data/multiquery_ar.py (``multiquery_ar``), zoology/data/utils.py (``prepare_data``: segment seeds,
# one segment per batch, no shuffling), experiments/paper_configs/arxiv24_based_figure2/configs.py (the mix).
# ------------------------------------------------------------------------------------------------------------------

ZOOLOGY_TRAIN = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
ZOOLOGY_TEST = ((64, 4, 1_000), (64, 8, 1_000), (64, 16, 1_000), (128, 32, 1_000), (256, 64, 1_000),
                (512, 128, 1_000), (1024, 256, 1_000))


@dataclass
class MqarZoologyConfig:
    """Zoology's MQAR (arXiv 2312.04927; the Based figure-2 mix, arXiv 2402.18668). Segments are
    ``[seq_len, num_kv_pairs, num_examples]``; each is generated from its own seed, drawn as Zoology draws them
    (``np.random.seed(seed)``, train seeds in [0, 2^31), test seeds in [2^31, 2^32)), so the test set never shares a
    seed with the training set."""
    vocab: int = 8192  # keys from [1, vocab/2), values from [vocab/2, vocab), noise from [0, vocab)
    power_a: float = 0.01  # query gaps ~ power law a * i^(a-1)
    seed: int = 123  # Zoology's DataConfig.seed
    random_non_queries: bool = True  # noise tokens between the queries (else 0)
    train: list[list[int]] = field(default_factory=lambda: [list(s) for s in ZOOLOGY_TRAIN])
    test: list[list[int]] = field(default_factory=lambda: [list(s) for s in ZOOLOGY_TEST])
    # where generated segments are kept (one .npy each, memory-mapped by every run); "" = generate in each process
    cache_dir: str = ""

    def problems(self, vocab_size: int) -> list[str]:
        p = []
        if self.vocab > vocab_size:
            p.append(f"data.mqar_zoology.vocab={self.vocab} exceeds model.vocab_size={vocab_size}: raise "
                     "model.vocab_size")
        if not 4 <= self.vocab <= 32767:
            p.append(f"data.mqar_zoology.vocab={self.vocab} must be in [4, 32767]")
        if not self.train or not self.test:
            p.append("data.mqar_zoology.train and .test need at least one [seq_len, pairs, examples] segment each")
        for name, segs in (("train", self.train), ("test", self.test)):
            for s in segs:
                if len(s) != 3 or s[0] % 2 or 4 * s[1] > s[0] or s[1] < 1 or s[2] < 1 or s[0] >= self.vocab \
                        or s[1] >= self.vocab // 2:
                    p.append(f"data.mqar_zoology.{name} segment {list(s)}: need [seq_len (even, < vocab), pairs "
                             "(>= 1, 4 * pairs <= seq_len), examples (>= 1)]")
        return p

    @property
    def max_train_len(self) -> int:
        return max(s[0] for s in self.train)


def zoology_segment_seeds(seed: int, n_train: int, n_test: int) -> tuple[list[int], list[int]]:
    """The per-segment seeds of Zoology's ``prepare_data``."""
    rs = np.random.RandomState(seed)
    top = 2 ** 32
    train = rs.randint(0, top // 2, size=n_train)
    test = rs.randint(top // 2, top, size=n_test)
    return [int(s) for s in train], [int(s) for s in test]


def zoology_segment(vocab: int, seq_len: int, num_pairs: int, num_examples: int, seed: int, power_a: float = 0.01,
                    random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), int64 (num_examples, seq_len): Zoology's ``multiquery_ar`` (one pass), draw for draw.

    All ``num_pairs`` key-value pairs first (keys distinct from [1, V/2), values distinct from [V/2, V)), then each
    key once more at position ``2 * num_pairs + 2 * gap``, gaps distinct and drawn from the power law
    ``a * i^(a-1)`` over ``(seq_len - 2 * num_pairs) / 2`` slots; its label is its value (-100 elsewhere). The
    other positions are noise from [0, V). The numpy stream is Zoology's (``RandomState(seed)``, the same calls in
    the same order: tests/test_mqar_zoology.py holds it against their function); the noise comes from a torch
    generator seeded with ``seed`` (Zoology uses the global torch RNG, seeded once per run)."""
    import torch

    if seq_len % 2 or vocab <= seq_len or 4 * num_pairs > seq_len:
        raise ValueError(f"Zoology MQAR needs an even seq_len < vocab and 4 * pairs <= seq_len; got seq_len={seq_len},"
                         f" pairs={num_pairs}, vocab={vocab}")
    rs = np.random.RandomState(seed)
    n, ctx = num_examples, 2 * num_pairs
    half = vocab // 2
    # choice(a, size, replace=False) without p is permutation(len(a))[:size]; apply_along_axis went row by row
    keys = np.stack([1 + rs.permutation(half - 1)[:num_pairs] for _ in range(n)])
    values = np.stack([half + rs.permutation(vocab - half)[:num_pairs] for _ in range(n)])
    space = (seq_len - ctx) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    slots = np.arange(space, dtype=int)
    gaps = np.stack([rs.choice(slots, replace=False, p=p, size=num_pairs) for _ in range(n)])
    examples = np.zeros((n, seq_len + 1), dtype=np.int64)
    examples[:, 0:ctx:2], examples[:, 1:ctx:2] = keys, values
    rows = np.arange(n)[:, None]
    examples[rows, ctx + 2 * gaps] = keys
    labels = np.full((n, seq_len + 1), -100, dtype=np.int64)
    labels[rows, ctx + 2 * gaps + 1] = values
    inputs, labels = examples[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = torch.randint(vocab, size=inputs.shape, generator=torch.Generator().manual_seed(seed)).numpy()
        inputs = np.where(inputs == 0, noise, inputs)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(labels)


def zoology_segments(cfg: MqarZoologyConfig, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The segments of ``split`` ("train" / "test") as int16 (inputs, labels) arrays (``zoology_segment_cached``)."""
    return [zoology_segment_cached(cfg, split, i) for i in range(len(cfg.train if split == "train" else cfg.test))]


def zoology_segment_cached(cfg: MqarZoologyConfig, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ``i`` of ``split``: from ``cfg.cache_dir`` when there (memory-mapped), else generated (and written
    there when it is set; atomically, so runs starting at once may race harmlessly)."""
    import hashlib
    import os

    seq_len, pairs, examples = (cfg.train if split == "train" else cfg.test)[i]
    train_seeds, test_seeds = zoology_segment_seeds(cfg.seed, len(cfg.train), len(cfg.test))
    seed = (train_seeds if split == "train" else test_seeds)[i]
    path = None
    if cfg.cache_dir:
        key = (cfg.vocab, seq_len, pairs, examples, seed, cfg.power_a, cfg.random_non_queries)
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
        path = os.path.join(os.path.expanduser(cfg.cache_dir),
                            f"mqar_zoology_L{seq_len}_N{pairs}_{examples}_{digest}.npy")
        if os.path.isfile(path):
            arr = np.load(path, mmap_mode="r")
            if arr.shape == (2, examples, seq_len):
                return arr[0], arr[1]
    inputs, labels = zoology_segment(cfg.vocab, seq_len, pairs, examples, seed, cfg.power_a, cfg.random_non_queries)
    arr = np.stack([inputs, labels]).astype(np.int16)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    return arr[0], arr[1]


class MqarZoologyLoader(_NumberedBatches):
    """Zoology's batching: every batch is ``micro_batch_size * dp_size`` consecutive examples of one segment (one
    sequence length, so nothing is padded), a segment's last batch may be smaller; an epoch is every batch of every
    segment once, in segment order (Zoology: no shuffling) or, with ``shuffle``, in an order drawn from
    ``(seed, epoch)``. Rank ``r`` takes its contiguous share of each batch's rows. The val split is the test
    segments, one pass per ``iter()``. Resumable: the position is the global batch number."""
    KIND, RESUME_KEYS = "mqar_zoology", ("dp_size", "micro_batch_size")  # these fix the batches

    def __init__(self, cfg: MqarZoologyConfig, split: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int = 0, shuffle: bool = False, vocab_size: int | None = None, pin_memory: bool = False):
        self._check_geometry(split, micro_batch_size, dp_rank, dp_size)
        problems = cfg.problems(vocab_size if vocab_size is not None else cfg.vocab)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.split, self.seed, self.shuffle = cfg, split, seed, shuffle and split == "train"
        self.batch, self.dp_rank, self.dp_size, self.pin_memory = micro_batch_size, dp_rank, dp_size, pin_memory
        self.segments = zoology_segments(cfg, "train" if split == "train" else "test")
        self.seq_len = max(inp.shape[1] for inp, _ in self.segments)
        gb = micro_batch_size * dp_size
        self.batches = []  # (segment, first row, end row) of this rank's share of each global batch
        self.dropped = 0  # rows of final batches too small to give every rank one
        for s, (inp, _) in enumerate(self.segments):
            for lo in range(0, len(inp), gb):
                hi = min(lo + gb, len(inp))
                if hi - lo < dp_size:
                    self.dropped += hi - lo
                    continue
                share = np.array_split(np.arange(lo, hi), dp_size)[dp_rank]
                self.batches.append((s, int(share[0]), int(share[-1]) + 1))
        self.batches_per_epoch = len(self.batches)
        self.num_samples = sum(len(inp) for inp, _ in self.segments)
        self._position = 0

    @property
    def epoch(self) -> int:
        return self._position // self.batches_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.batches_per_epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(self.batches_per_epoch)

    def make_batch(self, g: int) -> dict[str, torch.Tensor]:
        import torch

        epoch, b = divmod(g, self.batches_per_epoch)
        s, lo, hi = self.batches[int(self._order(epoch)[b])]
        inp, lab = self.segments[s]
        batch = {"input_ids": torch.from_numpy(np.asarray(inp[lo:hi], dtype=np.int64)),
                 "labels": torch.from_numpy(np.asarray(lab[lo:hi], dtype=np.int64))}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

