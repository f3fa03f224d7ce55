"""Compiled block regions (``model.compile_blocks``, models/compiled_blocks.py) on CPU: the decision and the start-up
report, and the compiled regions against the eager blocks, forward and gradients (Inductor's CPU backend: the same
graphs as on the GPU but for the kernels left eager), with activation checkpointing, MoE layers and FP8 linears.
The GPU comparisons (mamba-ssm kernels, Triton RMSNorm, FP8 on Hopper) are tests/test_compiled_blocks_gpu.py."""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch

from conftest import REPO, torchrun_worker

from jambatrain.models import JambaLM, ModelConfig
from jambatrain.models import compiled_blocks as cb
from jambatrain.models.config import runtime_fields
from jambatrain.models.fast_paths import describe
from jambatrain.quantization import float8

# layers: m d | a d | m d | m E  (Mamba + dense, attention + dense, Mamba + MoE)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=2, expert_layer_period=4, expert_layer_offset=3, attn_layer_period=4,
            attn_layer_offset=1, mamba_impl="reference", moe_impl="native", compile_elementwise=False,
            fused_rms_norm=False)
ON = cb.BlocksPlan(True, "forced on for a CPU test")


def test_config_field_is_a_runtime_knob_auto_by_default():
    assert ModelConfig().compile_blocks is None and ModelConfig(compile_blocks=True).compile_blocks is True
    assert "compile_blocks" in runtime_fields()  # a checkpoint may resume with it switched


def test_decision_and_report():
    assert cb.decide(False, "cuda") == cb.BlocksPlan(False, "off")
    assert cb.decide(True, "cuda").on and "dense FFN" in cb.decide(True, "cuda").describe()
    cpu = cb.decide(True, "cpu")
    assert not cpu.on and "CUDA-only" in cpu.why and cpu.warning is None  # CPU runs eager, as compile_elementwise
    for plan, word in ((cb.decide(True, "cuda", zero_stage=3), "ZeRO-3"), (cb.decide(True, "cuda", cp=2),
                                                                            "context parallel 2")):
        assert not plan.on and word in plan.why and word in plan.warning
    # auto (None): on with FP8, off in bf16; under ZeRO-3 / cp off without a warning (nobody asked by name)
    assert cb.decide(None, "cuda") == cb.BlocksPlan(False, "off")
    auto = cb.decide(None, "cuda", fp8="tensorwise")
    assert auto.on and auto.why.startswith("auto with model.fp8: compiled regions")
    auto3 = cb.decide(None, "cuda", zero_stage=3, fp8="rowwise")
    assert not auto3.on and "ZeRO-3" in auto3.why and auto3.warning is None
    assert cb.decide(False, "cuda", fp8="tensorwise") == cb.BlocksPlan(False, "off")
    assert "blocks" not in describe(ModelConfig(**TINY), "cuda", "bf16", False).paths
    cfg = ModelConfig(**TINY, compile_blocks=True)
    assert "blocks" not in describe(dataclasses.replace(cfg, compile_blocks=False), "cuda", "bf16", False).paths
    fp = describe(cfg, "cuda", "bf16", False)
    assert fp.paths["blocks"] == cb.decide(True, "cuda").describe() and not fp.warnings
    fp = describe(cfg, "cuda", "bf16", False, zero_stage=3)
    assert fp.paths["blocks"].startswith("off") and any("ZeRO-3" in w for w in fp.warnings)
    assert describe(cfg, "cpu", "fp32", False).paths["blocks"].startswith("off on cpu")


def test_fp8_cache_decision_says_the_linears_cast_in_the_regions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    cached, why = float8.cache_decision("tensorwise", True, 2, compile_blocks=True)
    assert cached and why.startswith("linear weights cast inside the compiled block regions") and "expert" in why
    cached, why = float8.cache_decision("tensorwise", False, 2, compile_blocks=True)
    assert not cached and why == "linear weights cast inside the compiled block regions (model.compile_blocks)"
    cfg = ModelConfig(**TINY, fp8="tensorwise", compile_blocks=True)
    assert "inside the compiled block regions" in describe(cfg, "cuda", "bf16", False).paths["fp8"]
    assert "once per optimizer step" in describe(dataclasses.replace(cfg, compile_blocks=False), "cuda", "bf16",
                                                 False).paths["fp8"]


def _grads(model, ids, steps=2):
    loss = None
    for _ in range(steps):  # the second call runs the compiled graphs again (no recompile)
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("recompute", ["mixer", "ffn"])
def test_compiled_regions_equal_the_eager_blocks_fwd_and_grads(recompute):
    """fp32: the compiled regions (Mamba in/out, attention in/out, dense FFN; MoE FFN eager) give the eager model's
    loss and every gradient to float rounding, under sub-layer recompute, with one compiled graph per region kind
    (5) shared by the layers."""
    from torch._dynamo.utils import counters

    cfg = ModelConfig(**TINY, activation_checkpointing=recompute)
    torch.manual_seed(0)
    eager = JambaLM(cfg)
    comp = copy.deepcopy(eager)
    cb.apply(comp, ON)
    assert [b.compiled_regions for b in comp.layers] == [True] * 4
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    l0, g0 = _grads(eager, ids)
    l1, g1 = _grads(comp, ids)
    assert counters["stats"]["unique_graphs"] - graphs == 5, "one graph per region kind, shared by the blocks"
    assert abs(l1 - l0) < 1e-5 * abs(l0)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert _rel(g1[n], g0[n]) < 1e-4, n


def test_fp8_regions_trace_the_float8_linears_and_the_kernel_layout():
    """FP8 (torchao tensorwise; torch._scaled_mm runs on CPU): the linears in the regions leave the weight cache
    (the regions cast their weights; the model keeps the cache for its FP8 expert stacks, which need CUDA); the
    compiled model tracks the eager FP8 model,
    and the Mamba kernel layout's swapped-operand FP8 GEMM (``weight_mm``) compiles inside the input region."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    cfg = ModelConfig(**TINY, fp8="tensorwise", activation_checkpointing="ffn")
    torch.manual_seed(0)
    eager = JambaLM(cfg).to(torch.bfloat16)
    comp = copy.deepcopy(eager)
    for m in (eager, comp):
        float8.convert(m, cfg)
    cache = float8.weight_cache(comp)
    assert cache is not None  # the cache stays for what runs eager (the FP8 expert stacks' grouped GEMMs)
    cb.apply(comp, ON)
    assert float8.weight_cache(comp) is cache
    lin = [m for m in comp.modules() if isinstance(m, Float8Linear)]
    assert lin and all(m.jt_weight_cache is None and not m.jt_compiled for m in lin)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    l0, g0 = _grads(eager, ids, 1)
    l1, g1 = _grads(comp, ids, 1)
    assert cache.casts == 0, "no linear reads the step cache"
    # the regions skip the bf16 rounding between fused ops, so the FP8 scales and casts differ in last bits
    assert abs(l1 - l0) < 1e-3 * abs(l0)
    total = sum(((g1[n].double() - g0[n].double()) ** 2).sum() for n in g0) ** 0.5 / \
        sum((g0[n].double() ** 2).sum() for n in g0) ** 0.5
    assert total < 0.1 and all(torch.isfinite(g).all() for g in g1.values()), total
    mixer, norm = comp.layers[0].mixer, comp.layers[0].input_layernorm
    x = torch.randn(2, 32, cfg.hidden_size).to(torch.bfloat16)
    u, z = cb.region(cb.mamba_in)(norm, mixer, x, True)
    u0, z0 = mixer._in_proj(norm(x), True)
    assert u.shape == u0.shape == (2, mixer.d_inner, 32) and _rel(u, u0) < 2e-2 and _rel(z, z0) < 2e-2


def test_bench_variant_token():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import throughput

    cfg = throughput.load_cfg(os.path.join(REPO, "conf/model/tiny.yaml"), [])
    assert throughput.variant_config(cfg, "opt+fp8dense+blocks").compile_blocks is True
    assert throughput.variant_config(cfg, "opt+fp8dense+blocks").fp8 == "tensorwise"
    assert throughput.variant_config(cfg, "opt+blocks").compile_blocks is True
    assert throughput.variant_config(cfg, "opt").compile_blocks is None  # the config's: auto
    assert throughput.variant_config(cfg, "opt+fp8+noblocks").compile_blocks is False
    assert throughput.variant_report(throughput.variant_config(cfg, "opt+fp8"))["blocks"].startswith("auto with")
    # the row's report (printed before it is timed), with and without FP8
    assert set(throughput.variant_report(throughput.variant_config(cfg, "opt+blocks"))) == {"blocks"}
    rep = throughput.variant_report(throughput.variant_config(cfg, "opt+fp8dense+blocks"))
    assert "compiled block regions" in rep["fp8"] and rep["blocks"].startswith("compiled regions")
    assert throughput.variant_report(throughput.variant_config(cfg, "opt")) == {}


ZERO_WORKER = r'''
import copy, json, sys
import torch
import deepspeed
import deepspeed.comm.torch  # noqa: F401
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the JIT build of DeepSpeed's CPU shm op
from jambatrain.models import JambaLM, ModelConfig
from jambatrain.models import compiled_blocks as cb

cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=2, expert_layer_period=4, expert_layer_offset=3,
                  attn_layer_period=4, attn_layer_offset=1, mamba_impl="reference", moe_impl="native",
                  compile_elementwise=False, fused_rms_norm=False, activation_checkpointing="mixer")
out = {}
torch.manual_seed(0)
base = JambaLM(cfg)
for stage in (1, 2):
    for blocks in (False, True):
        model = copy.deepcopy(base)
        cb.apply(model, cb.BlocksPlan(blocks, "forced for the test"))  # the trainer's order: before the engine
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
              "gradient_accumulation_steps": 2}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        losses = []
        for step in range(6):  # 3 optimizer steps of 2 micro batches
            ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(step))
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[f"{stage}-{blocks}"] = losses
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_compiled_regions_train_under_deepspeed_zero_1_2(tmp_path):
    """The compiled regions inside a DeepSpeed ZeRO-1 / ZeRO-2 engine (gradient hooks, partitioned optimizer,
    gradient accumulation) with mixer recompute, on CPU in fp32: the same losses as the eager blocks, step by step."""
    worker = tmp_path / "w.py"
    worker.write_text(ZERO_WORKER)
    res = torchrun_worker(str(worker), 1)
    for stage in (1, 2):
        eager, comp = res[f"{stage}-False"], res[f"{stage}-True"]
        assert eager[-1] < eager[0] - 0.1, eager
        assert comp == pytest.approx(eager, rel=1e-4), (stage, comp, eager)
