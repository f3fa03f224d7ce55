"""The trainer's and the evaluator's one place that picks a batch source from ``data.kind``."""
from __future__ import annotations


def make_loader(cfg, split: str, dp_rank: int, dp_size: int, data_dir: str, pin_memory: bool = False):
    """``data.kind=shards``: a ``TokenShardLoader`` over ``data_dir`` (train: shuffled, endless; val: one unshuffled
    pass per ``iter()``); ``data.kind=mqar``: an ``MqarLoader`` (synthetic recall, no files). ``cfg`` is a
    ``TrainConfig``; the micro batch is ``parallel.micro_batch_size``, the seed ``trainer.seed``."""
    data, mbs = cfg.data, cfg.parallel.micro_batch_size
    if data.kind == "mqar_zoology":  # Zoology's MQAR: fixed segments, one sequence length per batch
        from .mqar import MqarZoologyLoader

        return MqarZoologyLoader(data.mqar_zoology, "val" if split != "train" else "train", mbs, dp_rank, dp_size,
                                 seed=cfg.trainer.seed, shuffle=data.shuffle, vocab_size=cfg.model.vocab_size,
                                 pin_memory=pin_memory)
    if data.kind == "mqar":
        from .mqar import MqarLoader

        return MqarLoader(data.mqar, "val" if split != "train" else "train", data.seq_len, mbs, dp_rank, dp_size,
                          seed=cfg.trainer.seed, vocab_size=cfg.model.vocab_size, pin_memory=pin_memory)
    from .loader import TokenShardLoader, make_val_loader

    if split == "train":
        return TokenShardLoader(data_dir, "train", mbs, dp_rank, dp_size, num_workers=data.num_workers,
                                seed=cfg.trainer.seed, shuffle=data.shuffle, vocab_size=cfg.model.vocab_size,
                                on_error=data.on_error, pin_memory=pin_memory)
    return make_val_loader(data_dir, mbs, dp_rank, dp_size, vocab_size=cfg.model.vocab_size)


def doc_starts(batch: dict, data, device):
    """True at the token after each EOS, where packed documents start (``data.doc_mask`` on packed shards; None
    otherwise: synthetic sequences hold no documents)."""
    if not data.doc_mask or data.kind != "shards":
        return None
    import torch

    ids = batch["input_ids"]
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == data.eos_id
    return starts.to(device, non_blocking=True)
