"""Config composition of every experiment, schema strictness, cross-field checks, generated DeepSpeed dict."""
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from jambatrain.config import problems, register_schema, to_train_config
from jambatrain.optim import lr_at, param_groups
from jambatrain.parallel.deepspeed_setup import build_deepspeed_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml"))
MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "model")) if f.endswith(".yaml"))


def _compose(overrides):
    register_schema()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = to_train_config(_compose([f"experiment={experiment}", f"data.dir={tmp_path}"]))
    assert cfg.name == experiment
    assert problems(cfg, world_size=8) == []


@pytest.mark.parametrize("experiment,attention,mamba,rope", [
    ("h200_1b", 2, 14, False), ("ablate_attn_1to3", 4, 12, False), ("ablate_mamba_only", 0, 16, False),
    ("ablate_attention_only", 16, 0, False), ("ablate_rope", 2, 14, True)])
def test_paper_ablations_change_only_the_layout(experiment, attention, mamba, rope, tmp_path):
    """The sec. 6 ablation presets are h200_1b with one thing changed: which layers attend, or RoPE."""
    from dataclasses import asdict

    from jambatrain.models import JambaLM

    cfg = to_train_config(_compose([f"experiment={experiment}", f"data.dir={tmp_path}"]))
    base = to_train_config(_compose(["experiment=h200_1b", f"data.dir={tmp_path}"]))
    changed = {k for k, v in asdict(cfg.model).items() if asdict(base.model)[k] != v}
    assert changed <= {"attn_layer_period", "attn_layer_offset", "use_rope"}
    assert (cfg.parallel, cfg.optim, cfg.data) == (base.parallel, base.optim, base.data)
    pattern = cfg.model.layer_pattern().split()
    assert (sum(p[0] == "a" for p in pattern), sum(p[0] == "m" for p in pattern)) == (attention, mamba)
    assert cfg.model.use_rope == rope
    with torch.device("meta"):
        assert JambaLM(cfg.model).num_params() > 1e9


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_builds_on_meta(model, tmp_path):
    from jambatrain.models import JambaLM

    cfg = to_train_config(_compose([f"model={model}", f"data.dir={tmp_path}"]))
    with torch.device("meta"):
        m = JambaLM(cfg.model)
    assert m.num_params() >= m.num_active_params() > 0


def test_tiny_cpu_keys_the_scripts_rely_on():
    cfg = _compose(["experiment=tiny_cpu", "trainer.max_steps=7", "trainer.save_every=3", "optim.lr=0.01",
                    "hydra.run.dir=/tmp/x"])
    tc = to_train_config(cfg)
    assert (tc.trainer.max_steps, tc.trainer.save_every, tc.optim.lr) == (7, 3, 0.01)
    assert tc.parallel.device == "cpu" and tc.parallel.precision == "fp32"
    assert tc.model.vocab_size >= tc.data.vocab_size


def test_misspelt_key_fails_at_startup():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["experiment=tiny_cpu", "trainer.max_stepz=3"])


def test_wrong_type_fails_at_startup():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["experiment=tiny_cpu", "trainer.max_steps=many"])


def test_cross_field_problems_name_the_key_and_fix(tmp_path):
    cfg = to_train_config(_compose(["experiment=tiny_cpu", "model.num_attention_heads=3",
                                    "data.vocab_size=10000", "parallel.zero_stage=4"]))
    msgs = "\n".join(problems(cfg))
    assert "model.num_attention_heads=3" in msgs
    assert "data.vocab_size=10000" in msgs and "model.vocab_size" in msgs
    assert "parallel.zero_stage=4" in msgs
    cfg = to_train_config(_compose(["data=shards", f"data.dir={tmp_path}/missing"]))
    assert any("does not exist" in p and "write_shards" in p for p in problems(cfg))


@pytest.mark.parametrize("overrides,world,expected", [
    (["parallel.expert_parallel_size=2"], 4, None),
    (["parallel.expert_parallel_size=4"], 4, None),
    (["parallel.expert_parallel_size=3"], 6, "must divide both the world size (6 ranks) and model.num_experts (4): "
                                            "choose one of [1, 2]"),
    (["parallel.expert_parallel_size=8"], 8, "choose one of [1, 2, 4]"),
    (["parallel.expert_parallel_size=2", "parallel=zero3"], 2, "parallel.zero_stage=3: DeepSpeed does not run"),
    (["parallel.expert_parallel_size=2", "model.num_experts=1"], 2, "the model has no MoE layers"),
])
def test_expert_parallel_rules_are_one_message_each_with_the_fix(overrides, world, expected):
    cfg = to_train_config(_compose(["experiment=tiny_cpu", *overrides]))
    found = [p for p in problems(cfg, world_size=world) if "expert_parallel_size" in p]
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


def test_deepspeed_config_is_generated_from_the_hydra_config(tmp_path):
    cfg = to_train_config(_compose(["experiment=tiny_cpu", "parallel.zero_stage=1", "parallel.grad_accum_steps=3",
                                    "optim.grad_clip=0.5"]))
    ds = build_deepspeed_config(cfg, world_size=4, device=torch.device("cpu"))
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == cfg.parallel.micro_batch_size * 3 * 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    cfg = to_train_config(_compose(["experiment=h200_1b"]))
    ds = build_deepspeed_config(cfg, world_size=8, device=torch.device("cuda"))
    assert ds["bf16"]["enabled"] is True


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = to_train_config(_compose(["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]))
    o = cfg.optim
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    assert lr_at(500, o, 110) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_ssm_params():
    from jambatrain.models import JambaLM, ModelConfig

    m = JambaLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert {"A_log", "D", "bias", "weight"} <= nd  # norm weights are 1-D
    assert all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1

