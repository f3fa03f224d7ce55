"""The compiled twins of models/fused_ops.py must compile (whole graph, forward and backward) and equal their eager
references. CI has no GPU, so this compiles them for the CPU; tests/test_gpu.py holds the CUDA build to the same."""
from __future__ import annotations

import pytest
import torch

from jambatrain.models import fused_ops


def _silu_mul_and_grads(fn, g, u):
    g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
    out = fn(g, u)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [g.grad, u.grad]


def test_compiled_silu_mul_and_cross_entropy_equal_the_references_on_cpu():
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(64, 96, generator=gen), torch.randn(64, 96, generator=gen)
    compiled = fused_ops.maybe_compiled(fused_ops.silu_mul_ref, True)
    assert compiled is not fused_ops.silu_mul_ref
    (y, dy), (r, dr) = _silu_mul_and_grads(compiled, g, u), _silu_mul_and_grads(fused_ops.silu_mul_ref, g, u)
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
    for a, b in zip(dy, dr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    logits = 3 * torch.randn(50, 300, generator=gen)
    labels = torch.randint(0, 300, (50,), generator=gen)
    labels[::5] = -100
    results = []
    for fn in (fused_ops.maybe_compiled(fused_ops.cross_entropy_sum_ref, True), fused_ops.cross_entropy_sum_ref):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert (results[0][1][::5] == 0).all()  # ignored positions get no gradient


def test_cpu_tensors_take_the_eager_reference(monkeypatch):
    """CPU input: the compiled twin is neither built nor used, even with compiled=True."""
    g = torch.randn(4, 8)
    handed_out = []
    real = fused_ops.maybe_compiled
    monkeypatch.setattr(fused_ops, "maybe_compiled", lambda fn, compiled: handed_out.append(real(fn, compiled)) or
                        handed_out[-1])
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called for a CPU tensor"))
    torch.testing.assert_close(fused_ops.silu_mul(g, g, compiled=True), fused_ops.silu_mul_ref(g, g))
    fused_ops.cross_entropy_sum(g, torch.zeros(4, dtype=torch.long), compiled=True)
    assert handed_out == [fused_ops.silu_mul_ref, fused_ops.cross_entropy_sum_ref]


def test_compiled_doc_conv_equals_the_reference_on_cpu():
    """The document-masked causal conv the Mamba kernel path runs with data.doc_mask (ssm_ops.causal_conv1d_doc)."""
    from jambatrain.models import ssm_ops

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 40, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)  # the kernel layout's strides
    w, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    reset = torch.zeros(2, 40, dtype=torch.bool)
    reset[0, [0, 3, 4, 20]] = True
    reset[1, [0, 39]] = True
    outs = []
    for fn in (fused_ops.maybe_compiled(ssm_ops.causal_conv1d_doc_ref, True), ssm_ops.causal_conv1d_doc_ref):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
        y = fn(xs, ws, bs, reset, "silu")
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append([y.detach(), xs.grad, ws.grad, bs.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
