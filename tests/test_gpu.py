"""GPU fast paths against their references, forward and backward (run on a CUDA machine: ``pytest -m gpu``).

Errors are ||fast - ref|| / ||ref|| over the whole tensor. Tolerances:
  fp32 kernels vs fp32 references                    2e-3 (fwd) / 5e-3 (grads): only summation order differs
  bf16 kernels vs the fp32 reference on the same bf16 inputs   3e-2: bf16 rounding of inputs/outputs
  grouped-GEMM MoE vs the native loop, both bf16     2e-2 (fwd and grads)
  scan-with-reset kernel vs the reference scan with the same document starts: as the plain scan kernel
  whole JambaLM: the bf16 kernel path's error against an fp32 reference-path run must stay within
    1.5x (+1e-2) of the bf16 reference path's own error, for the logits and every parameter's gradient
  Mamba kernel layout vs the generic kernel path, fused RMSNorm vs eager: 1e-2 (fwd) / 2e-2 (grads)
Every kernel test also checks that the output is finite and that the fast path really ran where that
can be told (kernel importable; SDPA restricted to the flash backend).
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU fast-path tests)"),
]

from jambatrain.models import JambaLM, ModelConfig  # noqa: E402
from jambatrain.models import moe_backends, ssm_ops  # noqa: E402
from jambatrain.models.attention import Attention  # noqa: E402
from jambatrain.models.moe import MoE, route  # noqa: E402
from jambatrain.models.moe_backends import experts_forward_native  # noqa: E402

needs_scan = pytest.mark.skipif(not ssm_ops.kernels_available()["selective_scan"],
                                reason="mamba-ssm selective_scan kernel not importable (launch/build_kernels.sh)")
needs_conv = pytest.mark.skipif(not ssm_ops.kernels_available()["causal_conv1d"],
                                reason="causal-conv1d kernel not importable (launch/build_kernels.sh)")
needs_reset = pytest.mark.skipif(not ssm_ops.kernels_available()["scan_reset"],
                                 reason="jambatrain_scan_reset_cuda not built (launch/build_kernels.sh, WHICH=reset)")
DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _scan_inputs(dtype, b=2, d=192, n=16, L=700, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    u, delta, z = r(b, d, L).to(dtype), (0.5 * r(b, d, L)).to(dtype), r(b, d, L).to(dtype)
    A = -torch.rand(d, n, device=DEV, generator=g) * 4 - 0.1
    B, C = r(b, n, L).to(dtype), r(b, n, L).to(dtype)
    D, dbias = r(d), r(d) * 0.5 - 2.0
    return [u, delta, A, B, C, D, z, dbias]


@needs_scan
@pytest.mark.parametrize("dtype,tol_f,tol_b", [(torch.float32, 2e-3, 5e-3), (torch.bfloat16, 3e-2, 3e-2)])
def test_selective_scan_kernel_vs_ref(dtype, tol_f, tol_b):
    ins = _scan_inputs(dtype)
    ker = [t.clone().requires_grad_() for t in ins]
    ref = [t.detach().float().clone().requires_grad_() for t in ins]  # reference in fp32 on the same values
    yk = ssm_ops.selective_scan(*ker[:6], z=ker[6], delta_bias=ker[7], delta_softplus=True, backend="mamba-ssm")
    yr = ssm_ops.selective_scan_ref(*ref[:6], z=ref[6], delta_bias=ref[7], delta_softplus=True)
    assert yk.dtype == dtype
    assert rel(yk, yr) < tol_f
    gy = torch.randn_like(yr)
    yk.backward(gy.to(dtype))
    yr.backward(gy)
    for name, a, b in zip("u delta A B C D z delta_bias".split(), ker, ref):
        assert rel(a.grad, b.grad) < tol_b, name


def _doc_starts(b, L, seed=0):
    """Document starts at 0, at random places, at the 2048-position chunk edges of the kernel and next to them,
    and a one-token document."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    reset = torch.rand(b, L, device=DEV, generator=g) < 1 / 150
    reset[:, 0] = True
    for p in (1, 2, 5, 6, 2047, 2048, 2049, L - 1):
        if p < L:
            reset[p % b, p] = True
    return reset


@needs_reset
@needs_scan
@pytest.mark.parametrize("dtype,tol_f,tol_b", [(torch.float32, 2e-3, 5e-3), (torch.bfloat16, 3e-2, 3e-2)])
@pytest.mark.parametrize("L", [700, 4500])  # 4500: three of the kernel's 2048-position chunks, a ragged last one
def test_scan_reset_kernel_vs_ref(dtype, tol_f, tol_b, L):
    """jambatrain's scan-with-reset kernel against the reference scan with the same document starts, and a
    document's outputs and gradients do not depend on the documents before it."""
    ins = _scan_inputs(dtype, L=L)
    reset = _doc_starts(2, L)
    ker = [t.clone().requires_grad_() for t in ins]
    ref = [t.detach().float().clone().requires_grad_() for t in ins]
    yk = ssm_ops.selective_scan(*ker[:6], z=ker[6], delta_bias=ker[7], delta_softplus=True, backend="scan-reset",
                                reset=reset)
    yr = ssm_ops.selective_scan_ref(*ref[:6], z=ref[6], delta_bias=ref[7], delta_softplus=True, reset=reset)
    assert yk.dtype == dtype and yk.grad_fn is not None and "ScanKernel" in type(yk.grad_fn).__name__
    assert rel(yk, yr) < tol_f
    plain = ssm_ops.selective_scan_ref(*ref[:6], z=ref[6], delta_bias=ref[7], delta_softplus=True)
    assert rel(plain, yr) > 0.1  # the resets change the result by far more than either tolerance
    gy = torch.randn_like(yr)
    yk.backward(gy.to(dtype))
    yr.backward(gy)
    for name, a, b in zip("u delta A B C D z delta_bias".split(), ker, ref):
        assert rel(a.grad, b.grad) < tol_b, name
    # row 0's last document on its own gives the same outputs as inside the packed row
    s = int(reset[0].nonzero().max())
    if s < L - 1:
        sl = lambda t: t[:1, ..., s:].contiguous()  # noqa: E731
        alone = ssm_ops.selective_scan(sl(ins[0]), sl(ins[1]), ins[2], sl(ins[3]), sl(ins[4]), ins[5], z=sl(ins[6]),
                                       delta_bias=ins[7], delta_softplus=True, backend="mamba-ssm")
        assert rel(yk.detach()[:1, :, s:], alone) < tol_f


@needs_reset
@needs_conv
def test_jamba_kernel_path_with_documents_matches_reference_fp32(monkeypatch):
    """Whole model with packed documents, fp32: the kernel path (scan-reset kernel, compiled document conv) and the
    reference path give the same logits and gradients; and it is the kernel path that ran."""
    ref, fast, ids = _reference_and_fast("auto")
    docs = _doc_starts(2, 512, seed=1)
    calls = []
    orig = ssm_ops._ScanKernelFn.apply
    monkeypatch.setattr(ssm_ops._ScanKernelFn, "apply", lambda *a: calls.append(a[0]) or orig(*a))
    _assert_same_function(fast, ref, ids, docs)
    assert calls and all(c is ssm_ops._scan_reset_ext for c in calls)


@needs_conv
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("L", [513, 2048])  # 513: not a multiple of the kernel's vector (ssm_ops reroutes it)
def test_causal_conv1d_kernel_vs_ref(dtype, tol, channel_last, L):
    b, d, k = 2, 256, 4
    x = torch.randn(b, L, 2 * d, device=DEV).to(dtype)
    # channel-last: a (b, d, l) view of a (b, l, 2d) tensor, the layout the mixer slices out of in_proj
    x = x.transpose(1, 2)[:, :d] if channel_last else x[..., :d].transpose(1, 2).contiguous()
    w, bias = torch.randn(d, k, device=DEV).to(dtype), torch.randn(d, device=DEV).to(dtype)
    xk, wk, bk = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    xr, wr, br = (t.detach().float().clone().requires_grad_() for t in (x, w, bias))
    yk = ssm_ops.causal_conv1d(xk, wk, bk, "silu", backend="causal-conv1d")
    yr = ssm_ops.causal_conv1d_ref(xr, wr, br, "silu")
    assert rel(yk, yr) < tol
    gy = torch.randn_like(yr)
    yk.backward(gy.to(dtype))
    yr.backward(gy)
    for name, a, r_ in (("x", xk, xr), ("weight", wk, wr), ("bias", bk, br)):
        assert rel(a.grad, r_.grad) < max(tol, 5e-3), name


def _moe_case(T=1000, h=256, f=512, E=8, k=2, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, h, device=DEV, generator=g)
    logits = torch.randn(T, E, device=DEV, generator=g) * 2
    logits[:, 3] -= 100.0  # expert 3 gets no tokens: empty groups must work
    ws = [torch.randn(E, f, h, device=DEV, generator=g) * h ** -0.5 for _ in range(3)]
    return x, logits, ws


@pytest.mark.parametrize("backend", ["grouped", "megablocks"])
def test_moe_backend_vs_native(backend):
    if backend == "grouped" and not moe_backends.grouped_supported(torch.zeros(1, device=DEV, dtype=torch.bfloat16)):
        pytest.skip("torch._grouped_mm not usable on this GPU/torch")
    if backend == "megablocks" and not moe_backends.megablocks_available():
        pytest.skip("megablocks does not import (launch/build_kernels.sh builds it)")
    x, logits, ws = _moe_case()
    fast = moe_backends.select(backend, x.bfloat16(), ws[0].bfloat16())

    def run(fn, dtype):
        xx = x.to(dtype).requires_grad_()
        lg = logits.clone().requires_grad_()
        ww = [w.to(dtype).requires_grad_() for w in ws]
        routing = route(lg, 2)
        y = fn(xx, routing, *ww)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1], device=DEV, dtype=y.dtype))
        return y, [xx.grad, lg.grad] + [w.grad for w in ww]

    y_ref, g_ref = run(experts_forward_native, torch.bfloat16)
    y, g = run(fast, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert rel(y, y_ref) < 2e-2
    for name, a, b in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], g, g_ref):
        assert rel(a, b) < 2e-2, name
    assert g[4][3].abs().max() == 0  # the empty expert gets no gradient


def test_moe_auto_picks_fast_backend_on_cuda_bf16():
    x = torch.zeros(4, 256, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(2, 512, 256, device=DEV, dtype=torch.bfloat16)
    fn = moe_backends.select("auto", x, w)
    if moe_backends.grouped_supported(x, w):
        assert fn is not experts_forward_native
    assert moe_backends.select("auto", x.float(), w.float()) is experts_forward_native


def test_attention_uses_flash_with_gqa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ModelConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    attn = Attention(cfg).to(DEV, torch.bfloat16)
    x = torch.randn(2, 1024, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot take this call
        y = attn(x)
        y.float().pow(2).mean().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        x2 = x.detach().clone().requires_grad_()
        y2 = attn(x2)
        y2.float().pow(2).mean().backward()
    assert rel(y, y2) < 2e-2
    assert rel(x.grad, x2.grad) < 3e-2


def _small_cfg(**kw):
    base = dict(name="gputest", vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2,
                expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                router_aux_loss_coef=0.01)
    base.update(kw)
    return ModelConfig(**base)


def _set_impls(model, mamba_impl, moe_impl):
    for m in model.modules():
        if hasattr(m, "A_log"):
            m.impl = mamba_impl
        if isinstance(m, MoE):
            m.impl = moe_impl


def _grads(model, ids, doc_starts=None):
    out = model(ids, labels=ids, doc_starts=doc_starts)
    out.loss.backward()
    return out, {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def _reference_and_fast(fast_impl: str):
    """Two copies of one small fp32 model: Mamba on the reference path / on ``fast_impl``; MoE native in both."""
    torch.manual_seed(0)
    ref = JambaLM(_small_cfg()).to(DEV)
    fast = copy.deepcopy(ref)
    _set_impls(ref, "reference", "native")
    _set_impls(fast, fast_impl, "native")
    return ref, fast, torch.randint(0, 1024, (2, 512), device=DEV)


def _assert_same_function(fast, ref, ids, doc_starts=None):
    """Logits to 1e-4 and every parameter gradient to 1e-3, relative per tensor."""
    o_ref, g_ref = _grads(ref, ids, doc_starts)
    o_fast, g_fast = _grads(fast, ids, doc_starts)
    assert rel(o_fast.logits, o_ref.logits) < 1e-4
    bad = [(n, rel(g_fast[n], g_ref[n])) for n in g_ref
           if g_ref[n].norm() > 0 and rel(g_fast[n], g_ref[n]) > 1e-3]
    assert not bad, bad


@needs_scan
@needs_conv
def test_jamba_kernel_path_matches_reference_bf16():
    """The kernel path in bf16 must be about as close to an fp32 reference-path run as the reference path in bf16
    is (logits within 1.5x + 1e-2, each gradient within 2.5x + 1e-2): the fast path adds no error beyond bf16's."""
    torch.manual_seed(0)
    ref32 = JambaLM(_small_cfg()).to(DEV)
    with torch.no_grad():  # decisive routing: with the 0.02-std init, top-k ties flip under bf16 rounding and a
        for m in ref32.modules():  # flipped token moves whole rows of expert gradients (seen: 3-4% rel. error)
            if hasattr(m, "router"):
                m.router.weight.mul_(30.0)
    ref_bf = copy.deepcopy(ref32).to(torch.bfloat16)
    fast_bf = copy.deepcopy(ref32).to(torch.bfloat16)
    _set_impls(ref32, "reference", "native")
    _set_impls(ref_bf, "reference", "native")
    _set_impls(fast_bf, "cuda", "grouped" if moe_backends.grouped_supported(
        torch.zeros(1, device=DEV, dtype=torch.bfloat16)) else "native")
    ids = torch.randint(0, 1024, (2, 512), device=DEV)
    o32, g32 = _grads(ref32, ids)
    ob, gb = _grads(ref_bf, ids)
    of, gf = _grads(fast_bf, ids)
    e_ref, e_fast = rel(ob.logits, o32.logits), rel(of.logits, o32.logits)
    assert e_fast < 1.5 * e_ref + 1e-2, (e_fast, e_ref)
    assert abs(of.loss.item() - o32.loss.item()) < 1e-2 * abs(o32.loss.item())
    bad = []
    for n in g32:
        if g32[n].norm() == 0:
            continue
        e_ref, e_fast = rel(gb[n], g32[n]), rel(gf[n], g32[n])
        # 2.5x: the gradients of the inner dt/B/C norm weights are sums with heavy cancellation (dt enters through
        # softplus' slope ~1e-3 at Mamba's dt init) and reach 4-5% error in bf16 on either path, so for them the
        # floor is 5e-2: which path lands nearer the fp32 run is luck (seen: 1.5% vs 4.8% once the loss kernel's
        # rounding changed). Their fp32 kernel-vs-reference agreement is held to 1e-3 in
        # test_jamba_kernel_path_matches_reference_fp32.
        floor = 5e-2 if n.endswith(("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")) else 1e-2
        if e_fast > 2.5 * e_ref + floor:
            bad.append((n, round(e_fast, 4), round(e_ref, 4)))
    assert not bad, bad


@needs_scan
@needs_conv
def test_mamba_kernel_layout_matches_generic_kernel_path():
    from jambatrain.models.mamba import MambaMixer

    torch.manual_seed(0)
    generic = MambaMixer(_small_cfg(hidden_size=512, mamba_impl="cuda", mamba_kernel_layout=False))
    generic = generic.to(DEV, torch.bfloat16)
    generic.reset_ssm_parameters()
    layout = MambaMixer(_small_cfg(hidden_size=512, mamba_impl="cuda")).to(DEV, torch.bfloat16)
    layout.load_state_dict(generic.state_dict())  # the same weights, the switch set at construction
    assert (generic.kernel_layout, layout.kernel_layout) == (False, True)
    x = torch.randn(2, 1024, 512, device=DEV, dtype=torch.bfloat16)
    outs = []
    for mixer in (generic, layout):
        xx = x.clone().requires_grad_()
        y = mixer(xx)
        y.float().pow(2).mean().backward()
        outs.append((y.detach().float(), xx.grad.float(), {n: p.grad.float() for n, p in mixer.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = outs
    assert rel(y1, y0) < 1e-2
    assert rel(gx1, gx0) < 2e-2
    for n in g0:
        assert rel(g1[n], g0[n]) < 2e-2, n


@pytest.mark.skipif(not ssm_ops.kernels_available()["rms_norm"], reason="mamba-ssm Triton RMSNorm not importable")
def test_fused_rms_norm_vs_eager():
    from jambatrain.models.layers import RMSNorm

    for dim, shape in ((2048, (3, 700)), (16, (4096,))):  # model width; the B/C norms' width
        eager = RMSNorm(dim, fused=False).to(DEV, torch.bfloat16)
        with torch.no_grad():
            eager.weight.uniform_(0.5, 1.5)
        fused = RMSNorm(dim, fused=True).to(DEV, torch.bfloat16)
        fused.load_state_dict(eager.state_dict())
        x = torch.randn(*shape, dim, device=DEV, dtype=torch.bfloat16)
        res = []
        for norm in (eager, fused):
            xx = x.clone().requires_grad_()
            y = norm(xx)
            y.float().pow(2).sum().backward()
            res.append((y.float(), xx.grad.float(), norm.weight.grad.float()))
        for a, b in zip(res[1], res[0]):
            assert rel(a, b) < 1e-2


def test_compiled_elementwise_vs_eager(monkeypatch):
    """torch.compile'd SwiGLU product and fp32 cross-entropy (models/fused_ops.py) vs their eager references,
    bf16 inputs, forward and backward; ignore_index honoured. Compiled kernels may round the bf16 outputs
    differently in the last bit: 1e-2 (silu*mul), 1e-5 (fp32 loss), 1e-2 (bf16 logit gradients)."""
    from jambatrain.models import fused_ops

    ran = []  # (reference, whether a compiled twin was handed out for it)
    real = fused_ops.maybe_compiled
    monkeypatch.setattr(fused_ops, "maybe_compiled",
                        lambda fn, compiled: ran.append((fn, real(fn, compiled) is not fn)) or real(fn, compiled))

    g0, u0 = (torch.randn(4096, 1792, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    res = []
    for compiled in (False, True):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        h = fused_ops.silu_mul(g, u, compiled)
        (h.float() * torch.linspace(-1, 1, h.shape[1], device=DEV)).sum().backward()
        res.append((h.float(), g.grad.float(), u.grad.float()))
    for a, b in zip(res[1], res[0]):
        assert rel(a, b) < 1e-2
    assert ran == [(fused_ops.silu_mul_ref, False), (fused_ops.silu_mul_ref, True)]  # the compiled twin really ran
    ran.clear()

    logits0 = (3 * torch.randn(3000, 8192, device=DEV)).to(torch.bfloat16)
    labels = torch.randint(0, 8192, (3000,), device=DEV)
    labels[::7] = -100
    res = []
    for compiled in (False, True):
        logits = logits0.clone().requires_grad_()
        loss = fused_ops.cross_entropy_sum(logits, labels, compiled)
        loss.backward()
        res.append((loss.detach(), logits.grad.float()))
    assert rel(res[1][0], res[0][0]) < 1e-5
    assert rel(res[1][1], res[0][1]) < 1e-2
    assert (res[1][1][::7] == 0).all()
    assert ran == [(fused_ops.cross_entropy_sum_ref, False), (fused_ops.cross_entropy_sum_ref, True)]


def test_few_bf16_train_steps_loss_falls():
    torch.manual_seed(0)
    model = JambaLM(_small_cfg()).to(DEV, torch.bfloat16)  # impls "auto": kernels where they import
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ids = torch.randint(0, 1024, (4, 256), device=DEV)
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@needs_scan
@needs_conv
def test_jamba_kernel_path_matches_reference_fp32():
    """Whole model, fp32: the CUDA kernel path (scan, conv, kernel layout, fused norms) and the reference path give
    the same logits and gradients to 1e-3 relative per tensor."""
    ref, fast, ids = _reference_and_fast("cuda")
    _assert_same_function(fast, ref, ids)


@needs_scan
@needs_conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_is_causal(dtype):
    """On the kernel path (kernel layout, conv/scan kernels, flash SDPA in bf16, grouped MoE) a token changed at t
    leaves every logit before t as it was and moves the logit at t; batch rows do not see each other (the
    (d, batch*seq) layout keeps each row's sequence separate)."""
    torch.manual_seed(0)
    model = JambaLM(_small_cfg(num_experts=1, num_experts_per_tok=1)).to(DEV, dtype)
    L = 1024
    ids = torch.randint(0, 1024, (3, L), device=DEV)
    with torch.no_grad():
        base = model(ids).logits.float()
        for t in (1, 17, 700, L - 1):
            ids2 = ids.clone()
            ids2[1, t] = (ids2[1, t] + 1) % 1024
            out = model(ids2).logits.float()
            tol = 1e-5 if dtype == torch.float32 else 2e-3  # a leak moves logits by O(0.1); kernels are per row
            assert (out[:, :t] - base[:, :t]).abs().max() <= tol, t
            assert (out[[0, 2]] - base[[0, 2]]).abs().max() <= tol, t  # the other rows
            assert (out[1, t] - base[1, t]).abs().max() > 1e-2, t


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_flex_document_attention_vs_dense_mask(dtype, tol):
    """Packed documents: compiled FlexAttention with the block mask against SDPA with the dense mask, fwd + bwd,
    GQA, over several 128-position blocks (documents that start inside, at and across block edges)."""
    from jambatrain.models.attention import document_block_mask, document_dense_mask

    torch.manual_seed(0)
    attn = Attention(_small_cfg()).to(DEV, dtype)
    x = torch.randn(2, 700, 256, device=DEV, dtype=dtype, requires_grad=True)
    starts = _doc_starts(2, 700, seed=2)
    starts[1, [127, 128, 129, 256]] = True
    res = []
    for mask in (document_block_mask(starts), document_dense_mask(starts)):
        y = attn(x, mask)
        (g,) = torch.autograd.grad(y.float().square().sum(), x)
        res.append((y, g))
    assert rel(res[0][0], res[1][0]) < tol
    assert rel(res[0][1], res[1][1]) < tol


@pytest.mark.parametrize("impl", ["megablocks", "grouped"])
def test_expert_parallel_exchange_path_on_gpu(impl, monkeypatch):
    """The expert-parallel code path on one GPU (NCCL, ep = 1 group of one rank): permute, all-to-all of counts and
    rows, regroup, ``expert_mlp`` with host counts (MegaBlocks' gmm), and back, equal to the layer without it."""
    import os

    import torch.distributed as dist

    from conftest import record_moe_backends
    from jambatrain.parallel import expert_parallel

    if impl == "megablocks" and not moe_backends.megablocks_available():
        pytest.skip("megablocks does not import (launch/build_kernels.sh builds it)")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    ep = expert_parallel.ExpertParallel(size=1, rank=0, group=dist.group.WORLD, edp_group=dist.group.WORLD,
                                        edp_rank=0, group_name="ep_size_1")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_experts=8, num_experts_per_tok=2, moe_impl=impl)
    plain = MoE(cfg)
    plain.init_experts(0.02, 0.02)  # the stacked weights are torch.empty until a model initialises them
    torch.nn.init.normal_(plain.router.weight, 0.0, 0.02)
    plain = plain.to(DEV, torch.bfloat16)
    with torch.no_grad():
        plain.router.weight[:, 0] = 0.0
        plain.router.weight[3, 0] = -100.0  # with x[:, 0] = 1: expert 3 gets no token
    sharded = copy.deepcopy(plain)
    sharded.exchange = lambda rows, tpe, mlp: expert_parallel.exchange(rows, tpe, mlp, ep=ep)
    x = torch.randn(1000, 256, device=DEV, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    outs = []
    ran = record_moe_backends(monkeypatch)
    for layer in (plain, sharded):
        ran.clear()
        xx = x.clone().requires_grad_()
        y, _ = layer(xx)
        y.float().pow(2).sum().backward()
        assert set(ran) == {impl}, ran
        outs.append([y, xx.grad, layer.router.weight.grad, layer.w_gate.grad, layer.w_up.grad, layer.w_down.grad])
    for name, a, b in zip(["y", "x", "router", "w_gate", "w_up", "w_down"], *outs):
        assert rel(a, b) < 1e-2, name
    assert outs[1][5][3].abs().max() == 0  # the empty expert gets no gradient


@needs_scan
@needs_conv
@pytest.mark.parametrize("dtype,docs", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_context_parallel_path_on_gpu_equals_plain(monkeypatch, dtype, docs):
    """The context-parallel code path on one GPU (NCCL, a cp group of one rank): the Mamba mixers' conv halo,
    all-to-all to the channel layout, the scan kernels (mamba-ssm; scan-reset with documents), all-to-all back;
    Ulysses attention (flash in bf16, flex with documents); the cp loss. Equal to the model without it: the
    logits and every gradient within 1e-4 relative (fp32); in bf16 the cp path's error against fp32 weights within
    twice the plain bf16 path's."""
    import os

    import torch.distributed as dist

    from jambatrain.parallel import context_parallel

    if docs and not ssm_ops.kernels_available()["scan_reset"]:
        pytest.skip("jambatrain_scan_reset_cuda not built")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    plain = JambaLM(_small_cfg(num_experts=1, compile_elementwise=False)).to(DEV, dtype)
    cp = copy.deepcopy(plain)
    group = context_parallel.CPGroup(dist.group.WORLD, 0, 1)
    for m in cp.modules():
        if hasattr(m, "cp_group"):
            m.cp_group = group
    calls = []
    orig = context_parallel.seq_to_channels
    monkeypatch.setattr(context_parallel, "seq_to_channels", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ids = torch.randint(0, 1024, (2, 1024), device=DEV)
    starts = _doc_starts(2, 1024, seed=2) if docs else None
    outs = [_grads(model, ids, starts) for model in (plain, cp)]
    assert len(calls) == 3 * 3 + 3  # 3 Mamba layers x (x, delta, z) + the attention layer's q, k, v
    plans = {m.last_plan.scan for m in cp.modules() if hasattr(m, "last_plan")}
    assert plans == {"scan-reset" if docs else "mamba-ssm"}
    (o0, g0), (o1, g1) = outs
    if dtype == torch.float32:
        tol = 1e-4
        assert rel(o1.logits, o0.logits) < tol and rel(o1.loss, o0.loss) < tol
        bad = [(n, rel(g1[n], g0[n])) for n in g0 if g0[n].norm() > 0 and rel(g1[n], g0[n]) > tol]
        assert not bad, bad
        return
    # bf16: the cp path lays tensors out differently (halo concat, all-to-all copies), so its GEMMs round differently;
    # measured 1.2e-2 on a few Mamba gradients of this random model (H100, 2026-12-06). Hold each path to the same
    # weights in fp32 instead: the cp path's error must be of the plain bf16 path's size (a real bug is O(1)).
    ref = copy.deepcopy(plain).float()
    o_ref, g_ref = _grads(ref, ids, starts)
    assert rel(o1.logits, o_ref.logits) <= 2 * rel(o0.logits, o_ref.logits) + 1e-3
    bad = [(n, rel(g1[n], g_ref[n]), rel(g0[n], g_ref[n])) for n in g_ref if g_ref[n].norm() > 0
           and rel(g1[n], g_ref[n]) > 2 * rel(g0[n], g_ref[n]) + 1e-3]
    assert not bad, bad
