"""Issue 23: the global sample stream end to end. A run resumed on another number of ranks (2 ranks -> 1 process
with grad accumulation 2, and 1 -> 2) follows the uninterrupted run's losses to fp32 noise."""
import json
import os
import shutil

import pytest

from test_train_e2e import metrics, run_train

pytestmark = pytest.mark.slow

COMMON = ["trainer.log_every=1", "trainer.save_every=3", "optim.warmup_steps=2", "optim.decay_steps=6",
          "logger=none", "parallel.zero_stage=2"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def test_elastic_resume_follows_the_uninterrupted_run(train_env, tmp_path):
    """tiny_cpu MoE: 2 ranks (expert parallel 2) for 3 steps, then on to 6 on 2 ranks (the reference: resume on
    the same geometry is bit-exact) and on 1 process (grad accumulation 2); and 1 process (accumulation 2) for 3
    steps, then 2 ranks. Every step's loss equals the reference's within 1e-4 relative."""
    two, one = str(tmp_path / "two"), str(tmp_path / "two_then_one")
    run_train(train_env, two, "trainer.max_steps=3", "parallel.expert_parallel_size=2", *COMMON)
    shutil.copytree(two, one)
    run_train(train_env, two, "trainer.max_steps=6", "parallel.expert_parallel_size=2", *COMMON)
    p = run_train(train_env, one, "trainer.max_steps=6", *COMMON, nproc=1)
    assert "keeping its global batch of 8 sequences with parallel.grad_accum_steps=2" in p.stdout
    reference = losses(two)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    state = json.load(open(os.path.join(two, "checkpoints", "step_00000006", "train_state.json")))
    assert state["loader"]["consumed_samples"] == 6 * 8

    back = str(tmp_path / "one_then_two")
    run_train(train_env, back, "trainer.max_steps=3", "parallel.grad_accum_steps=2", *COMMON, nproc=1)
    run_train(train_env, back, "trainer.max_steps=6", "parallel.expert_parallel_size=2", *COMMON)
    for name, run in (("2 -> 1", one), ("1 -> 2", back)):
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4, 5, 6], (name, got)
        for step in range(1, 7):
            assert got[step] == pytest.approx(reference[step], rel=1e-4), (name, step, got, reference)
