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
    assert fp.paths == {"mamba": "reference scan + eager doc conv", "attention": "SDPA", "rmsnorm": "eager",
                        "moe": "native loop",
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
    assert fp.paths["mamba"] == "reference scan + reference conv"
    assert len(fp.warnings) == 1 and "launch/build_kernels.sh" in fp.warnings[0]


def test_doc_mask_on_cuda_without_the_reset_kernel_warns_with_the_fix(kernels):
    kernels(True)
    fp = describe(_cfg(), "cuda", "bf16", doc_mask=True)
    assert fp.paths["mamba"] == "reference scan + compiled doc conv"
    assert fp.paths["attention"] == "flex attention (document mask)"
    assert len(fp.warnings) == 1 and "WHICH=reset" in fp.warnings[0] and "data.doc_mask=false" in fp.warnings[0]


def test_doc_mask_on_cuda_takes_the_reset_kernel(kernels):
    kernels(True, scan_reset=True)
    fp = describe(_cfg(), "cuda", "bf16", doc_mask=True)
    assert fp.paths["mamba"] == "scan-reset kernel + compiled doc conv"
    assert fp.warnings == []
    # without the document mask the stock mamba-ssm kernels stay the path
    assert describe(_cfg(), "cuda", "bf16", doc_mask=False).paths["mamba"] == "mamba-ssm scan + causal-conv1d"
    assert describe(_cfg(mamba_impl="reference"), "cuda", "bf16", doc_mask=True).paths["mamba"] == \
        "reference scan + eager doc conv"


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


@pytest.fixture
def observe(monkeypatch):
    """Run a real MambaMixer on CPU as it would run on ``device`` with the kernels it is told exist: the plan is
    asked for that device, and every conv / scan entry point (the kernels' included) is replaced by a recorder that
    computes the reference. Returns run(cfg, device, doc_mask) -> the description of what the mixer executed
    (``MambaPlan.describe`` of the observed layout, conv and scan), or the RuntimeError it raised."""
    import torch

    from jambatrain.models import mamba

    calls = []
    ref_scan, ref_conv, doc_ref = ssm_ops.selective_scan_ref, ssm_ops.causal_conv1d_ref, ssm_ops.causal_conv1d_doc_ref

    def scan_rec(name):
        def f(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
            calls.append(("scan", name, z.stride(1) != 1))  # kernel layout: z is a (b, d, l) view of (d, b*l)
            return ref_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                            reset=kw.get("reset"))
        return f

    class FakeScanKernelFn:
        @staticmethod
        def apply(ext, u, delta, A, B, C, D, z, delta_bias, softplus, reset):
            return scan_rec("scan-reset")(u, delta, A, B, C, D, z, delta_bias, softplus, reset=reset)

    def conv_rec(name, fn):
        def f(*a, **kw):
            calls.append(("conv", name))
            kw.pop("compiled", None)
            return fn(*a, **kw)
        return f

    monkeypatch.setattr(ssm_ops, "selective_scan_ref", scan_rec("reference"))
    monkeypatch.setattr(ssm_ops, "_selective_scan_cuda", scan_rec("mamba-ssm"))
    monkeypatch.setattr(ssm_ops, "_ScanKernelFn", FakeScanKernelFn)
    monkeypatch.setattr(ssm_ops, "_scan_reset_ext", object())
    monkeypatch.setattr(ssm_ops, "causal_conv1d_ref", conv_rec("reference", ref_conv))
    monkeypatch.setattr(ssm_ops, "_causal_conv1d_cuda", conv_rec("causal-conv1d", ref_conv))
    monkeypatch.setattr(mamba, "causal_conv1d_doc", conv_rec("doc-compiled", doc_ref))
    monkeypatch.setattr(mamba, "causal_conv1d_doc_ref", conv_rec("doc-eager", doc_ref))

    def run(cfg, device: str, doc_mask: bool):
        real = ssm_ops.decide_mamba
        monkeypatch.setattr(mamba, "decide_mamba", lambda impl, _dev, *a: real(impl, device, *a))
        torch.manual_seed(0)
        mixer = mamba.MambaMixer(cfg)
        mixer.reset_ssm_parameters()
        reset = torch.zeros(2, 8, dtype=torch.bool) if doc_mask else None
        calls.clear()
        try:
            mixer(torch.randn(2, 8, cfg.hidden_size), reset)
        except RuntimeError as exc:
            return exc
        (conv,), (scan,) = [c for c in calls if c[0] == "conv"], [c for c in calls if c[0] == "scan"]
        ran = ssm_ops.MambaPlan("kernel" if scan[2] else "generic", conv[1], scan[1])
        assert mixer.last_plan.describe() == ran.describe()  # the plan the mixer records is what it ran
        return ran.describe()
    return run


@pytest.mark.parametrize("impl", ["auto", "cuda", "reference"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("doc_mask", [True, False])
@pytest.mark.parametrize("scan,conv,scan_reset", [(True, True, True), (True, True, False), (True, False, False),
                                                  (False, False, False)])
@pytest.mark.parametrize("layout,compiled", [(True, True), (False, True), (True, False)])
def test_mamba_report_names_what_the_mixer_runs(kernels, observe, monkeypatch, impl, device, doc_mask, scan, conv,
                                                scan_reset, layout, compiled):
    """The start-up report's Mamba line is what a real mixer executes (observed at the conv / scan entry points and
    by the layout of its operands), for every impl x device x document mask x available kernels x layout x compile;
    an impl=cuda that cannot run is refused by both. (mamba-ssm without causal-conv1d, and the generic layout with a
    document mask, once disagreed.)"""
    kernels(True, scan_reset=scan_reset)
    monkeypatch.setattr(ssm_ops, "kernels_available", lambda: {"selective_scan": scan, "causal_conv1d": conv,
                                                               "rms_norm": False, "scan_reset": scan_reset})
    cfg = _cfg(mamba_impl=impl, mamba_kernel_layout=layout, compile_elementwise=compiled)
    fp = describe(cfg, device, "bf16", doc_mask=doc_mask)
    ran = observe(cfg, device, doc_mask)
    if isinstance(ran, RuntimeError):
        assert fp.errors and "model.mamba_impl=cuda" in str(ran) and str(ran) in fp.errors
        return
    assert not fp.errors and fp.paths["mamba"] == ran


def test_observing_the_mixer_catches_a_mixer_off_its_plan(kernels, observe, monkeypatch):
    """Negative control: a mixer forced never to take a kernel (its plan replaced by the reference one) is caught."""
    from jambatrain.models import mamba

    kernels(True, scan_reset=True)
    cfg = _cfg()
    fp = describe(cfg, "cuda", "bf16", doc_mask=False)
    assert fp.paths["mamba"] == "mamba-ssm scan + causal-conv1d"
    monkeypatch.setattr(mamba.MambaMixer, "plan",
                        lambda self, dev, doc: ssm_ops.MambaPlan("generic", "reference", "reference"))
    assert observe(cfg, "cuda", False) != fp.paths["mamba"]


def test_context_parallel_is_reported(kernels):
    kernels(True, scan_reset=True)
    fp = describe(_cfg(), "cuda", "bf16", doc_mask=True, cp=4)
    assert fp.paths["mamba"] == "scan-reset kernel + compiled doc conv, context parallel 4 (all-to-all)"
    assert fp.paths["attention"].endswith("context parallel 4 (Ulysses all-to-all over heads)")
