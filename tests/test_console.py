"""What a run prints: W&B in one line, a config error once under torchrun, DeepSpeed's deprecated-collective
warning dropped (and only that one)."""
import os
import sys
import warnings

import pytest

from conftest import REPO, free_port, run_proc


def test_wandb_init_prints_one_line(tmp_path, capfd, monkeypatch):
    from jambatrain.config import TrainConfig
    from jambatrain.metrics import MetricsLogger

    for k in ("WANDB_SILENT", "WANDB_QUIET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig()
    cfg.logger.wandb_mode = "offline"
    logger = MetricsLogger(cfg, str(tmp_path / "run"), True, {"a": 1})
    logger.log(1, {"loss": 1.0})
    logger.close()
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jambatrain: W&B run ") and "wandb sync" in lines[0], lines


def test_only_the_all_gather_into_tensor_deprecation_is_dropped():
    from jambatrain.train import quiet_known_warnings

    msg = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `all_gather_single` instead."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        # as torch attributes it: to the c10d_logger wrapper of the deprecated function
        warnings.warn_explicit(msg, FutureWarning, "torch/distributed/c10d_logger.py", 83,
                               module="torch.distributed.c10d_logger")
        warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="mine")  # from elsewhere: still said
        warnings.warn_explicit("something else", FutureWarning, "torch/distributed/c10d_logger.py", 83,
                               module="torch.distributed.c10d_logger")
    assert [(str(w.message), w.filename) for w in seen] == [(msg, "mine.py"),
                                                            ("something else", "torch/distributed/c10d_logger.py")]


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_printed_once(train_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "jambatrain.train", "experiment=tiny_cpu", "+trainer.max_step=5"]
    p = run_proc(cmd, cwd=REPO, env=train_env, timeout=300)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count("did you mean trainer.max_steps?") == 1, p.stderr[-3000:]
