"""Hydra ``-m`` sweeps: a new sweep never resumes an older one, and the advice under ``-m`` names hydra.sweep.dir."""
import os
import sys

import pytest

from conftest import REPO, run_proc

pytestmark = pytest.mark.slow


def _sweep(env, cwd, *extra):
    cmd = [sys.executable, "-m", "jambatrain.train", "-m", "experiment=tiny_cpu", "data=mqar", "data.seq_len=32",
           "optim.lr=1e-3", "trainer.max_steps=2", "trainer.save_every=2", "logger=none",
           "trainer.progress_bar=false", *extra]
    return run_proc(cmd, cwd=cwd, env=env, timeout=300)


def test_a_new_sweep_gets_its_own_dir_and_never_resumes_the_last_one(train_env, tmp_path):
    """Two ``-m`` sweeps of the same name: each gets its own timestamped dir under multirun/<name>/. The second asks
    for a resume (trainer.resume=true) and finds no checkpoint in its new dir; the error's advice names
    hydra.sweep.dir, never hydra.run.dir (which does not apply to -m)."""
    env = {k: v for k, v in train_env.items() if k != "JAMBATRAIN_SWEEP_DIR"}
    first = _sweep(env, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _sweep(env, tmp_path, "trainer.resume=true")
    out = second.stdout + second.stderr
    root = tmp_path / "multirun" / "tiny_cpu"
    sweeps = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(sweeps) == 2, (sweeps, out[-3000:])
    assert os.path.isdir(sweeps[0] / "0" / "checkpoints" / "step_00000002")
    assert second.returncode != 0 and "has no complete checkpoint" in out, out[-3000:]
    assert "resumed from" not in out
    assert f"point hydra.sweep.dir at the run to resume" in out and "hydra.run.dir" not in out
