"""The batch-source contract (data/sources.py BatchSource) and the data-kind registry (KINDS): every loader honours the
contract, and a kind is one registry entry that the trainer, the evaluator and the config checks go through."""
from __future__ import annotations

import glob
import re

import pytest

from conftest import REPO
from jambatrain.config import Kind, TrainConfig, problems
from jambatrain.data import sources
from jambatrain.data.mqar import MqarLoader
from jambatrain.data.sources import KINDS, BatchSource, DataKind


def _mqar_cfg() -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.kind, cfg.data.seq_len, cfg.model.vocab_size = "mqar", 64, 4096
    cfg.parallel.micro_batch_size = 2
    return cfg


def test_the_kind_choices_are_the_registry():
    assert [k.value for k in Kind] == list(KINDS) and all(KINDS[k].name == k for k in KINDS)


def test_a_source_that_never_skips_takes_the_protocols_accounting():
    loader = sources.make_loader(_mqar_cfg(), "train", 0, 1, "")
    assert isinstance(loader, MqarLoader) and isinstance(loader, BatchSource)
    assert "count_skips" not in vars(MqarLoader) and "skipped" not in vars(MqarLoader)  # no stubs of its own
    assert (loader.skipped, loader.count_skips(0.0), loader.skips_counted) == (0, 0, True)
    assert loader.uncounted_skips().tolist() == [0.0]
    with pytest.raises(RuntimeError, match="never skips a sample, yet the ranks reported 3"):
        loader.count_skips(3.0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 64) and loader.epoch == 0
    state = loader.state_dict()
    again = sources.make_loader(_mqar_cfg(), "train", 0, 1, "")
    again.load_state_dict(state)
    assert (next(iter(again))["input_ids"] == next(iter(loader))["input_ids"]).all()


def test_a_new_kind_is_one_registry_entry(monkeypatch, tmp_path):
    """The trainer's preparation, the loader, the config checks and the document mask all go through the entry."""
    import torch

    seen = []

    class Ones(BatchSource):
        batches_per_epoch = 3

        def __init__(self, split):
            self.split, self.position = split, 0

        def __iter__(self):
            while True:
                self.position += 1
                yield {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long)}

        @property
        def epoch(self):
            return self.position // 3

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, sd):
            self.position = sd["position"]

    toy = DataKind("mqar", config_problems=lambda cfg: seen.append("checked") or ["data.toy: broken, fix it"],
                   prepare=lambda cfg, dist: seen.append("prepared") or str(tmp_path),
                   loader=lambda cfg, split, r, n, d, pin: Ones(split), data_dir=lambda cfg: str(tmp_path),
                   documents=True)
    monkeypatch.setitem(KINDS, "mqar", toy)
    cfg = _mqar_cfg()
    cfg.data.eos_id = 1
    assert "data.toy: broken, fix it" in problems(cfg)
    from jambatrain.train import prepare_data

    assert prepare_data(cfg, dist=None) == str(tmp_path)
    loader = sources.make_loader(cfg, "train", 0, 1, str(tmp_path))
    assert isinstance(loader, Ones) and loader.count_skips(0) == 0
    assert sources.doc_starts(next(iter(loader)), cfg.data, "cpu").tolist() == [[False, True, True, True]]
    assert seen == ["checked", "prepared"]


def test_nothing_outside_the_registry_switches_on_the_data_kind():
    offenders = []
    for path in glob.glob(f"{REPO}/jambatrain/**/*.py", recursive=True):
        if path.endswith("data/sources.py"):
            continue
        for i, line in enumerate(open(path), 1):
            if re.search(r"data\.kind\s*(==|!=|in\b)|kind\s*==\s*\"(shards|mqar)\"", line):
                offenders.append(f"{path}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
