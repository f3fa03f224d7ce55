"""How a process finds its rank: torchrun's env, submitit's task layout, or refused when srun started it bare."""
from __future__ import annotations

import os

import pytest

from jambatrain.config import ParallelConfig
from jambatrain.parallel import distributed


@pytest.fixture
def clean_env(monkeypatch):
    """None of the launcher variables set; whatever a test (or the code under test) sets is undone after it."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
              "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(k, "")  # records the original value (or its absence) for the undo ...
        monkeypatch.delenv(k)  # ... then removes it
    return monkeypatch


def test_bare_srun_tasks_are_refused_before_any_process_group(clean_env):
    clean_env.setenv("SLURM_NTASKS", "8")
    with pytest.raises(SystemExit, match="one of 8 SLURM tasks without torchrun.*launch/slurm.sbatch"):
        distributed.init_distributed(ParallelConfig(device="cpu"))


def test_torchrun_children_of_an_srun_step_are_fine(clean_env):
    clean_env.setenv("SLURM_NTASKS", "4")  # srun started one torchrun per node; torchrun set RANK for its children
    clean_env.setenv("RANK", "0")
    distributed.export_submitit_env()  # a no-op: torchrun's env is there
    assert "WORLD_SIZE" not in os.environ


def test_submitit_tasks_get_torchs_env_from_the_task_layout(clean_env):
    # the environment submitit's local executor gives task 1 of a 2-task job
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
                 "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}.items():
        clean_env.setenv(k, v)
    distributed.export_submitit_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] and os.environ["MASTER_PORT"].isdigit()


def test_missing_configs_are_named_with_the_fix(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "JAMBATRAIN_CONF_DIR": str(tmp_path / "nowhere")}
    p = subprocess.run([sys.executable, "-m", "jambatrain.train", "experiment=tiny_cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and str(tmp_path / "nowhere") in p.stderr and "JAMBATRAIN_CONF_DIR" in p.stderr
