"""The start-up report of which implementation each hot op takes (models/fast_paths.py).

The decisions are read from the same availability flags the ops use, so they are exercised here on CPU by
setting those flags: a CUDA run without the kernels must be warned, an impossible explicit choice refused.
"""
from __future__ import annotations

import pytest

from jambatrain.models import ModelConfig, moe_backends, ssm_ops
from jambatrain.models.fast_paths import describe

MOE = dict(num_experts=4, num_experts_per_tok=2)


def _cfg(**kw) -> ModelConfig:
    base = dict(name="t", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2,
                num_experts=1, num_experts_per_tok=1)
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def kernels(monkeypatch):
    """Pretend the CUDA kernels import (True) or not (False), as on a GPU box with or without them built."""
    def set_(available: bool, megablocks: bool = False, scan_reset: bool = False):
        monkeypatch.setattr(ssm_ops, "kernels_available",
                            lambda: {"selective_scan": available, "causal_conv1d": available, "rms_norm": available,
                                     "scan_reset": scan_reset})
        monkeypatch.setattr(moe_backends, "megablocks_available", lambda: megablocks)
    return set_


def test_cpu_takes_references_without_warnings(kernels):
    kernels(False)
    fp = describe(_cfg(**MOE), "cpu", "fp32", doc_mask=True)
    assert fp.paths == {"mamba": "reference scan", "attention": "SDPA", "rmsnorm": "eager", "moe": "native loop",
                        "compile": "off"}
    assert fp.warnings == [] and fp.errors == []


def test_cuda_with_kernels_takes_every_fast_path(kernels):
    kernels(True, megablocks=True)
    fp = describe(_cfg(**MOE), "cuda", "bf16", doc_mask=False)
    assert fp.paths == {"mamba": "mamba-ssm scan + causal-conv1d", "attention": "flash SDPA", "rmsnorm": "triton",
                        "moe": "megablocks", "compile": "on"}
    assert fp.warnings == [] and fp.errors == []
    assert "mamba mamba-ssm scan + causal-conv1d" in fp.summary()


def test_cuda_without_kernels_warns_with_the_fix(kernels):
    kernels(False)
    fp = describe(_cfg(), "cuda", "bf16", doc_mask=False)
    assert fp.paths["mamba"] == "reference scan"
    assert len(fp.warnings) == 1 and "launch/build_kernels.sh" in fp.warnings[0]


def test_doc_mask_on_cuda_without_the_reset_kernel_warns_with_the_fix(kernels):
    kernels(True)
    fp = describe(_cfg(), "cuda", "bf16", doc_mask=True)
    assert fp.paths["mamba"] == "reference scan" and fp.paths["attention"] == "flex attention (document mask)"
    assert len(fp.warnings) == 1 and "WHICH=reset" in fp.warnings[0] and "data.doc_mask=false" in fp.warnings[0]


def test_doc_mask_on_cuda_takes_the_reset_kernel(kernels):
    kernels(True, scan_reset=True)
    fp = describe(_cfg(), "cuda", "bf16", doc_mask=True)
    assert fp.paths["mamba"] == "scan-reset kernel + compiled doc conv"
    assert fp.warnings == []
    # without the document mask the stock mamba-ssm kernels stay the path
    assert describe(_cfg(), "cuda", "bf16", doc_mask=False).paths["mamba"] == "mamba-ssm scan + causal-conv1d"
    assert describe(_cfg(mamba_impl="reference"), "cuda", "bf16", doc_mask=True).paths["mamba"] == "reference scan"


def test_moe_falls_back_to_grouped_then_warns_in_fp32(kernels):
    kernels(True, megablocks=False)
    assert describe(_cfg(**MOE), "cuda", "bf16", doc_mask=False).paths["moe"] == "grouped GEMM"
    fp = describe(_cfg(**MOE), "cuda", "fp32", doc_mask=False)
    assert fp.paths["moe"] == "native loop" and "parallel.precision=bf16" in fp.warnings[0]


@pytest.mark.parametrize("field,value,device", [("mamba_impl", "cuda", "cpu"), ("moe_impl", "megablocks", "cuda"),
                                                 ("moe_impl", "grouped", "cpu")])
def test_explicit_impl_that_cannot_run_is_an_error(kernels, field, value, device):
    kernels(False, megablocks=False)
    fp = describe(_cfg(**MOE, **{field: value}), device, "bf16", doc_mask=False)
    assert len(fp.errors) == 1 and f"model.{field}={value}" in fp.errors[0] and "auto" in fp.errors[0]


def test_pure_mamba_and_dense_models_list_only_their_ops(kernels):
    kernels(True)
    fp = describe(_cfg(attn_layer_period=100, attn_layer_offset=50), "cuda", "bf16", doc_mask=False)
    assert set(fp.paths) == {"mamba", "rmsnorm", "compile"}


def _fake(device: str, dtype, *shape):
    """What the MoE layer reads off its tensors at run time (device, dtype, shape), without needing that device."""
    from types import SimpleNamespace

    return SimpleNamespace(device=__import__("torch").device(device), dtype=dtype, shape=shape)


@pytest.mark.parametrize("impl", ["auto", "native", "grouped", "megablocks"])
@pytest.mark.parametrize("device,precision", [("cuda", "bf16"), ("cuda", "fp32"), ("cpu", "fp32"), ("cpu", "bf16")])
@pytest.mark.parametrize("hidden,ffn", [(64, 128), (60, 128), (64, 100)])
@pytest.mark.parametrize("megablocks", [True, False])
def test_moe_report_names_the_backend_the_layer_runs(kernels, impl, device, precision, hidden, ffn, megablocks):
    """The start-up report and the layer's run-time choice agree, widths not a multiple of 8 included (they once
    disagreed there: reported as grouped GEMM, run as the per-expert loop)."""
    import torch

    kernels(True, megablocks=megablocks)
    fp = describe(_cfg(**MOE, moe_impl=impl, hidden_size=hidden, intermediate_size=ffn), device, precision,
                  doc_mask=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, w = _fake(device, dtype, 10, hidden), _fake(device, dtype, 4, ffn, hidden)
    if fp.errors:
        with pytest.raises(RuntimeError, match=f"model.moe_impl={impl}"):
            moe_backends.select(impl, x, w)
    else:
        assert fp.paths["moe"] == moe_backends.REPORT_NAMES[moe_backends.select(impl, x, w).name]
    if (hidden, ffn) != (64, 128) and device == "cuda" and precision == "bf16" and impl == "auto":
        assert fp.paths["moe"] == "native loop" and "multiples of 8" in fp.warnings[0]


def test_moe_layer_runs_what_the_report_names_on_cpu(monkeypatch):
    import torch

    from conftest import record_moe_backends
    from jambatrain.models import JambaLM

    cfg = _cfg(**MOE, mamba_impl="reference")
    model = JambaLM(cfg)
    ran = record_moe_backends(monkeypatch)
    model(torch.randint(0, 256, (2, 8)))
    assert ran and set(ran) == {"native"} and describe(cfg, "cpu", "fp32", doc_mask=False).paths["moe"] == "native loop"


def test_rmsnorm_report_follows_the_config_switch(kernels):
    """model.fused_rms_norm=false (the bench's A/B) is reported as the eager norm the layers then run."""
    from jambatrain.models.layers import RMSNorm
    from jambatrain.models import JambaLM

    kernels(True)
    for fused, want in ((True, "triton"), (False, "eager")):
        cfg = _cfg(fused_rms_norm=fused)
        assert describe(cfg, "cuda", "bf16", doc_mask=False).paths["rmsnorm"] == want
        assert {m.fused for m in JambaLM(cfg).modules() if isinstance(m, RMSNorm)} == {fused}


@pytest.mark.parametrize("impl", ["auto", "cuda", "reference"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("doc_mask", [True, False])
@pytest.mark.parametrize("available,scan_reset", [(True, True), (True, False), (False, False)])
def test_mamba_report_names_the_path_the_mixer_takes(kernels, impl, device, doc_mask, available, scan_reset):
    """The start-up report and the mixer's run-time choice (``ssm_ops.mamba_kernel_path``) agree."""
    import torch

    from types import SimpleNamespace

    kernels(available, scan_reset=scan_reset)
    fp = describe(_cfg(mamba_impl=impl), device, "bf16", doc_mask=doc_mask)
    x = SimpleNamespace(device=torch.device(device))
    try:
        kernel = ssm_ops.mamba_kernel_path(impl, x, doc_reset=doc_mask)
    except RuntimeError as exc:
        assert fp.errors and "model.mamba_impl=cuda" in str(exc)
        return
    assert (fp.paths["mamba"] != "reference scan") == kernel
