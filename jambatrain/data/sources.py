"""Batch sources: the contract the trainer and the evaluator hold a loader to (``BatchSource``), and the one place per
data kind (``KINDS``: its config checks, its preparation, its loader).

A new data source is a ``DataKind`` entry in ``KINDS`` (its name becomes a value of ``data.kind``) whose loader
subclasses ``BatchSource``; nothing else in the trainer or the evaluator switches on ``data.kind``. This module
imports neither torch nor the config schema at import time (the schema imports it for the kind names).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer (``train.Run.loader``) and the evaluator call on a data-parallel rank's loader.

    Required: iterating gives ``{"input_ids", "labels"}`` LongTensor (micro_batch, seq_len) batches (labels already
    shifted; -100 is not scored); ``batches_per_epoch`` per rank (a large number for an endless stream);
    ``epoch`` (logged); ``state_dict`` / ``load_state_dict`` (a checkpoint's ``train_state.json["loader"]``:
    resume continues right after the last batch consumed; JSON-serialisable).

    Optional, with defaults a subclass inherits: the bad-sample accounting of a source that can drop a sample
    (``data.on_error=skip``). The defaults are those of a source that never drops one: nothing skipped, nothing
    to count, and a count handed back that is not zero is a bug it says so."""

    batches_per_epoch: int

    def __iter__(self) -> Iterator[dict[str, "torch.Tensor"]]: ...

    @property
    def epoch(self) -> int: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...

    # ------------------------------------------------------------ optional: bad samples skipped
    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (all ranks' up to the last ``count_skips``, this rank's since)."""
        return 0

    def uncounted_skips(self, device=None) -> "torch.Tensor":
        """This rank's skips not yet counted, a 1-element float32 tensor on ``device``: the trainer sums it over the
        ranks inside the all-reduce of its logged metrics and hands the sum to ``count_skips``."""
        import torch

        return torch.zeros(1, device=device)

    def count_skips(self, total) -> int:
        """Add ``total`` (the ranks' summed ``uncounted_skips``) to the run's count; returns it as an int."""
        n = int(round(float(total)))
        if n:
            raise RuntimeError(f"{type(self).__name__} never skips a sample, yet the ranks reported {n} skips")
        return 0

    @property
    def skips_counted(self) -> bool:
        """No batch read since the last ``count_skips`` (the same on every rank): the trainer then needs no extra
        all-reduce before a checkpoint."""
        return True


# ---------------------------------------------------------------- the data kinds
@dataclass(frozen=True)
class DataKind:
    """One value of ``data.kind``. Every function takes the ``TrainConfig``.

    config_problems(cfg)             what is wrong with the data config, before any work (files looked at, nothing
                                     built); each with its fix
    prepare(cfg, dist) -> data_dir   once per run before the model is built: build what is missing, check the data
                                     against the config (may fill unset ``data.*`` values); "" for synthetic data
    loader(cfg, split, dp_rank, dp_size, data_dir, pin_memory) -> BatchSource
                                     ``split`` "train" (endless) or "val" (one pass per ``iter()``)
    data_dir(cfg) -> str             where its files are ("" when it has none): the evaluator's ``val`` task
    documents                        batches hold packed documents ended by ``data.eos_id`` (``doc_starts``)
    """
    name: str
    config_problems: Callable
    prepare: Callable
    loader: Callable
    data_dir: Callable = lambda cfg: ""
    documents: bool = False


def data_kind(cfg) -> DataKind:
    """The ``DataKind`` of ``cfg.data.kind``."""
    return KINDS[str(cfg.data.kind)]


def make_loader(cfg, split: str, dp_rank: int, dp_size: int, data_dir: str, pin_memory: bool = False) -> BatchSource:
    """The batch source of ``data.kind`` for one data-parallel rank (micro batch ``parallel.micro_batch_size``, seed
    ``trainer.seed``)."""
    return data_kind(cfg).loader(cfg, split, dp_rank, dp_size, data_dir, pin_memory)


def doc_starts(batch: dict, data, device):
    """True at the token after each EOS, where packed documents start (``data.doc_mask`` on a kind whose batches
    hold packed documents; None otherwise)."""
    if not data.doc_mask or not KINDS[str(data.kind)].documents:
        return None
    import torch

    ids = batch["input_ids"]
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == data.eos_id
    return starts.to(device, non_blocking=True)


# ---------------------------------------------------------------- shards: webdataset token shards on disk
def _shards_config_problems(cfg) -> list[str]:
    from ..paths import cache_root
    from .remote import is_url

    p, data = [], cfg.data
    data_dir = os.path.expanduser(data.dir)
    if data.prepare == "stdlib":
        if data.vocab_size is None or data.seq_len is None:
            p.append("data.prepare=stdlib builds a corpus and needs data.vocab_size and data.seq_len "
                     "(conf/data/stdlib_py.yaml sets them)")
        elif data.vocab_size > cfg.model.vocab_size:
            p.append(f"data.vocab_size={data.vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}: token ids "
                     "would fall outside the embedding; lower data.vocab_size or raise model.vocab_size")
        root = cache_root()
        inside = os.path.commonpath([os.path.abspath(data_dir), os.path.abspath(root)]) == os.path.abspath(root)
        if not inside and not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            p.append(f"data.dir={data.dir} holds no corpus, and data.prepare=stdlib builds the embedded corpus only "
                     f"under the cache {root} (so that a mistyped path does not get a new corpus silently): check "
                     "the path, or set JAMBATRAIN_CACHE to the directory to build it under, or train on your own "
                     "shards with data=shards data.dir=...")
    elif not os.path.isdir(data_dir) and not is_url(data_dir):  # a URL is read (and refused if dead) later
        p.append(f"data.dir={data.dir} does not exist: write shards there with `python -m data_prep.write_shards` "
                 "or use data=stdlib_py to build the embedded default corpus")
    return p


def shards_manifest_problems(cfg, manifest: dict, data_dir: str) -> list[str]:
    """Fill ``data.seq_len``, ``data.vocab_size`` and ``data.eos_id`` left unset (None) from the shards' manifest,
    and return every way the shards disagree with the config (all at once, each with its fix)."""
    data, p = cfg.data, []
    for key, theirs in (("seq_len", manifest["seq_len"]), ("vocab_size", manifest["vocab_size"]),
                        ("eos_id", manifest.get("eos_id"))):
        ours = getattr(data, key)
        if ours is None:
            setattr(data, key, theirs)
        elif ours != theirs and (key != "eos_id" or data.doc_mask):
            p.append(f"data.{key}={ours} but the shards in {data_dir} have {key} {theirs}: set data.{key}={theirs} "
                     "(or leave it unset to take the manifest's), or rewrite the shards")
    cp = cfg.parallel.context_parallel_size
    if data.seq_len and data.seq_len % cp:
        p.append(f"parallel.context_parallel_size={cp} must divide data.seq_len={data.seq_len} (the shards' sequence "
                 f"length): choose a cp dividing {data.seq_len}")
    if manifest["vocab_size"] > cfg.model.vocab_size:
        p.append(f"the tokenizer of {data_dir} has {manifest['vocab_size']} tokens but model.vocab_size="
                 f"{cfg.model.vocab_size}: raise model.vocab_size or retokenize with a smaller vocabulary")
    if data.doc_mask and (data.eos_id is None or data.eos_id < 0):
        p.append(f"data.doc_mask=true but the shards in {data_dir} record no EOS token: set data.doc_mask=false or "
                 "rewrite the shards with a tokenizer that has one")
    return p


def _shards_prepare(cfg, dist) -> str:
    """Build the embedded corpus on first use (local rank 0 of every node, so nodes without a shared cache get
    their own copy; a file lock serialises builders on a shared one; the other ranks wait), then check the
    shards against the config: data.seq_len / vocab_size / eos_id left unset are taken from the manifest, and
    every disagreement is reported at once."""
    from ..parallel.distributed import barrier
    from .shards import ShardDataError, read_manifest

    data_dir = os.path.expanduser(cfg.data.dir)
    if cfg.data.prepare == "stdlib":
        if dist.local_rank == 0:
            from .corpus import prepare_default_corpus

            prepare_default_corpus(data_dir, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
        barrier()
    try:  # skip: the loader warns per shard; a URL's manifest is fetched here (a dead or wrong URL: one line)
        manifest = read_manifest(data_dir, check_files=cfg.data.on_error == "raise")
    except ShardDataError as exc:
        raise SystemExit(f"jambatrain: {exc}") from None
    errors = shards_manifest_problems(cfg, manifest, data_dir)
    if errors:
        raise SystemExit("jambatrain: the data does not fit the config:\n  - " + "\n  - ".join(errors))
    unused = cfg.model.vocab_size - manifest["vocab_size"]
    if unused >= 128 and dist.is_main:  # more than padding to a multiple of 128
        print(f"jambatrain: WARNING: model.vocab_size={cfg.model.vocab_size} but the tokenizer of {data_dir} has "
              f"{manifest['vocab_size']} tokens: {unused} embedding and output rows are never a target (wasted "
              f"parameters, and the softmax spreads over ids that never occur); set model.vocab_size="
              f"{manifest['vocab_size']} (or the next multiple of 128)", flush=True)
    return data_dir


def _shards_loader(cfg, split, dp_rank, dp_size, data_dir, pin_memory=False) -> BatchSource:
    """train: a shuffled, endless ``TokenShardLoader``; val: one unshuffled pass per ``iter()``."""
    from .loader import TokenShardLoader, make_val_loader

    data, mbs = cfg.data, cfg.parallel.micro_batch_size
    if split == "train":
        return TokenShardLoader(data_dir, "train", mbs, dp_rank, dp_size, num_workers=data.num_workers,
                                seed=cfg.trainer.seed, shuffle=data.shuffle, vocab_size=cfg.model.vocab_size,
                                on_error=data.on_error, pin_memory=pin_memory)
    return make_val_loader(data_dir, mbs, dp_rank, dp_size, vocab_size=cfg.model.vocab_size)


# ---------------------------------------------------------------- mqar: synthetic associative recall (mqar.py)
def _mqar_loader(cfg, split, dp_rank, dp_size, data_dir, pin_memory=False) -> BatchSource:
    from .mqar import MqarLoader

    return MqarLoader(cfg.data.mqar, "val" if split != "train" else "train", cfg.data.seq_len,
                      cfg.parallel.micro_batch_size, dp_rank, dp_size, seed=cfg.trainer.seed,
                      vocab_size=cfg.model.vocab_size, pin_memory=pin_memory)


# ---------------------------------------------------------------- mqar_zoology: Zoology / Based MQAR (mqar.py)
def _mqar_zoology_loader(cfg, split, dp_rank, dp_size, data_dir, pin_memory=False) -> BatchSource:
    """Zoology's MQAR: fixed segments, one sequence length per batch."""
    from .mqar import MqarZoologyLoader

    data = cfg.data
    return MqarZoologyLoader(data.mqar_zoology, "val" if split != "train" else "train", cfg.parallel.micro_batch_size,
                             dp_rank, dp_size, seed=cfg.trainer.seed, shuffle=data.shuffle,
                             vocab_size=cfg.model.vocab_size, pin_memory=pin_memory)


KINDS: dict[str, DataKind] = {
    "shards": DataKind("shards", config_problems=_shards_config_problems, prepare=_shards_prepare,
                       loader=_shards_loader, data_dir=lambda cfg: os.path.expanduser(cfg.data.dir), documents=True),
    "mqar": DataKind("mqar", config_problems=lambda cfg: cfg.data.mqar.problems(cfg.model.vocab_size),
                     prepare=lambda cfg, dist: "", loader=_mqar_loader),  # synthetic: no files
    "mqar_zoology": DataKind("mqar_zoology",
                             config_problems=lambda cfg: cfg.data.mqar_zoology.problems(cfg.model.vocab_size),
                             prepare=lambda cfg, dist: "", loader=_mqar_zoology_loader),  # synthetic: no files
}
