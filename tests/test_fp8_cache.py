"""The FP8 weight cache (``model.fp8_cache_weights``): each converted weight cast once per optimizer step and reused
by every micro batch and activation-checkpoint recompute, with the outputs and gradients of torchao's uncached path
bit for bit. On CPU: torch._scaled_mm runs there (torchao's float8 tensors, the same casts as on the GPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchao.float8")

from jambatrain.models import JambaLM, ModelConfig  # noqa: E402
from jambatrain.models.fast_paths import describe  # noqa: E402
from jambatrain.models.layers import weight_mm  # noqa: E402
from jambatrain.quantization import float8  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=1, fp8="tensorwise", mamba_impl="reference", moe_impl="native",
            compile_elementwise=False, fused_rms_norm=False, activation_checkpointing="full")


def _pair():
    """The same bf16 model converted twice: with the cache and without."""
    torch.manual_seed(0)
    base = JambaLM(ModelConfig(**TINY)).to(torch.bfloat16)
    models = {}
    for cached in (True, False):
        m = copy.deepcopy(base)
        float8.convert(m, ModelConfig(**TINY, fp8_cache_weights=cached))
        models[cached] = m
    return models


def _fp8_weights(model) -> list:
    from torchao.float8.float8_linear import Float8Linear

    return [m.weight for m in model.modules() if isinstance(m, Float8Linear)]


def _n_fp8(model) -> int:
    from torchao.float8.float8_linear import Float8Linear

    return sum(isinstance(m, Float8Linear) for m in model.modules())


def test_cached_weights_give_the_uncached_outputs_and_grads_over_micro_batches_and_steps():
    """3 optimizer steps of 3 micro batches each with whole-layer recompute: the cached model's losses, gradients
    and updated weights equal the uncached one's exactly, and each weight is cast once per step (not per micro
    batch, not again in the recompute or the backward)."""
    models = _pair()
    cache = float8.weight_cache(models[True])
    assert cache is not None and float8.weight_cache(models[False]) is None
    n = _n_fp8(models[True])
    assert n > 0
    opts = {c: torch.optim.AdamW(m.parameters(), lr=1e-2) for c, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, TINY["vocab_size"], (2, 32), generator=gen) for _ in range(9)]
    for step in range(3):
        losses = {}
        for c, m in models.items():
            losses[c] = []
            for ids in batches[3 * step:3 * step + 3]:
                loss = m(ids, labels=ids, return_logits=False).loss
                (loss / 3).backward()
                losses[c].append(loss.item())
        assert losses[True] == losses[False], step
        for (name, p), q in zip(models[True].named_parameters(), models[False].parameters()):
            assert torch.equal(p.grad, q.grad), (step, name)
        assert cache.casts == n * (step + 1), "one cast per FP8 weight per optimizer step"
        for c, m in models.items():
            opts[c].step()
            opts[c].zero_grad(set_to_none=True)
        float8.optimizer_stepped(models[True])  # the trainer's call after each optimizer step
        float8.optimizer_stepped(models[False])  # no cache: nothing to do
    for p, q in zip(models[True].parameters(), models[False].parameters()):
        assert torch.equal(p, q)


def test_a_stale_cast_is_used_until_the_step_is_marked_then_refreshed():
    """The weights' in-place update (as DeepSpeed writes them, through .data) is not seen by the cache until
    ``optimizer_stepped``: the output is the old weights' until then (the cache is really used), and the new
    weights' after. A weight given new storage is re-cast without the call."""
    models = _pair()
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = models[True](ids, labels=ids, return_logits=False).loss.item()
        for m in models.values():  # only the FP8 weights change (the others are not cached)
            for w in _fp8_weights(m):
                w.data.mul_(1.5)
        new = models[False](ids, labels=ids, return_logits=False).loss.item()
        assert new != before
        assert models[True](ids, labels=ids, return_logits=False).loss.item() == before  # stale until marked
        float8.optimizer_stepped(models[True])
        assert models[True](ids, labels=ids, return_logits=False).loss.item() == new
        cache = float8.weight_cache(models[True])
        casts = cache.casts
        for m in models.values():  # new storage (a re-materialised parameter): detected, re-cast
            for w in _fp8_weights(m):
                w.data = w.data * 0.5
        new2 = models[False](ids, labels=ids, return_logits=False).loss.item()
        assert models[True](ids, labels=ids, return_logits=False).loss.item() == new2
        assert cache.casts == casts + _n_fp8(models[True])


def test_kernel_layout_weight_mm_with_the_cache_matches_uncached_over_two_steps():
    """The Mamba kernel layout's swapped-operand GEMM (``float8_weight_mm``: the weight as the left operand) reads
    the cache in its own role: outputs and both gradients equal the uncached path's, before and after an
    optimizer step."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj = nn.Linear(64, 96, bias=False)

    torch.manual_seed(0)
    base = One().to(torch.bfloat16)
    mods = {}
    for cached in (True, False):
        m = copy.deepcopy(base)
        convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name("tensorwise"))
        if cached:
            m.in_proj.jt_weight_cache = m.fp8_weight_cache = float8.WeightCache()
        mods[cached] = m
    opts = {c: torch.optim.SGD(m.parameters(), lr=0.5) for c, m in mods.items()}
    for step in range(2):
        xs = [torch.randn(64, 40, generator=torch.Generator().manual_seed(10 * step + i)).to(torch.bfloat16)
              for i in range(2)]
        res = {}
        for c, m in mods.items():
            outs, grads = [], []
            for x in xs:
                x = x.clone().requires_grad_()
                y = weight_mm(m.in_proj, x)
                y.float().square().sum().backward()
                outs.append(y.detach())
                grads.append(x.grad)
            res[c] = (outs, grads, m.in_proj.weight.grad.clone())
        for a, b in zip(res[True][0] + res[True][1] + [res[True][2]], res[False][0] + res[False][1] + [res[False][2]]):
            assert torch.equal(a, b), step
        for c, m in mods.items():
            opts[c].step()
            opts[c].zero_grad(set_to_none=True)
            float8.optimizer_stepped(m)
    assert mods[True].fp8_weight_cache.casts == 2


def test_cache_decision_refuses_zero3_and_rowwise_and_the_report_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # the report as on a Hopper GPU
    assert float8.cache_decision("tensorwise", True, 2)[0]
    on, why = float8.cache_decision("tensorwise", True, 3)
    assert not on and "ZeRO-3" in why
    on, why = float8.cache_decision("rowwise", True, 1)
    assert not on and "rowwise" in why
    assert not float8.cache_decision("tensorwise", False, 0)[0]
    cfg = ModelConfig(**TINY)
    m = JambaLM(cfg).to(torch.bfloat16)
    float8.convert(m, cfg, zero_stage=3)
    assert float8.weight_cache(m) is None  # ZeRO-3: torchao's own per-GEMM casts
    report = describe(cfg, "cuda", "bf16", False, zero_stage=3).paths["fp8"]
    assert "ZeRO-3" in report and "re-cast" in report
    assert "once per optimizer step" in describe(cfg, "cuda", "bf16", False, zero_stage=2).paths["fp8"]


def test_convert_tags_the_planned_expert_stacks_for_the_cache_only_when_it_applies():
    """With model.fp8_experts the stacks' forward casts join the cache (grouped_mm_fp8 reads the tag); ZeRO-3 or the
    cache off: untagged, torchao's per-GEMM casts."""
    cfg = ModelConfig(**{**TINY, "num_experts": 4}, fp8_experts=True)
    for zero_stage, cached in ((2, True), (3, False)):
        m = JambaLM(cfg).to(torch.bfloat16)
        p = float8.convert(m, cfg, zero_stage=zero_stage)
        assert p.experts()
        stacks = [w for n in p.experts() for w in (m.get_submodule(n).w_gate, m.get_submodule(n).w_up,
                                                    m.get_submodule(n).w_down)]
        cache = float8.weight_cache(m)
        assert (cache is not None) == cached
        assert all(getattr(w, "jt_fp8_cache", None) is cache for w in stacks)
