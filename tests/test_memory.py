"""The KV-cache / Mamba-state formula: the Jamba paper's Table 1, hand-computed values, a forward's K/V bytes."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from jambatrain.memory import GIB, LLAMA2_7B, MIXTRAL_8X7B, Layout, layout_of, main, measure
from jambatrain.models import JambaLM, ModelConfig


def test_paper_table1_at_256k_tokens_16bit(capsys):
    """Jamba 4 GB, Mixtral 32 GB, Llama-2 7B 128 GB (arXiv 2403.19887, Table 1), within 5%."""
    rows = main(["experiment=jamba_v0_1", "--context", "262144"])
    got = {r["name"]: r["kv_cache_gib"] for r in rows}
    for name, paper in (("jamba_v0_1", 4), ("Mixtral 8x7B", 32), ("Llama-2 7B", 128)):
        assert abs(got[name] - paper) / paper < 0.05, (name, got[name])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "kv cache at 262144 tokens: 4.000 GiB"


def test_hand_computed_values():
    # Llama-2 7B, 1 token, fp16: 32 layers x (K + V) x 32 heads x 128 dims x 2 bytes = 524,288 bytes
    assert LLAMA2_7B.kv_cache_bytes(1, 2) == 524_288
    # Mixtral: 8 KV heads -> a quarter of that
    assert MIXTRAL_8X7B.kv_cache_bytes(1, 2) == 131_072
    # tiny: 8 layers, attention at 4 only; 2 KV heads of 128 / 4 = 32 dims; 1000 tokens fp32
    tiny = layout_of(ModelConfig(name="tiny", vocab_size=4096, hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, num_experts=4))
    assert (tiny.num_attention_layers, tiny.num_mamba_layers) == (1, 7)
    assert tiny.kv_cache_bytes(1000, 4) == 1 * 2 * 2 * 32 * 1000 * 4 == 512_000
    # Mamba: 7 layers x d_inner 256 x (d_state 16 + d_conv 4) x 4 bytes, whatever the context
    assert tiny.mamba_state_bytes(4) == 7 * 256 * 20 * 4 == 143_360
    pure_mamba = Layout("m", 8, 0, 128, 4, 2)
    assert pure_mamba.kv_cache_bytes(10**6, 2) == 0 and 2**30 == GIB


def test_formula_matches_a_forwards_kv_tensors_and_the_state_tensors():
    cfg = ModelConfig(name="t", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1,
                      num_experts=1)
    model = JambaLM(cfg).eval()
    m = measure(model, 96, torch.device("cpu"), torch.float32)
    lay = layout_of(cfg)
    assert lay.num_attention_layers == 2
    assert m["kv_cache_bytes_measured"] == lay.kv_cache_bytes(96, 4)
    assert m["mamba_state_bytes_measured"] == lay.mamba_state_bytes(4)


def test_cli_refuses_a_stray_argument():
    p = subprocess.run([sys.executable, "-m", "jambatrain.memory", "model=tiny", "bogus", "--context", "8"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Hydra overrides key=value" in p.stderr
    with pytest.raises(SystemExit):
        main(["--context", "8", "--dtype", "int3"])
