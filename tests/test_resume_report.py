"""Resume with changed settings: a table of what differs from the checkpoint's run and which value is in effect,
and the values in effect are the ones the table names."""
import json
import math
import os
import sys

import pytest

from conftest import REPO, run_proc
from jambatrain.config import TrainConfig
from jambatrain.optim import lr_at


def test_resume_changes_table():
    from jambatrain.train import flat_config, resume_changes

    saved = flat_config(TrainConfig())
    now = dict(saved, **{"optim.lr": 3e-3, "trainer.max_steps": 300, "data.seq_len": None,
                         "parallel.grad_accum_steps": 2, "model.hidden_size": 7})
    table = resume_changes(saved, now, 50).splitlines()
    assert table[0].split() == ["setting", "checkpoint", "now", "in", "effect"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"optim.lr", "trainer.max_steps", "parallel.grad_accum_steps"}  # None / model.*: not here
    assert rows["optim.lr"].split()[1:] == ["0.0003", "0.003", "now,", "from", "step", "50"]
    assert "global batch is kept" in rows["parallel.grad_accum_steps"]
    assert resume_changes({}, now, 50) == "" and resume_changes(saved, saved, 50) == ""


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_resume_with_a_changed_lr_says_so_and_applies_it(train_env, tmp_path, zero):
    """ZeRO-3 too: DeepSpeed's own load restores the scheduler's base LR, which the trainer sets back to optim.lr."""
    run = str(tmp_path / "run")

    def train(*extra):
        cmd = [sys.executable, "-m", "jambatrain.train", "experiment=tiny_cpu", "data=mqar", "data.seq_len=32",
               "trainer.save_every=4", "trainer.log_every=1", "optim.warmup_steps=2", "optim.decay_steps=8",
               "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={run}", f"parallel.zero_stage={zero}",
               *extra]
        p = run_proc(cmd, cwd=REPO, env=train_env, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p

    train("trainer.max_steps=4", "optim.lr=2e-3")
    p = train("trainer.max_steps=6", "optim.lr=5e-3")
    head, _, table = p.stdout.partition("with settings that differ from the checkpoint's:\n")
    assert "resuming step_00000004 (step 4)" in head, p.stdout[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line.startswith("  ")}
    assert rows["optim.lr"] == ["0.002", "0.005", "now,", "from", "step", "4"]
    assert rows["trainer.max_steps"][:2] == ["4", "6"]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lrs = {r["step"]: r["lr"] for r in map(json.loads, f)}
    cfg = TrainConfig().optim
    cfg.lr, cfg.warmup_steps, cfg.decay_steps = 5e-3, 2, 8
    assert math.isclose(lrs[5], lr_at(4, cfg, 6), rel_tol=1e-6)  # the table's claim holds: the new lr is used
