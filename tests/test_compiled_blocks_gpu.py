"""Compiled block regions (``model.compile_blocks``) on the GPU (``pytest -m gpu``): a small JambaLM (Mamba with the
mamba-ssm / causal-conv1d kernels between the regions, attention, dense and MoE FFNs, FFN recompute) with its block
regions compiled against the same model eager, in bf16 and in FP8 (torchao tensorwise, Hopper).

Errors are ||a - b|| / ||b|| over all gradients as one vector. bf16: the regions run RMSNorm's eager formula (the
eager model mamba-ssm's Triton kernel, which applies the weight before its one cast) and skip the bf16 rounding
between fused ops, so the two differ by bf16 rounding (bound 3e-2, loss 2e-3). FP8: those rounding differences move
the tensorwise scales, so every FP8 element may round the other way (e4m3 forward, e5m2 gradients); the bound is that
the compiled FP8 model is as close to the bf16 model as the eager FP8 model is (within 25% + 0.02), and its loss
within 1% of the eager FP8 loss.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from jambatrain.models import JambaLM, ModelConfig  # noqa: E402
from jambatrain.models import compiled_blocks as cb  # noqa: E402
from jambatrain.quantization import float8  # noqa: E402

CFG = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, num_experts=4, attn_layer_period=4, attn_layer_offset=1, expert_layer_period=4,
           expert_layer_offset=3, activation_checkpointing="ffn", compile_elementwise=False)


def _run(model, ids):
    loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def _diff(g1, g0) -> float:
    assert g1.keys() == g0.keys() and all(torch.isfinite(g).all() for g in g1.values())
    return (sum(((g1[n] - g0[n]) ** 2).sum() for n in g0) ** 0.5 / sum((g0[n] ** 2).sum() for n in g0) ** 0.5).item()


def _models(fp8: str):
    cfg = ModelConfig(**CFG, fp8=fp8)
    torch.manual_seed(0)
    with torch.device("cuda"):
        bf = JambaLM(ModelConfig(**CFG)).to(torch.bfloat16)
    eager, comp = copy.deepcopy(bf), copy.deepcopy(bf)
    for m in (eager, comp):
        float8.convert(m, cfg)
    plan = cb.decide(True, "cuda")
    assert plan.on
    cb.apply(comp, plan)
    return bf, eager, comp


def test_bf16_compiled_blocks_match_the_eager_model():
    _, eager, comp = _models("none")
    ids = torch.randint(0, 1024, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    (l0, g0), (l1, g1) = _run(eager, ids), _run(comp, ids)
    d = _diff(g1, g0)
    print(f"bf16 compiled blocks vs eager: loss {l1:.5f} vs {l0:.5f}, gradient rel diff {d:.2e}")
    assert abs(l1 - l0) < 2e-3 * l0 and d < 3e-2
    assert comp.layers[0].mixer.last_plan.scan == "mamba-ssm"  # the kernels ran between the regions


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs float8 tensor cores (sm89+)")
def test_fp8_compiled_blocks_track_fp8_eager():
    bf, eager, comp = _models("tensorwise")
    ids = torch.randint(0, 1024, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    (lb, gb), (l0, g0), (l1, g1) = _run(bf, ids), _run(eager, ids), _run(comp, ids)
    d_eager, d_comp, d_pair = _diff(g0, gb), _diff(g1, gb), _diff(g1, g0)
    print(f"fp8 compiled blocks: loss {l1:.5f} (fp8 eager {l0:.5f}, bf16 {lb:.5f}); gradient rel diff vs bf16 "
          f"{d_comp:.3f} (fp8 eager {d_eager:.3f}), vs fp8 eager {d_pair:.3f}")
    assert abs(l1 - l0) < 1e-2 * l0 and abs(l1 - lb) < 1e-2 * lb
    assert d_comp < 1.25 * d_eager + 0.02
