"""The GPU benchmark's model-side helpers, exercised on CPU so a refactor cannot break them unnoticed between GPU
sessions (the timed runs themselves need CUDA: bench/throughput.py)."""
from __future__ import annotations

import os
import sys

import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import throughput  # noqa: E402

from jambatrain.models import JambaLM  # noqa: E402
from jambatrain.models.layers import RMSNorm, SwiGLU  # noqa: E402
from jambatrain.models.mamba import MambaMixer  # noqa: E402
from jambatrain.models.moe import MoE  # noqa: E402


def test_load_cfg_reads_the_preset_and_applies_overrides():
    cfg = throughput.load_cfg(os.path.join(REPO, "conf/model/1.3b.yaml"), ["num_experts=16", "num_experts_per_tok=2"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (2048, 16, 16, 2)
    assert cfg.name == "1.3b+num_experts=16"


def _switches(model) -> set:
    """Every A/B switch value the built modules hold, as (kind, value) pairs."""
    out = set()
    for m in model.modules():
        if isinstance(m, MambaMixer):
            out.add(("layout", m.kernel_layout))
        elif isinstance(m, RMSNorm):
            out.add(("norm", m.fused))
        elif isinstance(m, SwiGLU):
            out.add(("compile", m.compile_elementwise))
        elif isinstance(m, MoE):
            out.add(("moe", m.impl))
    return out


def test_variants_set_exactly_their_switches_in_the_config_and_the_loss_runs():
    cfg = throughput.load_cfg(os.path.join(REPO, "conf/model/tiny.yaml"), [])
    base = throughput.variant_config(cfg, "base+native")
    assert (base.mamba_kernel_layout, base.fused_rms_norm, base.compile_elementwise, base.moe_impl) == \
        (False, False, False, "native")
    assert _switches(JambaLM(base)) == {("layout", False), ("norm", False), ("compile", False), ("moe", "native")}
    opt = throughput.variant_config(cfg, "opt")
    assert opt == cfg  # the defaults are the optimised row
    model = JambaLM(opt)
    assert _switches(model) == {("layout", True), ("norm", True), ("compile", True), ("moe", "auto")}
    only_norm = throughput.variant_config(cfg, "norm")
    assert (only_norm.mamba_kernel_layout, only_norm.fused_rms_norm, only_norm.compile_elementwise) == \
        (False, True, False)
    assert cfg.mamba_kernel_layout and cfg.fused_rms_norm  # the preset's config is not changed
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = throughput.loss_fn("jambatrain", model, ids)
    assert torch.isfinite(loss) and loss.requires_grad


def test_docs_variant_packs_documents_and_they_reach_the_model():
    cfg = throughput.load_cfg(os.path.join(REPO, "conf/model/tiny.yaml"), [])
    torch.manual_seed(0)
    model = JambaLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    starts = throughput.doc_starts_like(ids, mean_len=32, seed=1)
    assert starts.dtype == torch.bool and starts[:, 0].all()
    assert 2 <= int(starts.sum(1).min()) and int(starts.sum(1).max()) <= 32  # ~8 documents per row
    assert torch.equal(starts, throughput.doc_starts_like(ids, mean_len=32, seed=1))  # seeded
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("doc_starts")),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            packed = throughput.loss_fn("jambatrain", model, ids, starts)
            plain = throughput.loss_fn("jambatrain", model, ids)
    finally:
        hook.remove()
    assert seen[0] is starts and seen[1] is None  # the bench hands the documents to the model, and only then
    assert torch.isfinite(packed) and packed.item() != plain.item()


def test_without_a_gpu_the_bench_says_so_in_one_line(monkeypatch):
    import pytest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--model", os.path.join(REPO, "conf/model/jamba_v0_1.yaml")])
    with pytest.raises(SystemExit, match="on a CUDA GPU and none is visible here"):
        throughput.main()
