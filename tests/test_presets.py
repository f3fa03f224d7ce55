"""Parameter counts of the model presets against a closed-form count, built on the meta device."""
from __future__ import annotations

import math
import os

import pytest
import torch

from jambatrain.models import JambaLM, ModelConfig

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model")

# transformers' JambaConfig() defaults = ai21labs/Jamba-v0.1
V01 = dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
           expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
           mamba_expand=2, mamba_dt_rank=256, mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-6,
           tie_word_embeddings=False, router_aux_loss_coef=0.001)


def closed_form(c: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters from the architecture, independent of the module code."""
    h, V, f, L = c.hidden_size, c.vocab_size, c.intermediate_size, c.num_hidden_layers
    hd = h // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    d, n, k = c.mamba_expand * h, c.mamba_d_state, c.mamba_d_conv
    r = c.mamba_dt_rank or math.ceil(h / 16)
    attn = h * q + 2 * h * kv + q * h
    mamba = (h * 2 * d + (2 * d if c.mamba_proj_bias else 0)  # in_proj
             + d * k + (d if c.mamba_conv_bias else 0)  # conv1d
             + d * (r + 2 * n)  # x_proj
             + r * d + d  # dt_proj (always with bias)
             + d * n + d  # A_log, D
             + d * h + (h if c.mamba_proj_bias else 0)  # out_proj
             + r + 2 * n)  # dt/B/C RMSNorms
    expert = 3 * h * f
    total = V * h + (0 if c.tie_word_embeddings else V * h) + h  # embedding, head, final norm
    active = total
    for i in range(L):
        is_attn = i % c.attn_layer_period == c.attn_layer_offset
        is_moe = c.num_experts > 1 and i % c.expert_layer_period == c.expert_layer_offset
        layer = 2 * h + (attn if is_attn else mamba)
        total += layer + (h * c.num_experts + c.num_experts * expert if is_moe else expert)
        active += layer + (h * c.num_experts + c.num_experts_per_tok * expert if is_moe else expert)
    return total, active


def meta_counts(cfg: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        m = JambaLM(cfg)
    assert all(p.is_meta for p in m.parameters())
    return m.num_params(), m.num_active_params()


def test_v01_counts():
    cfg = ModelConfig(name="jamba_v0_1", **V01)
    total, active = meta_counts(cfg)
    assert (total, active) == closed_form(cfg)
    assert total == pytest.approx(51.6e9, rel=0.005), total
    assert active == pytest.approx(12.1e9, rel=0.005), active
    print(f"Jamba v0.1: {total:,} total, {active:,} active parameters")


def test_v01_fields_are_hf_defaults():
    transformers = pytest.importorskip("transformers")
    from jambatrain.hf_convert import from_hf_config

    cfg = from_hf_config(transformers.JambaConfig())
    for k, v in V01.items():
        got = cfg.dt_rank if k == "mamba_dt_rank" else getattr(cfg, k)
        assert got == v, (k, got, v)


@pytest.mark.parametrize("kw", [
    {},
    {"tie_word_embeddings": True},
    {"mamba_proj_bias": True, "mamba_conv_bias": False, "mamba_dt_rank": 7},
    {"num_experts": 1, "num_experts_per_tok": 1},
    {"attn_layer_period": 3, "attn_layer_offset": 2, "expert_layer_period": 3, "expert_layer_offset": 0,
     "num_experts": 5, "num_experts_per_tok": 3},
])
def test_small_configs_match_closed_form(kw):
    base = dict(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=7, num_attention_heads=6,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_d_state=5)
    base.update(kw)
    cfg = ModelConfig(**base)
    assert meta_counts(cfg) == closed_form(cfg)
    m = JambaLM(cfg)  # and the materialised model agrees with the meta one
    assert (m.num_params(), m.num_active_params()) == closed_form(cfg)


def _preset_config(name: str) -> ModelConfig:
    """The model section of the Hydra config composed with ``model=<name>`` (defaults lists resolved by Hydra)."""
    from hydra import compose, initialize_config_dir

    from jambatrain.config import register_schema, to_train_config

    register_schema()
    with initialize_config_dir(config_dir=os.path.dirname(CONF), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=[f"model={name}"])).model


@pytest.mark.parametrize("name", ["tiny", "1.3b", "7b", "jamba_v0_1", "52b"])
def test_yaml_presets(name):
    cfg = _preset_config(name)
    assert cfg.problems() == [], cfg.problems()
    total, active = meta_counts(cfg)
    assert (total, active) == closed_form(cfg)
    print(f"{name}: {total:,} total, {active:,} active, pattern {cfg.layer_pattern()}")
    if name in ("jamba_v0_1", "52b"):
        v01 = ModelConfig(**V01)
        assert (total, active) == closed_form(v01)
        for k, v in V01.items():
            got = cfg.dt_rank if k == "mamba_dt_rank" else getattr(cfg, k)
            assert got == v, f"conf/model/{name}.yaml: {k}={got!r}, Jamba v0.1 has {v!r}"
    elif name == "1.3b":
        assert total == pytest.approx(1.3e9, rel=0.1)
    elif name == "7b":
        assert total == pytest.approx(7e9, rel=0.1)
    elif name == "tiny":
        assert total < 20e6
