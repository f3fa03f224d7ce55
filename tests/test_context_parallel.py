"""Context parallelism on CPU (gloo): the model split over cp ranks against one process on the whole sequence
(tests/cp_worker.py under torchrun), DeepSpeed ZeRO-1/2 steps, and the trainer end to end (per-step losses against
one process; a checkpoint written at cp 2 resumed at cp 1 and cp 4 with the global batch kept).

Tolerance: fp32, relative to the largest reference value: 1e-5 for logits, loss and every parameter gradient (what
is measured is ~1e-6: the same math in another summation order); the negative controls miss by > 1e-3."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port, torchrun_worker

WORKER = os.path.join(REPO, "tests", "cp_worker.py")
TOL = 1e-5


def worker(nproc: int, *args) -> dict:
    return torchrun_worker(WORKER, nproc, *args, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_model_equals_one_process(world):
    """world 2: cp 2 without and with document starts, a MoE model with expert parallelism 2 (EP groups span
    the cp group), and whole-layer recomputation with a chunked loss (the collectives run again in backward);
    world 4: cp 2 (2 dp replicas) and cp 4 (KV heads replicated: 2 KV heads, 4 ranks), with and
    without documents, and RoPE. Document starts sit on slice edges and inside conv halos; labels hold unevenly
    placed ignored positions."""
    out = worker(world, "model")
    want = {2: {"cp2_plain", "cp2_doc", "cp2_moe_doc", "cp2_recompute_doc"},
            4: {"cp2_plain", "cp2_doc", "cp4_plain", "cp4_doc", "cp4_rope_doc"}}[world]
    assert set(out) == want
    for case, e in out.items():
        assert e["logits"] < TOL and e["loss"] < TOL and e["grad"] < TOL, (case, e)


@pytest.mark.slow
@pytest.mark.parametrize("control,what", [("nohalo", "grad"), ("rankmean", "loss")])
def test_negative_controls_fail(control, what):
    """Dropping the conv halo (zeros instead of the previous rank's tokens), or a per-rank mean loss instead of the
    mean over the whole sequence, are caught by the comparison above."""
    out = worker(2, "model", control)["cp2_doc"]
    assert out[what] > 1e-3 and out["grad"] > 1e-3, out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_steps_equal_one_process(stage):
    """Two optimizer steps (grad accumulation 2, clipping, AdamW with decay) of the real engine at cp 2 on 2 ranks
    leave the weights of one process that trained on the whole sequences, with the same losses."""
    out = worker(2, "step", stage)
    assert out["max_param_err"] < 1e-4, out  # relative, after two Adam updates (their normalisation amplifies)
    assert out["losses"] == pytest.approx(out["ref_losses"], rel=TOL)


def run_train(env, run_dir, *overrides, nproc=1):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "jambatrain.train"] if nproc > 1 else [sys.executable, "-m", "jambatrain.train"]
    cmd += ["experiment=tiny_cpu", f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", "logger=none",
            "trainer.log_every=1", "optim.warmup_steps=2", "optim.decay_steps=4", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_trainer_cp2_matches_one_process_and_resumes_at_cp1_and_cp4(train_env, tmp_path):
    """``torchrun --nproc_per_node 2 -m jambatrain.train experiment=tiny_cpu parallel.context_parallel_size=2``
    gives one process's per-step losses (same global batch of 4 sequences: micro batch 2 x grad accumulation 2), here
    with expert parallelism 2 over the same two ranks (tiny_cpu has 4 experts).
    Its step-2 checkpoint resumes at cp 1 on one rank with micro batch 1 (grad accumulation 4 keeps the global
    batch) and at cp 4 on 4 ranks; both continue with the uninterrupted run's losses. (Same dp size: a resume on
    another dp size keeps the global batch too, but the loader then deals the remaining samples out in another
    order, so its losses are not the uninterrupted run's.)"""
    common = ["parallel.micro_batch_size=2", "parallel.grad_accum_steps=2"]
    one, cp2 = str(tmp_path / "one"), str(tmp_path / "cp2")
    run_train(train_env, one, "trainer.max_steps=4", "trainer.save_every=0", *common)
    out = run_train(train_env, cp2, "trainer.max_steps=2", "trainer.save_every=2",
                    "parallel.context_parallel_size=2", "parallel.expert_parallel_size=2", *common, nproc=2)
    assert "expert parallel 2, context parallel 2" in out
    ref = losses(one)
    got = losses(cp2)
    assert list(got) == [1, 2] and [got[s] for s in (1, 2)] == pytest.approx([ref[s] for s in (1, 2)], rel=1e-5)

    cp4 = str(tmp_path / "cp4")
    shutil.copytree(cp2, cp4)
    out = run_train(train_env, cp2, "trainer.max_steps=4", "trainer.save_every=0", "parallel.micro_batch_size=1",
                    "parallel.grad_accum_steps=2")
    assert "resumed from" in out and "keeping its global batch of 4 sequences with parallel.grad_accum_steps=4" in out
    out4 = run_train(train_env, cp4, "trainer.max_steps=4", "trainer.save_every=0",
                     "parallel.context_parallel_size=4", *common, nproc=4)
    assert "resumed from" in out4
    for run in (cp2, cp4):
        got = losses(run)
        assert list(got) == [1, 2, 3, 4]
        assert [got[s] for s in (3, 4)] == pytest.approx([ref[s] for s in (3, 4)], rel=1e-5), (run, got, ref)


def _problems(world: int, cp: int, seq_len: int = 256, **model) -> list[str]:
    from jambatrain.config import DataConfig, ParallelConfig, TrainConfig, problems
    from jambatrain.models import ModelConfig

    m = ModelConfig(**{**dict(name="t", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                              num_attention_heads=4, num_key_value_heads=2, num_experts=4), **model})
    cfg = TrainConfig(model=m, data=DataConfig(kind="mqar", seq_len=seq_len),
                      parallel=ParallelConfig(context_parallel_size=cp))
    return [p for p in problems(cfg, world) if "context_parallel_size" in p]


def test_config_rules_name_the_fix():
    assert _problems(4, 1) == [] and _problems(4, 2) == [] and _problems(4, 4) == []  # 4 KV-head-replicating ranks
    (p,) = _problems(4, 3)
    assert "must divide the world size (4 ranks): choose one of [1, 2, 4]" in p
    (p,) = _problems(4, 4, seq_len=250)
    assert "must divide data.seq_len=250" in p
    (p,) = _problems(8, 8)  # 4 query heads cannot be split 8 ways
    assert "cannot split the attention heads" in p and "choose cp in [2, 4]" in p
    (p,) = _problems(8, 8, attn_layer_period=100, attn_layer_offset=50, seq_len=8)  # pure Mamba: heads no matter
    assert "1 tokens per rank, fewer than the Mamba conv halo" in p
    (p,) = _problems(2, 3, num_key_value_heads=4, num_attention_heads=12, hidden_size=96)
    assert "world size" in p


def test_in_training_eval_is_refused_under_cp():
    from jambatrain.config import DataConfig, ParallelConfig, TrainConfig, TrainerConfig, problems

    cfg = TrainConfig(data=DataConfig(kind="mqar", seq_len=1024), parallel=ParallelConfig(context_parallel_size=2),
                      trainer=TrainerConfig(eval_every=10))
    assert any("trainer.eval_every=10 with parallel.context_parallel_size=2" in p for p in problems(cfg, 2))


def test_parallel_dims_layout():
    from jambatrain.parallel.parallel_dims import ParallelDims

    d = ParallelDims(world_size=8, rank=5, cp=4, ep=2)
    assert (d.dp, d.dp_rank, d.cp_rank, d.cp_ranks()) == (2, 1, 1, [4, 5, 6, 7])
    assert d.global_batch(micro_batch_size=2, grad_accum_steps=3) == 12  # a cp group shares its sequences
