"""check_resumable: what makes a checkpoint unloadable, told from its train_state.json before any work."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from jambatrain import checkpoint
from jambatrain.models import ModelConfig


def _write(run_dir, model_config, world_size=2, zero_stage=2, with_parallel=True, batch_in_epoch=10):
    tag_dir = os.path.join(run_dir, "checkpoints", "step_00000010")
    os.makedirs(tag_dir)
    loader = {"dp_size": world_size, "micro_batch_size": 4, "epoch": 0, "batch_in_epoch": batch_in_epoch}
    state = checkpoint.TrainState(step=10, loader=loader,
                                  model_config=model_config,
                                  parallel={"world_size": world_size, "zero_stage": zero_stage} if with_parallel else {})
    with open(os.path.join(tag_dir, "train_state.json"), "w") as f:
        json.dump(asdict(state), f)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write("step_00000010")
    return "step_00000010"


def test_same_setup_resumes_and_runtime_fields_may_change(tmp_path):
    cfg = asdict(ModelConfig(name="a", num_hidden_layers=8))
    tag = _write(str(tmp_path), cfg)
    assert checkpoint.latest_tag(str(tmp_path)) == tag
    runtime = {**cfg, "mamba_impl": "reference", "moe_impl": "native", "activation_checkpointing": "full",
               "loss_chunk_tokens": 1024, "name": "b"}
    assert checkpoint.check_resumable(str(tmp_path), tag, runtime, world_size=2, zero_stage=2,
                                       micro_batch_size=4) == []


def test_architecture_change_is_refused_with_the_keys(tmp_path):
    cfg = asdict(ModelConfig(num_hidden_layers=8))
    tag = _write(str(tmp_path), cfg)
    (problem,) = checkpoint.check_resumable(str(tmp_path), tag, {**cfg, "hidden_size": 8192}, 2, 2, 4)
    assert "'hidden_size': (4096, 8192)" in problem and "hydra.run.dir" in problem


def test_world_size_change_is_refused_under_zero_only(tmp_path):
    cfg = asdict(ModelConfig())
    tag = _write(str(tmp_path / "z2"), cfg, world_size=16, zero_stage=2)
    (problem,) = checkpoint.check_resumable(str(tmp_path / "z2"), tag, cfg, world_size=8, zero_stage=2,
                                            micro_batch_size=4)
    assert "written by 16 data-parallel ranks" in problem and "this run has 8" in problem
    assert "export_hf" in problem and "model.init_from" in problem
    # plain data parallel (weights replicated): another size is fine at an epoch boundary ...
    tag = _write(str(tmp_path / "z0"), cfg, world_size=16, zero_stage=0, batch_in_epoch=0)
    assert checkpoint.check_resumable(str(tmp_path / "z0"), tag, cfg, 8, 0, micro_batch_size=4) == []
    # ... but mid-epoch the data position would not line up (nor with another micro batch)
    tag = _write(str(tmp_path / "z0mid"), cfg, world_size=16, zero_stage=0)
    (problem,) = checkpoint.check_resumable(str(tmp_path / "z0mid"), tag, cfg, 8, 0, micro_batch_size=4)
    assert "Mid-epoch resume needs the same values" in problem
    assert len(checkpoint.check_resumable(str(tmp_path / "z0mid"), tag, cfg, 16, 0, micro_batch_size=2)) == 1
    # checkpoints from before train_state recorded `parallel`: the loader's dp_size stands in
    tag = _write(str(tmp_path / "old"), cfg, world_size=4, with_parallel=False)
    assert len(checkpoint.check_resumable(str(tmp_path / "old"), tag, cfg, 2, 1, micro_batch_size=4)) == 1
