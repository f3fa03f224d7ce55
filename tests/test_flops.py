"""FLOPs accounting against hand-checkable closed forms."""
from __future__ import annotations

import pytest

from jambatrain.flops import PEAK_BF16_FLOPS, flops_per_token, mfu, peak_flops_for_device
from jambatrain.models import JambaLM, ModelConfig


def attn_only(**kw):
    # attn_layer_period=1, offset 0: every layer is attention; num_experts=1: every FFN dense
    base = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=8, attn_layer_period=1, attn_layer_offset=0, num_experts=1, num_experts_per_tok=1)
    base.update(kw)
    return ModelConfig(**base)


def test_dense_attention_only_is_6N_plus_causal_attention():
    cfg = attn_only()
    s = 2048
    h, f, L, V = 256, 512, 6, 1000
    fl = flops_per_token(cfg, s)
    # N: matmul weights a token passes through (non-embedding, LM head included), as in 6N
    n_matmul = L * (4 * h * h + 3 * h * f) + h * V
    # 12*L*h*s is the full-matrix attention term of 6N + 12Lhs (Kaplan/PaLM); causal halves it
    assert fl["training"] == 6 * n_matmul + 12 * L * h * s // 2
    assert fl["forward"] * 3 == fl["training"]
    assert fl["mamba_proj"] == fl["mamba_scan"] == fl["moe_experts"] == 0
    assert fl["attention_layers"] == 6 and fl["mamba_layers"] == 0
    # the model's own parameter count agrees with N (+ embedding + norms)
    m = JambaLM(cfg)
    norms = (2 * L + 1) * h
    assert m.num_params() == n_matmul + V * h + norms


def test_gqa_shrinks_kv_projections_only():
    a = flops_per_token(attn_only(), 512)
    b = flops_per_token(attn_only(num_key_value_heads=2), 512)
    h, L = 256, 6
    assert a["attention_proj"] - b["attention_proj"] == L * 2 * h * 2 * (h - 64)
    assert a["attention_core"] == b["attention_core"]


def test_attention_core_scales_with_seq_len():
    a, b = flops_per_token(attn_only(), 1024), flops_per_token(attn_only(), 2048)
    assert b["attention_core"] == 2 * a["attention_core"]
    assert a["attention_core"] == 6 * 2 * 256 * 1024
    assert b["training"] - a["training"] == 3 * a["attention_core"]


def test_moe_counts_only_top_k_plus_router():
    dense = attn_only()
    moe = attn_only(num_experts=8, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1)
    h, f = 256, 512
    fd, fm = flops_per_token(dense, 128), flops_per_token(moe, 128)
    assert fm["moe_layers"] == 3 and fm["dense_ffn_layers"] == 3
    assert fm["moe_experts"] == 3 * 2 * 6 * h * f
    assert fm["moe_router"] == 3 * 2 * h * 8
    assert fm["forward"] - fd["forward"] == 3 * (6 * h * f + 2 * h * 8)  # one extra expert per MoE layer + router
    # independent of E beyond the router
    fm16 = flops_per_token(attn_only(num_experts=16, num_experts_per_tok=2, expert_layer_period=2,
                                     expert_layer_offset=1), 128)
    assert fm16["moe_experts"] == fm["moe_experts"]
    assert fm16["moe_router"] == 2 * fm["moe_router"]


def test_mamba_term():
    cfg = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, num_experts=1, num_experts_per_tok=1)
    fl = flops_per_token(cfg, 4096)
    h, d, n, r, c = 256, 512, 16, 16, 4
    assert fl["attention_layers"] == 1 and fl["mamba_layers"] == 7
    assert fl["mamba_proj"] == 7 * (2 * h * 2 * d + 2 * d * (r + 2 * n) + 2 * r * d + 2 * d * h)
    assert fl["mamba_conv"] == 7 * 2 * d * c
    assert fl["mamba_scan"] == 7 * 9 * d * n
    # Mamba cost does not grow with the sequence length
    assert flops_per_token(cfg, 128)["mamba_scan"] == fl["mamba_scan"]
    parts = [k for k in ("attention_proj", "attention_core", "mamba_proj", "mamba_conv", "mamba_scan", "ffn_dense",
                         "moe_router", "moe_experts", "lm_head")]
    assert sum(fl[k] for k in parts) == fl["forward"]


def test_v01_training_flops_close_to_6_times_active_params():
    cfg = ModelConfig()  # Jamba v0.1
    with __import__("torch").device("meta"):
        m = JambaLM(cfg)
    fl = flops_per_token(cfg, 4096)
    active_matmul = m.num_active_params() - cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    # 6N plus the small attention/scan/conv terms: within a few percent of 6 * active non-embedding params
    assert 1.0 < fl["training"] / (6 * active_matmul) < 1.1


def test_mfu_and_peaks():
    assert PEAK_BF16_FLOPS["H100"] == 989e12 and PEAK_BF16_FLOPS["H200"] == 989e12
    assert PEAK_BF16_FLOPS["A100"] == 312e12
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device("NVIDIA H200") == 989e12
    assert peak_flops_for_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_device("Some Unknown Accelerator") is None
    assert peak_flops_for_device("cpu") is None
    assert peak_flops_for_device("anything", override=1e15) == 1e15
    import torch

    if not torch.cuda.is_available():
        assert peak_flops_for_device() is None
    cfg = attn_only()
    per_tok = flops_per_token(cfg, 256)["training"]
    assert mfu(1000.0, cfg, 256, 989e12) == pytest.approx(1000.0 * per_tok / 989e12)
    assert mfu(1000.0, cfg, 256, None) is None


def test_short_conv_layer_is_not_counted_as_mamba():
    """Zoology's attention arm, [gated short conv, attention] with no FFN: the short conv is its depthwise conv and
    gate projection, not a Mamba layer."""
    h, k, V, s = 64, 3, 8192, 256
    cfg = ModelConfig(vocab_size=V, hidden_size=h, intermediate_size=0, num_hidden_layers=2, num_attention_heads=1,
                      num_key_value_heads=1, num_experts=1, attn_layer_period=2, attn_layer_offset=1,
                      short_conv_layer_period=2, short_conv_kernel=k)
    assert cfg.layer_pattern() == "c- a-"
    fl = flops_per_token(cfg, s)
    assert fl["mamba_layers"] == 0 and fl["mamba_proj"] == fl["mamba_conv"] == fl["mamba_scan"] == 0
    assert fl["short_conv_layers"] == 1 and fl["short_conv"] == 2 * h * k + 2 * h * h
    assert fl["dense_ffn_layers"] == 0 and fl["ffn_dense"] == 0
    assert fl["forward"] == 2 * h * k + 2 * h * h + 4 * 2 * h * h + 2 * h * s + 2 * h * V
