"""The synthetic recall data (data=mqar): structure of a sequence, determinism per seed/rank/step, resume."""
import numpy as np
import pytest
import torch

from jambatrain.data.mqar import MqarConfig, MqarLoader, mqar_sequence, passkey_sequence

CFG = MqarConfig(num_keys=32, num_filler=8, min_pairs=2, max_pairs=8, val_samples=24)


def test_sequence_asks_every_key_once_and_labels_its_value():
    tokens, labels = mqar_sequence(np.random.default_rng(0), CFG, 65, 8)
    keys, values = tokens[0:16:2], tokens[1:16:2]
    assert len(set(keys.tolist())) == 8 and all(4 <= k < 36 for k in keys) and all(36 <= v < 68 for v in values)
    scored = np.flatnonzero(labels != -100)
    assert len(scored) == 8 and scored.min() >= 16
    pair = dict(zip(keys.tolist(), values.tolist()))
    for p in scored:  # a query key at p, its value at p + 1 and as the label
        assert labels[p] == pair[tokens[p]] == tokens[p + 1]
    assert sorted(tokens[scored].tolist()) == sorted(keys.tolist())
    with pytest.raises(ValueError, match="needs at least"):
        mqar_sequence(np.random.default_rng(0), CFG, 31, 8)


def test_passkey_needle_at_depth_and_labels_the_final_passkey():
    for depth in (0.0, 0.5, 1.0):
        tokens, labels = passkey_sequence(np.random.default_rng(1), CFG, 101, depth, 5)
        marker = [CFG.first_id + 64, CFG.first_id + 65]
        starts = [i for i in range(100) if tokens[i] == marker[0] and tokens[i + 1] == marker[1]]
        assert len(starts) == 2 and starts[1] == 101 - 7
        assert abs(starts[0] - depth * (101 - 14)) <= 1
        assert (tokens[starts[0] + 2:starts[0] + 7] == tokens[-5:]).all()
        assert (labels[-5:] == tokens[-5:]).all() and (labels[:-5] == -100).all()


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_is_deterministic_per_seed_and_rank_and_resumes_exactly():
    a = _batches(MqarLoader(CFG, "train", 63, 3, 0, 2, seed=5), 6)
    b = _batches(MqarLoader(CFG, "train", 63, 3, 0, 2, seed=5), 6)
    other_rank = _batches(MqarLoader(CFG, "train", 63, 3, 1, 2, seed=5), 1)
    other_seed = _batches(MqarLoader(CFG, "train", 63, 3, 0, 2, seed=6), 1)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert a[0]["input_ids"].shape == (3, 63) and a[0]["labels"].shape == (3, 63)
    assert not torch.equal(a[0]["input_ids"], other_rank[0]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], other_seed[0]["input_ids"])
    first = MqarLoader(CFG, "train", 63, 3, 0, 2, seed=5)
    _batches(first, 4)
    state = first.state_dict()
    resumed = MqarLoader(CFG, "train", 63, 3, 0, 2, seed=5)
    resumed.load_state_dict(state)
    for x, y in zip(_batches(resumed, 2), a[4:]):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    other = MqarLoader(CFG, "train", 63, 3, 0, 4, seed=5)  # another geometry: same batch number, new streams
    other.load_state_dict(state)
    assert other.state_dict()["batch_in_epoch"] == state["batch_in_epoch"]
    with pytest.raises(ValueError, match="seed"):
        MqarLoader(CFG, "train", 63, 3, 0, 2, seed=9).load_state_dict(state)


def test_val_split_is_one_set_at_every_world_size():
    one = torch.cat([b["input_ids"] for b in MqarLoader(CFG, "val", 63, 4, 0, 1, seed=5)])
    two = torch.cat([b["input_ids"] for r in (0, 1) for b in MqarLoader(CFG, "val", 63, 4, r, 2, seed=5)])
    assert one.shape[0] == 24 and torch.equal(one, two)
    again = torch.cat([b["input_ids"] for b in MqarLoader(CFG, "val", 63, 4, 0, 1, seed=5)])
    assert torch.equal(one, again)  # one pass per iter(), the same each time


def test_bad_settings_are_refused_with_the_key():
    with pytest.raises(ValueError, match="model.vocab_size"):
        MqarLoader(CFG, "train", 63, 2, 0, 1, vocab_size=50)
    with pytest.raises(ValueError, match="data.seq_len"):
        MqarLoader(MqarConfig(min_pairs=32), "train", 63, 2, 0, 1)


@pytest.mark.slow
def test_trainer_on_mqar_resumes_exactly(train_env, tmp_path):
    """data=mqar through the trainer: 6 steps straight == 3 steps, stop, resume to 6 (the loader position is in
    the checkpoint), with no corpus on disk."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    def run(run_dir, steps):
        cmd = [sys.executable, "-m", "jambatrain.train", "experiment=tiny_cpu", "data=mqar", "data.seq_len=64",
               f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.save_every=3", "optim.warmup_steps=2",
               "optim.decay_steps=6", "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
        p = subprocess.run(cmd, cwd=REPO, env=train_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))}

    straight = run(str(tmp_path / "a"), 6)
    run(str(tmp_path / "b"), 3)
    split = run(str(tmp_path / "b"), 6)
    assert sorted(split) == list(range(1, 7))
    for step in range(4, 7):
        assert split[step] == pytest.approx(straight[step], rel=1e-6), (step, split, straight)
