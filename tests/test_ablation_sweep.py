"""bench/ablation_sweep.sh end to end at toy size on CPU (ABL_CPU=1): the one multirun over the five presets, the
trainer's evals, the jambatrain.eval CLI per variant, the memory check, and the report's table and summary."""
import json
import os
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_sweep_script_runs_every_stage_and_reports(train_env, tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**train_env, "ABL_CPU": "1", "OUT": str(out), "RUNS": str(runs), "STEPS": "2",
           "PY": os.path.join(REPO, ".venv", "bin", "python") if os.path.isfile(os.path.join(REPO, ".venv", "bin",
                                                                                         "python")) else "python3"}
    p = subprocess.run(["bash", "bench/ablation_sweep.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = (out / "sweep.log").read_text()
    assert "Launching 5 jobs locally" in log and "retrying" not in log and "failed" not in log, log[-3000:]
    summary = json.loads((out / "ablation_summary.json").read_text())
    names = [v["name"] for v in summary["variants"]]
    assert names == ["h200_1b", "ablate_mamba_only", "ablate_attention_only", "ablate_attn_1to3", "ablate_rope"]
    for v in summary["variants"]:
        assert v["eval_source"] == "cli" and v["steps"] == 2 and v["val_loss"] > 0 and 0 <= v["mqar_acc"] <= 1
        assert len(v["recall_curve"]) == 2  # the trainer's evals at steps 1 and 2 (every STEPS / 4, at least 1)
    rows = summary["memory_check"]["rows"]
    assert all(r["kv_ratio_measured_over_formula"] == 1 and r["state_ratio_measured_over_formula"] == 1 for r in rows)
    table = (out / "ablation_table.md").read_text()
    assert "| pure Mamba |" in table and "kv cache at 262144 tokens: 4.000 GiB" in (out / "memory_table1.txt").read_text()
    assert not list(out.rglob("checkpoints"))  # only the small files come back to OUT
