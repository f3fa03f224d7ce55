"""Checkpoint bookkeeping without an engine: which tag is complete, what may resume, the global batch kept."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from jambatrain import checkpoint
from jambatrain.models import ModelConfig


def _write(run_dir, model_config, step=10, world_size=2, zero_stage=2, kind="portable", global_batch=8,
           files=None):
    """A tag as the commit protocol leaves it: its files, then manifest.json listing them with their sizes."""
    tag = f"step_{step:08d}"
    tag_dir = os.path.join(run_dir, "checkpoints", tag)
    os.makedirs(tag_dir)
    state = checkpoint.TrainState(step=step, model_config=model_config,
                                  parallel={"world_size": world_size, "zero_stage": zero_stage,
                                            "global_batch": global_batch})
    with open(os.path.join(tag_dir, "train_state.json"), "w") as f:
        json.dump(asdict(state), f)
    listed = {"train_state.json": os.path.getsize(os.path.join(tag_dir, "train_state.json"))}
    for name, data in (files or {"params_r00000_000.pt": b"x" * 100}).items():
        with open(os.path.join(tag_dir, name), "wb") as f:
            f.write(data)
        listed[name] = len(data)
    with open(os.path.join(tag_dir, "manifest.json"), "w") as f:
        json.dump({"format": checkpoint.FORMAT, "kind": kind, "step": step, "files": listed, "params": {}}, f)
    return tag


def test_same_setup_resumes_and_runtime_fields_may_change(tmp_path):
    cfg = asdict(ModelConfig(name="a", num_hidden_layers=8))
    tag = _write(str(tmp_path), cfg)
    assert checkpoint.latest_tag(str(tmp_path)) == tag
    runtime = {**cfg, "mamba_impl": "reference", "moe_impl": "native", "activation_checkpointing": "full",
               "loss_chunk_tokens": 1024, "name": "b", "compile_elementwise": False, "fused_rms_norm": False,
               "mamba_kernel_layout": False, "init_from": "/some/hf/dir"}
    assert checkpoint.check_resumable(str(tmp_path), tag, runtime, world_size=2, zero_stage=2) == []


def test_architecture_change_is_refused_with_the_keys(tmp_path):
    cfg = asdict(ModelConfig(num_hidden_layers=8))
    tag = _write(str(tmp_path), cfg)
    (problem,) = checkpoint.check_resumable(str(tmp_path), tag, {**cfg, "hidden_size": 8192}, 2, 2)
    assert "'hidden_size': (4096, 8192)" in problem and "hydra.run.dir" in problem


def test_portable_checkpoints_resume_on_any_world_size_and_zero_1_2_but_zero3_is_pinned(tmp_path):
    cfg = asdict(ModelConfig())
    tag = _write(str(tmp_path / "z2"), cfg, world_size=16, zero_stage=2)
    for world, stage in ((8, 2), (16, 1), (1, 0)):
        assert checkpoint.check_resumable(str(tmp_path / "z2"), tag, cfg, world, stage) == []
    (problem,) = checkpoint.check_resumable(str(tmp_path / "z2"), tag, cfg, 16, 3)
    assert "zero_stage=1 or 2" in problem
    tag = _write(str(tmp_path / "z3"), cfg, world_size=16, zero_stage=3, kind="deepspeed-zero3")
    assert checkpoint.check_resumable(str(tmp_path / "z3"), tag, cfg, 16, 3) == []
    (problem,) = checkpoint.check_resumable(str(tmp_path / "z3"), tag, cfg, 8, 3)
    assert "on 16 ranks" in problem and "this run has 8" in problem
    (problem,) = checkpoint.check_resumable(str(tmp_path / "z3"), tag, cfg, 16, 2)
    assert "parallel.zero_stage=3" in problem


def test_global_batch_is_kept_by_grad_accumulation():
    saved = {"global_batch": 32}
    assert checkpoint.resume_grad_accum(saved, 4, 8, 1) == (1, None)  # same layout
    assert checkpoint.resume_grad_accum(saved, 2, 8, 1) == (2, None)  # half the ranks: accumulate twice
    assert checkpoint.resume_grad_accum(saved, 1, 4, 1) == (8, None)  # another micro batch too
    gas, problem = checkpoint.resume_grad_accum(saved, 3, 8, 1)
    assert gas == 1 and "global batch is 32" in problem and "micro batch size" in problem
    assert checkpoint.resume_grad_accum({}, 3, 8, 2) == (2, None)  # nothing recorded: as configured


def test_newest_complete_tag_wins_and_incomplete_ones_are_left_in_place(tmp_path, capsys):
    run = str(tmp_path)
    cfg = asdict(ModelConfig())
    _write(run, cfg, step=10)
    newer = _write(run, cfg, step=20)
    os.remove(os.path.join(run, "checkpoints", newer, "manifest.json"))  # a save that died before its commit
    truncated = _write(run, cfg, step=30, files={"params_r00000_000.pt": b"y" * 50})
    with open(os.path.join(run, "checkpoints", truncated, "params_r00000_000.pt"), "wb") as f:
        f.write(b"y" * 7)  # a shard cut short after the manifest was written
    os.makedirs(os.path.join(run, "checkpoints", "step_00000040.partial"))  # never committed
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000030")  # a pointer file is not trusted
    assert checkpoint.latest_tag(run, report=True) == "step_00000010"
    err = capsys.readouterr().err
    assert "step_00000030 is incomplete (params_r00000_000.pt has 7 bytes, the manifest says 50)" in err
    assert "step_00000020 is incomplete (no readable manifest.json" in err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "latest", "step_00000010", "step_00000020", "step_00000030", "step_00000040.partial"]


def test_prune_keeps_the_newest_complete_tags_and_never_newer_or_incomplete_ones(tmp_path):
    run = str(tmp_path)
    cfg = asdict(ModelConfig())
    for step in (10, 20, 30, 40):
        _write(run, cfg, step=step)
    broken = _write(run, cfg, step=25)
    os.remove(os.path.join(run, "checkpoints", broken, "manifest.json"))
    checkpoint.prune(os.path.join(run, "checkpoints"), keep=2, current="step_00000030")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000020", "step_00000025",
                                                                     "step_00000030", "step_00000040"]


def test_export_without_transformers_says_how_to_get_it_and_writes_nothing(tmp_path, monkeypatch):
    import sys

    import pytest

    from jambatrain.export_hf import export

    run = str(tmp_path / "run")
    tag = _write(run, asdict(ModelConfig(name="t", num_hidden_layers=2)), files={})
    monkeypatch.setitem(sys.modules, "transformers", None)  # as in the quickstart's environment
    out = tmp_path / "exported"
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[hf\]'.*nothing was written"):
        export(os.path.join(run, "checkpoints", tag), str(out), find_tok=False)
    assert not out.exists() and not list(tmp_path.glob("exported*"))


def test_storage_problems_are_said_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoint dir should be")
    (problem,) = checkpoint.storage_problems(str(run), 1000)
    assert "not writable" in problem and "hydra.run.dir" in problem
    ok = tmp_path / "ok"
    assert checkpoint.storage_problems(str(ok), 1000) == []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 9 << 30, 1 << 30))
    (problem,) = checkpoint.storage_problems(str(ok), checkpoint.checkpoint_bytes(200_000_000, 2, 8))
    assert "1.00 GiB free" in problem and "2.24 GiB" in problem and "trainer.save_every=0" in problem


def test_a_new_runtime_knob_may_change_on_resume_with_no_list_edited(tmp_path, monkeypatch):
    """The resume check reads the schema's marks (models/config.py ``runtime`` / ``arch``): a knob added as
    ``runtime(...)`` may differ from the checkpoint's, one added as ``arch(...)`` may not; nothing else is edited."""
    import dataclasses

    from jambatrain.models import config as model_config

    plus = dataclasses.make_dataclass("ModelConfigPlus", [("new_kernel_switch", bool, model_config.runtime(False)),
                                                          ("new_width", int, model_config.arch(8, hf=False))],
                                      bases=(ModelConfig,))
    monkeypatch.setattr(model_config, "ModelConfig", plus)
    saved = asdict(plus(num_hidden_layers=8))
    tag = _write(str(tmp_path), saved)
    assert checkpoint.check_resumable(str(tmp_path), tag, {**saved, "new_kernel_switch": True}, 2, 2) == []
    (problem,) = checkpoint.check_resumable(str(tmp_path), tag, {**saved, "new_width": 16}, 2, 2)
    assert "'new_width': (8, 16)" in problem
    assert "new_kernel_switch" in model_config.runtime_fields() and "new_width" not in model_config.hf_fields()
