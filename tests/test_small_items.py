"""Small first-use frictions: CLI exit codes, eval's CPU sizes, the vocabulary warning, the run's own tokenizer."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from jambatrain.config import TrainConfig


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=120)


def test_eval_help_exits_0_with_usage():
    p = _run("jambatrain.eval", "--help")
    assert p.returncode == 0 and "python -m jambatrain.eval RUN_DIR_OR_CHECKPOINT" in p.stdout, p.stderr[-2000:]


def test_plan_exits_non_zero_when_it_prints_a_problem():
    p = _run("jambatrain.plan", "--gpus", "3", "model=tiny", "parallel.expert_parallel_size=2")
    assert "PROBLEM: parallel.expert_parallel_size=2" in p.stdout and p.returncode == 1, p.stdout + p.stderr[-2000:]


def test_eval_on_cpu_scales_its_default_sizes_down_and_keeps_what_was_given():
    from jambatrain.eval import scale_defaults

    cfg = TrainConfig()
    cfg.parallel.micro_batch_size = 4
    assert scale_defaults(cfg, torch.device("cpu"), ["eval.mqar_samples=64"]) == [
        "eval.val_batches=16", "eval.passkey_samples=2", "eval.batch_size=16"]
    ev = cfg.eval
    assert (ev.val_batches, ev.mqar_samples, ev.passkey_samples, ev.batch_size) == (16, 32, 2, 16)
    gpu = TrainConfig()
    assert scale_defaults(gpu, torch.device("cuda"), []) == [] and gpu.eval.val_batches == 0


def test_a_model_vocab_far_above_the_tokenizers_is_warned_about(tmp_path, capsys):
    from jambatrain.data import write_synthetic_shards
    from jambatrain.parallel.distributed import DistInfo
    from jambatrain.train import prepare_data

    write_synthetic_shards(str(tmp_path), {"train": 4, "val": 1}, seq_len=16, vocab_size=2048, samples_per_shard=4)
    dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    for model_vocab, warned in ((4096, True), (2048 + 64, False)):
        cfg = TrainConfig()
        cfg.data.dir, cfg.data.doc_mask, cfg.model.vocab_size = str(tmp_path), False, model_vocab
        prepare_data(cfg, dist)
        out = capsys.readouterr().out
        assert ("WARNING: model.vocab_size=4096 but the tokenizer" in out) == warned, out
        assert not warned or "set model.vocab_size=2048" in out
    cfg = TrainConfig()  # the reverse: an error (ids past the embedding)
    cfg.data.dir, cfg.data.doc_mask, cfg.model.vocab_size = str(tmp_path), False, 1024
    with pytest.raises(SystemExit, match="has 2048 tokens but model.vocab_size=1024"):
        prepare_data(cfg, dist)


def test_the_run_keeps_its_tokenizer_and_export_ships_that_one(tmp_path):
    from jambatrain.export_hf import find_tokenizer
    from jambatrain.train import keep_tokenizer

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "tokenizer.model").write_bytes(b"the tokenizer the run trained with")
    keep_tokenizer(str(data), str(run), resuming=False)
    assert (run / "tokenizer.model").read_bytes() == b"the tokenizer the run trained with"
    (data / "tokenizer.model").write_bytes(b"a rebuilt cache's tokenizer")  # the cache rebuilt since
    run_cfg = {"data": {"dir": str(data)}}
    assert find_tokenizer(run_cfg, str(run)) == str(run / "tokenizer.model")
    with pytest.raises(SystemExit, match="differs from"):
        keep_tokenizer(str(data), str(run), resuming=True)
    keep_tokenizer(str(data), str(run), resuming=False)  # a fresh run in that dir takes the new one
    assert (run / "tokenizer.model").read_bytes() == b"a rebuilt cache's tokenizer"
