"""Config composition of every experiment, schema strictness, cross-field checks, generated DeepSpeed dict."""
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from jambatrain.config import problems, register_schema, to_train_config
from jambatrain.optim import lr_at, param_groups
from jambatrain.parallel.deepspeed_setup import build_deepspeed_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml"))
MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "model")) if f.endswith(".yaml"))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The default corpus's cache is tmp_path: data.dir=tmp_path with data=stdlib_py is then a path it may build in."""
    monkeypatch.setenv("JAMBATRAIN_CACHE", str(tmp_path))


def _compose(overrides, hydra_cfg=False):
    register_schema()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_cfg)


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



GROUP_SCHEMA = {"model": "model", "data": "data", "optim": "optim", "parallel": "parallel", "trainer": "trainer",
                "logger": "logger"}


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _schema_value(key: str):
    from dataclasses import fields, is_dataclass

    from jambatrain.config import TrainConfig

    node = TrainConfig()
    for part in key.split("."):
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            return KeyError
        node = getattr(node, part)
    return node


def test_no_yaml_restates_a_schema_default():
    """The dataclasses in jambatrain/config.py and models/config.py are the one source of every default: a group yaml
    holds only what differs from them, and an experiment only what differs from the groups it picks."""
    import yaml

    restated = []
    for group in GROUP_SCHEMA:
        for f in sorted(os.listdir(os.path.join(CONF, group))):
            raw = yaml.safe_load(open(os.path.join(CONF, group, f))) or {}
            for key, value in _leaves({k: v for k, v in raw.items() if k != "defaults"}):
                if value == _schema_value(f"{group}.{key}"):
                    restated.append(f"conf/{group}/{f}: {key}: {value!r}")
    for exp in EXPERIMENTS:
        raw = yaml.safe_load(open(os.path.join(CONF, "experiment", f"{exp}.yaml")))
        full = _compose([f"experiment={exp}", "data.dir=/x"], hydra_cfg=True)
        picks = [f"{g}={c}" for g, c in full.hydra.runtime.choices.items() if g in GROUP_SCHEMA]
        base = OmegaConf.to_container(_compose([*picks, "data.dir=/x"]), resolve=False)
        for key, value in _leaves({k: v for k, v in raw.items() if k not in ("defaults", "name")}):
            group_value = base
            for part in key.split("."):
                group_value = group_value[part]
            if value == group_value:
                restated.append(f"conf/experiment/{exp}.yaml: {key}: {value!r} (as its groups {picks})")
    assert not restated, "\n".join(restated)


def test_dir_mandatory_and_manifest_values_with_data_shards(tmp_path):
    """data=shards without data.dir names the missing key (no default cache path); seq_len, vocabulary and EOS
    come from the manifest unless set, and every disagreement is reported at once."""
    from jambatrain.config import data_problems

    with pytest.raises(SystemExit, match="must be set: data.dir"):
        to_train_config(_compose(["data=shards"]))
    cfg = to_train_config(_compose(["data=shards", f"data.dir={tmp_path}"]))
    assert (cfg.data.seq_len, cfg.data.vocab_size, cfg.data.eos_id) == (None, None, None)
    assert data_problems(cfg, {"seq_len": 512, "vocab_size": 4000, "eos_id": 2}, str(tmp_path)) == []
    assert (cfg.data.seq_len, cfg.data.vocab_size, cfg.data.eos_id) == (512, 4000, 2)
    cfg = to_train_config(_compose(["data=shards", f"data.dir={tmp_path}", "data.seq_len=256",
                                    "model.vocab_size=1000"]))
    found = data_problems(cfg, {"seq_len": 512, "vocab_size": 4000, "eos_id": 2}, str(tmp_path))
    assert len(found) == 2 and "data.seq_len=256" in found[0] and "data.seq_len=512" in found[0]
    assert "model.vocab_size=1000" in found[1]


def test_mistyped_data_dir_with_the_default_corpus_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JAMBATRAIN_CACHE", str(tmp_path / "cache"))
    cfg = to_train_config(_compose(["experiment=tiny_cpu"]))
    assert cfg.data.dir == str(tmp_path / "cache" / "stdlib_py_v4096_s256") and problems(cfg) == []
    cfg = to_train_config(_compose(["experiment=tiny_cpu", f"data.dir={tmp_path}/stdlib_pyy"]))
    msg = [p for p in problems(cfg) if "holds no corpus" in p]
    assert len(msg) == 1 and "JAMBATRAIN_CACHE" in msg[0] and str(tmp_path / "cache") in msg[0]
    built = tmp_path / "elsewhere"  # a corpus built earlier outside the cache is used as it is
    built.mkdir()
    (built / "manifest.json").write_text("{}")
    assert problems(to_train_config(_compose(["experiment=tiny_cpu", f"data.dir={built}"]))) == []


def test_choices_are_enums_checked_once():
    from jambatrain.models import ModelConfig

    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        to_train_config(_compose(["experiment=tiny_cpu", "data.on_error=ignore"]))
    assert "expected one of [raise, skip]" in str(err.value.__cause__ or err.value)
    cfg = to_train_config(_compose(["experiment=tiny_cpu", "data.on_error=skip", "model.moe_impl=native"]))
    assert cfg.data.on_error == "skip" and f"{cfg.model.moe_impl}" == "native"
    with pytest.raises(ValueError, match="model.moe_impl='fast': choose auto, native, grouped, megablocks"):
        ModelConfig(moe_impl="fast")


def test_a_saved_run_config_resolves_the_cache_dir_in_export(tmp_path):
    """export_hf reads the run's unresolved .hydra/config.yaml: ${jambatrain_cache:} resolves there too (the tokenizer
    is found through data.dir)."""
    import subprocess
    import sys

    saved = tmp_path / "config.yaml"
    saved.write_text("data:\n  dir: ${jambatrain_cache:}/stdlib_py_v4096_s256\n")
    code = f"from jambatrain.runs import load_run_config; print(load_run_config({str(saved)!r})['data']['dir'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAMBATRAIN_CACHE": str(tmp_path / "c")}).stdout
    assert out.strip() == str(tmp_path / "c" / "stdlib_py_v4096_s256")


def test_every_model_field_is_marked_architecture_or_runtime():
    """models/config.py declares each ModelConfig field with ``arch(...)`` or ``runtime(...)``: the resume check,
    the evaluator and the HF conversion read the marks instead of lists kept by hand."""
    import dataclasses

    from jambatrain.models.config import ModelConfig, hf_fields, runtime_fields, weight_fields

    unmarked = [f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("kind") not in ("arch", "runtime")]
    assert not unmarked, f"declare these with arch(...) or runtime(...) in models/config.py: {unmarked}"
    assert set(runtime_fields()) == {"name", "mamba_impl", "moe_impl", "activation_checkpointing", "loss_chunk_tokens",
                                     "compile_elementwise", "fused_rms_norm", "mamba_kernel_layout", "init_from", "fp8", "loss_labeled_only",
                                     "fp8_experts", "fp8_cache_weights", "fp8_filter_fqns",
                                     "fp8_expert_wgrad", "compile_blocks"}
    assert not set(hf_fields()) & set(runtime_fields())
    assert "expert_layer_period" in weight_fields(moe=True) and "expert_layer_period" not in weight_fields(moe=False)
    assert "router_aux_loss_coef" not in weight_fields() and "hidden_size" in weight_fields()
