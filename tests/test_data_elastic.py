"""Issue 23: the global sample stream end to end. A run resumed on another number of ranks (2 ranks -> 1 process
with grad accumulation 2, and 1 -> 2) or another context-parallel size follows the uninterrupted run's losses to
fp32 noise."""
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
    steps, then 2 ranks; and 2 ranks at context parallel 2 (one data-parallel replica, accumulation 2) for 3 steps,
    then at cp 1. Every step's loss equals the reference's within 1e-4 relative."""
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
    # a context-parallel change: cp 2 (dp 1, accumulation 2) for 3 steps, then cp 1 (dp 2): the same samples
    cp = str(tmp_path / "cp2_then_cp1")
    run_train(train_env, cp, "trainer.max_steps=3", "parallel.expert_parallel_size=2",
              "parallel.context_parallel_size=2", "parallel.grad_accum_steps=2", *COMMON)
    run_train(train_env, cp, "trainer.max_steps=6", "parallel.expert_parallel_size=2", *COMMON)
    for name, run in (("2 -> 1", one), ("1 -> 2", back), ("cp 2 -> cp 1", cp)):
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4, 5, 6], (name, got)
        for step in range(1, 7):
            assert got[step] == pytest.approx(reference[step], rel=1e-4), (name, step, got, reference)


def test_training_from_a_url_matches_the_local_dir_and_a_missing_url_fails_first(train_env, tmp_path):
    """3 steps from http://127.0.0.1:PORT/ (a loopback server of the same shards) give the local dir's losses;
    a URL with no manifest is one error line before any model is built."""
    from jambatrain.data.remote import serve_directory
    from test_train_e2e import corpus_copy

    data = corpus_copy(train_env, tmp_path)
    server, url = serve_directory(data)
    try:
        common = ["data.prepare=none", "trainer.max_steps=3", *COMMON]
        local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
        run_train(train_env, local, f"data.dir={data}", *common, nproc=1)
        run_train(train_env, remote, f"data.dir={url}", *common, nproc=1)
        assert losses(remote) == losses(local) and sorted(losses(local)) == [1, 2, 3]
        p = run_train(train_env, str(tmp_path / "missing"), f"data.dir={url}/nope", *common, nproc=1, check=False)
        assert p.returncode != 0 and f"jambatrain: {url}/nope/manifest.json not found" in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        assert not os.path.exists(os.path.join(tmp_path, "missing", "metrics.jsonl"))
    finally:
        server.shutdown()
