"""FP8 experts (``model.fp8_experts``) on CPU: the ``model.fp8_expert_wgrad`` field, its one decision (converter and
start-up report), and the wiring of ``float8._GroupedMMFP8`` (which operands, layouts and scales go to which GEMM,
the weight gradients' layout, the step's cached casts) with torchao's Triton kernels and ``torch._scaled_grouped_mm``
replaced by plain-torch references that check the operand layouts and scale shapes the CUDA kernels require
(torch/_meta_registrations.py, tests/fp8_ref_kernels.py); with the same references, the FP8 model under expert
parallelism against one process (tests/fp8_ep_worker.py). The kernels themselves are compared on the GPU
(tests/test_fp8_gpu.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao.float8")

from jambatrain.models import JambaLM, ModelConfig  # noqa: E402
from jambatrain.models.fast_paths import describe  # noqa: E402
from jambatrain.quantization import float8  # noqa: E402

from fp8_ref_kernels import install as install_ref_kernels, ref_colwise_dual, ref_scaled_grouped_mm  # noqa: E402
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, fp8="tensorwise", fp8_experts=True, mamba_impl="reference",
            moe_impl="native", compile_elementwise=False, fused_rms_norm=False)


# ---------------------------------------------------------------- the config field and its decision
def test_fp8_expert_wgrad_field_takes_fp8_and_bf16_and_refuses_others():
    assert str(ModelConfig(fp8_expert_wgrad="fp8").fp8_expert_wgrad) == "fp8"
    assert str(ModelConfig(fp8_expert_wgrad="bf16").fp8_expert_wgrad) == "bf16"
    with pytest.raises(ValueError, match="model.fp8_expert_wgrad='fp16': choose fp8, bf16"):
        ModelConfig(fp8_expert_wgrad="fp16")


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_convert_tags_the_stacks_with_the_reported_wgrad_decision(monkeypatch, wgrad, zero_stage):
    """convert tags every planned stack with expert_wgrad_decision's value, cached or not (ZeRO-3: the same
    Function without the cache), and the start-up report says that decision and the cache's memory."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # the report as on a Hopper GPU
    cfg = ModelConfig(**TINY, fp8_expert_wgrad=wgrad)
    m = JambaLM(cfg).to(torch.bfloat16)
    p = float8.convert(m, cfg, zero_stage=zero_stage)
    stacks = [w for n in p.experts() for w in (m.get_submodule(n).w_gate, m.get_submodule(n).w_up,
                                                m.get_submodule(n).w_down)]
    value, words = float8.expert_wgrad_decision(wgrad)
    assert stacks and value == wgrad and all(w.jt_fp8_wgrad == value for w in stacks)
    assert all(hasattr(w, "jt_fp8_cache") == (zero_stage < 3) for w in stacks)
    report = describe(cfg, "cuda", "bf16", False, zero_stage=zero_stage).paths["fp8"]
    assert words in report
    n = sum(w.numel() for w in stacks)
    mem = f"+2 bytes per expert parameter, {2 * n / 2**30:.2f} GiB per GPU"
    assert (mem in report) == (zero_stage < 3)
    assert "experts:" not in describe(ModelConfig(**{**TINY, "fp8_experts": False}), "cuda", "bf16", False).paths["fp8"]


def test_bench_variant_tokens_set_the_wgrad_field():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("throughput", os.path.join(os.path.dirname(__file__), "..",
                                                                            "bench", "throughput.py"))
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    base = ModelConfig()
    assert str(tp.variant_config(base, "opt+fp8+fp8wgbf16").fp8_expert_wgrad) == "bf16"
    assert str(tp.variant_config(base, "opt+fp8+fp8wgfp8").fp8_expert_wgrad) == "fp8"
    v = tp.variant_config(base, "opt+fp8")
    assert v.fp8_expert_wgrad == base.fp8_expert_wgrad and v.fp8_experts and str(v.fp8) == "tensorwise"


# ---------------------------------------------------------------- the Function's wiring, reference kernels
@pytest.fixture
def ref_kernels(monkeypatch):
    install_ref_kernels(monkeypatch.setattr)


E, H, FF = 3, 32, 48
OFFS = torch.tensor([32, 32, 80], dtype=torch.int32)  # an empty group too


def _problem(down, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, FF, H, generator=g) * 0.2).to(torch.bfloat16)
    a = torch.randn(80, FF if down else H, generator=g).to(torch.bfloat16)
    gy = torch.randn(80, H if down else FF, generator=g).to(torch.bfloat16)
    return w, a, gy


def _run(w0, a0, gy, down, wgrad="fp8", cache=None):
    w = torch.nn.Parameter(w0.clone())
    w.jt_fp8_wgrad = wgrad
    if cache is not None:
        w.jt_fp8_cache = cache
    a = a0.clone().requires_grad_()
    seen = []
    w.register_hook(seen.append)  # the gradient as the Function returns it (w.grad is re-laid out on first assign)
    y = float8.grouped_mm_fp8(a, w, OFFS, down=down)
    y.backward(gy)
    return y, a.grad, seen[0]


def _exact(w, a, gy, down):
    """fp32 reference of the grouped GEMM and its gradients (w's stored layout (E, ffn, hidden))."""
    w = w.float().requires_grad_()
    a = a.float().requires_grad_()
    outs, start = [], 0
    for e, end in enumerate(OFFS.tolist()):
        outs.append(a[start:end] @ (w[e] if down else w[e].t()))
        start = end
    y = torch.cat(outs)
    y.backward(gy.float())
    return y, a.grad, w.grad


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("down", [False, True])
@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
def test_weight_gradient_is_contiguous_in_the_stored_layout(ref_kernels, down, wgrad, cached):
    """Every stack's weight gradient, as the Function returns it, in its own (E, ffn, hidden) layout, contiguous
    (w_down's was a transposed view: a strided copy or add at every micro batch's gradient accumulation), with the
    cache or without (one Function), and the outputs and gradients the exact ones within FP8's error (e4m3,
    power-of-2 scales: a few %). Fails on the code before the fix (w_down, cached: strides (1536, 1, 48))."""
    w, a, gy = _problem(down)
    y, ga, gw = _run(w, a, gy, down, wgrad, float8.WeightCache() if cached else None)
    assert gw.shape == w.shape and gw.is_contiguous(), (gw.shape, gw.stride())
    ry, rga, rgw = _exact(w, a, gy, down)
    errs = rel(y, ry), rel(ga, rga), rel(gw, rgw)
    assert max(errs) < 8e-2, errs
    if wgrad == "bf16":  # bf16 operands, fp32 accumulation: bf16 rounding only
        assert errs[2] < 1e-2, errs


def test_swapped_operand_w_down_gradient_is_the_transposed_product(ref_kernels):
    """w_down's weight gradient from the swapped 2d-2d operands (A^T @ grad_output, scales swapped too) equals
    torchao's operand order (grad_output^T @ A), transposed, on the same FP8 data and scales."""
    w, a, gy = _problem(True)
    _, _, gw = _run(w, a, gy, True)
    go_cm, go_s, a_cm, a_s = ref_colwise_dual(gy, a, OFFS)
    torchao_order = ref_scaled_grouped_mm(go_cm.t(), a_cm, go_s.reciprocal(), a_s.reciprocal(), OFFS)
    torch.testing.assert_close(gw, torchao_order.transpose(1, 2), rtol=1e-2, atol=1e-6)  # bf16 rounding of fp32 sums


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
def test_cached_casts_give_the_uncached_function_bit_for_bit_and_count_once_per_step(ref_kernels, wgrad):
    """Two steps of two micro batches: the step's forward and backward casts of each stack made once (2 per stack
    per step), outputs and gradients identical to the uncached Function's; after the step the casts are re-made
    from the updated weights."""
    cache = float8.WeightCache()
    ws = {c: torch.nn.Parameter(_problem(True)[0].clone()) for c in (True, False)}
    for c, w in ws.items():
        w.jt_fp8_wgrad = wgrad
        if c:
            w.jt_fp8_cache = cache
    for step in range(2):
        res = {}
        for c, w in ws.items():
            outs = []
            for i in range(2):
                _, a0, gy = _problem(True, seed=10 * step + i + 1)
                a = a0.clone().requires_grad_()
                y = float8.grouped_mm_fp8(a, w, OFFS, down=True)
                y.backward(gy)
                outs += [y.detach(), a.grad]
            res[c] = outs + [w.grad.clone()]
        for x, y in zip(res[True], res[False]):
            assert torch.equal(x, y)
        for w in ws.values():
            with torch.no_grad():
                w -= 0.5 * w.grad  # bf16 weights move: a stale cast would show
            w.grad = None
        cache.advance()
    assert cache.casts == 2 * 2  # forward + backward cast, two steps


# ---------------------------------------------------------------- under expert parallelism
@pytest.mark.slow
def test_fp8_experts_under_expert_parallelism_equal_one_process():
    """FP8 with FP8 experts at ep 2 (2 gloo ranks, tests/fp8_ep_worker.py: the trainer's build_model, the real
    expert_parallel.exchange, grouped_fp8 on the local experts, the ZeRO-2 weight cache) against the same FP8 model
    at ep 1 in one process fed both ranks' tokens, both model.fp8_expert_wgrad values, two steps of two micro
    batches: loss and logits bit for bit here (rows are scaled per row, experts per expert: nothing depends on which
    rank a row went to), the dense gradients to fp32 summation order, the experts' gradients (the owner's against
    the slice of one process's) within bf16 rounding: the owner's weight-gradient GEMM sums both ranks' rows at once
    (and, wgrad=fp8, scales their columns together) where one process sums each rank's batch apart. Measured: loss
    and logits 0, dense 3e-9, experts 5e-3 (bf16 experts on one rank instead: logits 0.11, experts 0.26; the other
    rank's experts: logits 0.9; a stale weight cache after the step: logits 1.3). The cache: one cast per weight per
    optimizer step, re-made after it. Then the trainer's DeepSpeed engine (ZeRO-2, bf16, expert groups), one step
    of two micro batches: losses bit for bit, the gradient each AdamW step saw within bf16 accumulation (measured
    dense 1.1e-2, experts 5.8e-3; the other rank's experts: dense 8.7, experts 1.4)."""
    import os

    from conftest import REPO, torchrun_worker

    out = torchrun_worker(os.path.join(REPO, "tests", "fp8_ep_worker.py"), 2, "bf16", "fp8")
    assert set(out) == {"bf16", "fp8", "engine"}
    for r, e in enumerate(out.pop("engine")):
        assert e["global_steps"] == 1 and e["loss"] < 1e-3, (r, e)
        assert e["dense_grad"] < 5e-2 and e["expert_grad"] < 2e-2, (r, e)  # relative to the largest, per parameter
    for wgrad, ranks in out.items():
        for r, e in enumerate(ranks):
            assert e["ran"] == ["grouped_fp8"] and e["expert_calls"] == 24, (wgrad, r, e)  # 8 EP + 16 reference
            assert e["loss"] < 1e-3 and e["logits"] < 1e-2, (wgrad, r, e)  # relative to the largest |logit|
            assert e["dense_grad"] < 1e-4 and e["expert_grad"] < 2e-2, (wgrad, r, e)  # relative, per parameter
            c = e["casts"]
            assert c[0] > 0 and c == [c[0], 2 * c[0]], (wgrad, r, e)
