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


def test_variants_toggle_exactly_their_switches_and_the_loss_runs():
    cfg = throughput.load_cfg(os.path.join(REPO, "conf/model/tiny.yaml"), [])
    model = JambaLM(cfg)
    try:
        throughput.apply_variant(model, "base+native")
        assert not MambaMixer.kernel_layout and not RMSNorm.fused and not model.cfg.compile_elementwise
        assert all(m.impl == "native" for m in model.modules() if isinstance(m, MoE))
        throughput.apply_variant(model, "opt")
        assert MambaMixer.kernel_layout and RMSNorm.fused and model.cfg.compile_elementwise
        assert all(m.compile_elementwise for m in model.modules() if isinstance(m, SwiGLU))
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        loss = throughput.loss_fn("jambatrain", model, ids)
        assert torch.isfinite(loss) and loss.requires_grad
    finally:  # class-level switches: leave them as the library defaults for the other tests
        MambaMixer.kernel_layout, RMSNorm.fused = True, True


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
