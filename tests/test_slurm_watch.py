"""Hydra's submitit launcher on a SLURM cluster without accounting: a failed job is seen as ended (squeue when
sacct fails), and a job that refuses its config records the failure, so the sweep stops with the reason."""
import os
import stat
import sys

import pytest

from conftest import REPO, run_proc

submitit = pytest.importorskip("submitit")


def _fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_job_states_come_from_squeue_when_sacct_fails(tmp_path, monkeypatch, capfd):
    from submitit.slurm.slurm import SlurmInfoWatcher

    from jambatrain import slurm_watch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sacct", 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1\n')
    _fake(bin_dir, "squeue", 'printf "12_0|RUNNING\\n77|PENDING\\n"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm_watch.install()
    watcher = SlurmInfoWatcher(delay_s=0)
    for job in ("12_0", "12_1"):
        watcher.register_job(job)
    assert watcher.get_state("12_0", mode="force") == "RUNNING" and not watcher.is_done("12_0", mode="force")
    assert watcher.is_done("12_1", mode="force")  # gone from squeue: ended (its result file decides how)
    for _ in range(3):
        watcher.update()
    err = capfd.readouterr().err
    assert err.count("sacct failed (sacct: error: Slurm accounting storage is disabled): taking job states from "
                     "squeue") == 1 and "Bypassing sacct error" not in err, err


@pytest.mark.slow
def test_a_sweep_job_that_refuses_its_config_fails_the_sweep_with_the_reason(train_env, tmp_path):
    """A SystemExit is no Exception to submitit: without the conversion the job leaves no result file, which a
    cluster without accounting never reports as failed."""
    cmd = [sys.executable, "-m", "jambatrain.train", "-m", "hydra/launcher=submitit_local", "experiment=tiny_cpu",
           "data=mqar", "trainer.max_steps=0", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    p = run_proc(cmd, cwd=REPO, env=train_env, timeout=300)
    assert p.returncode != 0
    assert "trainer.max_steps=0 must be >= 1" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    results = list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))
    assert results, "the job recorded no result"
