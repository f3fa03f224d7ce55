"""Mamba-1 ops: pure-PyTorch references beside the fused CUDA kernels, one signature for both.

``decide_mamba`` plans which of them a Mamba mixer runs (the one decision); ``selective_scan`` and
``causal_conv1d`` run the backend they are given: the fused kernels from mamba-ssm / causal-conv1d /
jambatrain's scan-reset extension, or the references below.
The references follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``'s signature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_ops import maybe_compiled
from .linear_scan import linear_scan

try:  # optional fused kernels: only importable on a CUDA build with the extensions compiled
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _selective_scan_cuda
except Exception:  # noqa: BLE001 - ImportError, or a CUDA/triton error raised at import on CPU boxes
    _selective_scan_cuda = None


class _ScanKernelFn(torch.autograd.Function):
    """A compiled selective-scan extension (mamba-ssm's ``selective_scan_cuda``, or jambatrain's
    ``jambatrain_scan_reset_cuda`` with ``reset``) wrapped the way mamba_ssm's SelectiveScanFn wraps it."""

    @staticmethod
    def forward(ctx, ext, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset):
        u = u if u.stride(-1) == 1 else u.contiguous()
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        B = (B.unsqueeze(1) if B.dim() == 3 else B).contiguous()
        C = (C.unsqueeze(1) if C.dim() == 3 else C).contiguous()
        z = None if z is None else (z if z.stride(-1) == 1 else z.contiguous())
        extra = () if reset is None else (reset.to(u.dtype).contiguous(),)
        out, x, *rest = ext.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *extra)
        ctx.ext, ctx.delta_softplus, ctx.has_z = ext, delta_softplus, z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out if z is not None else None, *extra)
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out, *extra = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = ctx.ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout if dout.stride(-1) == 1 else dout.contiguous(), x, out, None,
            ctx.delta_softplus, False, *extra)
        return (None, du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD if D is not None else None,
                rest[0] if ctx.has_z else None, ddelta_bias if delta_bias is not None else None, None, None)


if _selective_scan_cuda is None:
    # mamba_ssm's package __init__ also imports its Mamba-2/3 Triton modules; when one of those fails to import,
    # the compiled scan extension itself may still load: wrap it here the way mamba_ssm's SelectiveScanFn does.
    try:
        import selective_scan_cuda as _ssc

        def _selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
            return _ScanKernelFn.apply(_ssc, u, delta, A, B, C, D, z, delta_bias, delta_softplus, None)
    except Exception:  # noqa: BLE001
        _selective_scan_cuda = None
try:  # jambatrain's fork of that kernel with per-position state resets (csrc/selective_scan_reset)
    import jambatrain_scan_reset_cuda as _scan_reset_ext
except Exception:  # noqa: BLE001
    _scan_reset_ext = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_cuda
except Exception:  # noqa: BLE001
    _causal_conv1d_cuda = None
try:  # mamba-ssm's fused Triton RMSNorm (forward + backward), used by layers.RMSNorm on CUDA
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as _rms_norm_triton
except Exception:  # noqa: BLE001
    _rms_norm_triton = None


def kernels_available() -> dict[str, bool]:
    return {"selective_scan": _selective_scan_cuda is not None, "causal_conv1d": _causal_conv1d_cuda is not None,
            "rms_norm": _rms_norm_triton is not None, "scan_reset": _scan_reset_ext is not None}


@dataclass(frozen=True)
class MambaPlan:
    """What one Mamba mixer forward runs: decided once by ``decide_mamba``, executed by ``MambaMixer`` (which
    records it in ``last_plan``) and printed by the start-up report (``fast_paths``)."""
    layout: str  # "kernel": (b, d, l) views of (d, batch*seq) GEMM outputs (models/mamba.py) | "generic"
    conv: str  # "causal-conv1d" (kernel) | "doc-compiled" | "doc-eager" (document-masked, PyTorch) | "reference"
    scan: str  # "mamba-ssm" (kernel) | "scan-reset" (jambatrain's kernel with document resets) | "reference"
    cp: int = 1  # context-parallel size: >1 scans d_inner/cp channels of the whole sequence (all-to-all around it)
    error: str | None = None  # model.mamba_impl=cuda where the kernels cannot run
    warning: str | None = None  # a slow path a CUDA run would take, with its fix

    def describe(self) -> str:
        scan = {"mamba-ssm": "mamba-ssm scan", "scan-reset": "scan-reset kernel", "reference": "reference scan"}
        conv = {"causal-conv1d": "causal-conv1d", "doc-compiled": "compiled doc conv", "doc-eager": "eager doc conv",
                "reference": "reference conv"}
        out = f"{scan[self.scan]} + {conv[self.conv]}"
        if self.layout == "generic" and (self.scan != "reference" or self.conv == "causal-conv1d"):
            out += " (generic layout)"
        return out + (f", context parallel {self.cp} (all-to-all)" if self.cp > 1 else "")


def decide_mamba(impl: str, device_type: str, doc_reset: bool, kernel_layout: bool = True,
                 compile_elementwise: bool = True, cp: int = 1) -> MambaPlan:
    """The Mamba mixer's plan for ``model.mamba_impl=impl`` on ``device_type``, with or without document resets:
    the one decision, executed by the mixer and printed by the start-up report.
    Scan: mamba-ssm's kernel without resets, jambatrain's scan-with-reset kernel with them, else the reference.
    Conv: causal-conv1d without resets; with them the document-masked conv (compiled by Inductor on CUDA with
    ``model.compile_elementwise``), else the reference. Layout: the (d, batch*seq) kernel layout when
    ``model.mamba_kernel_layout`` and a kernel runs. ``impl=cuda`` refuses any reference op."""
    cuda = device_type == "cuda"
    k = kernels_available()
    fast = cuda and impl != "reference"
    if doc_reset:
        scan = "scan-reset" if fast and k["scan_reset"] else "reference"
        conv = "doc-compiled" if fast and compile_elementwise else "doc-eager"
    else:
        scan = "mamba-ssm" if fast and k["selective_scan"] else "reference"
        conv = "causal-conv1d" if fast and k["causal_conv1d"] else "reference"
    kernel = scan != "reference" or conv == "causal-conv1d"
    layout = "kernel" if kernel_layout and kernel else "generic"
    error = warning = None
    if impl == "cuda" and not (cuda and scan != "reference" and conv != "reference"):
        error = ("model.mamba_impl=cuda needs a CUDA device and the mamba-ssm / causal-conv1d kernels "
                 "(launch/build_kernels.sh; with data.doc_mask also WHICH=reset); use model.mamba_impl=auto")
    if cuda and impl == "auto" and not doc_reset and (scan == "reference" or conv == "reference"):
        warning = ("mamba-ssm / causal-conv1d do not import: Mamba layers run the pure-PyTorch reference scan or conv, "
                   "many times slower; build them with launch/build_kernels.sh")
    elif fast and doc_reset and scan == "reference":
        warning = ("data.doc_mask=true but jambatrain's scan-reset kernel (jambatrain_scan_reset_cuda) does not "
                   "import, so Mamba layers run the reference scan, many times slower: build it with "
                   "launch/build_kernels.sh (WHICH=reset), or set data.doc_mask=false")
    return MambaPlan(layout, conv, scan, cp, error, warning)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dim in one Triton kernel each way (fp32 math, output in x's dtype), or None when
    the kernel is unavailable or x is not on CUDA. Differs from the eager ``weight * x_hat.to(dtype)`` only in
    rounding: the weight is applied before the single cast."""
    if _rms_norm_triton is None or not x.is_cuda or x.dtype == torch.float64:
        return None
    return _rms_norm_triton(x, weight, None, eps=eps)


def _expand_bc(M: torch.Tensor, d: int) -> torch.Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, d or 1, l, n) broadcastable over channels."""
    if M.dim() == 3:
        return M.transpose(1, 2).unsqueeze(1)
    g = M.shape[1]
    return M.repeat_interleave(d // g, dim=1).transpose(2, 3)


def _scan_inputs(u, delta, B, C, delta_bias, delta_softplus):
    """fp32 u, the effective step size delta (bias, softplus applied) and B, C as (b, d|1, l, n)."""
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    d = u.shape[1]
    return u, delta, _expand_bc(B.float(), d), _expand_bc(C.float(), d)


def _scan_output(y, u, D, z, dtype):
    """y + D u, gated by silu(z), in the input dtype."""
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, reset: torch.Tensor | None = None):
    """Reference selective scan: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t h_t + D u_t.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    The recurrence runs in ``linear_scan`` (analytic backward; sequential on CPU, chunked parallel on GPU);
    the (b, d, l, n) decay and input terms around it are vectorised.
    ``reset``: optional bool (b, l), True where a new document starts (the state is zeroed there).
    Returns y (b, d, l) in u's dtype, and the last state (b, d, n) if ``return_last_state``.
    """
    dtype_in = u.dtype
    u, delta, Bx, Cx = _scan_inputs(u, delta, B, C, delta_bias, delta_softplus)
    decay = torch.exp(delta.unsqueeze(-1) * A.float()[None, :, None, :])  # (b, d, l, n)
    x = (delta * u).unsqueeze(-1) * Bx  # (b, d, l, n)
    if reset is not None:
        decay = decay * (~reset.bool())[:, None, :, None]
    states = linear_scan(decay, x)  # (b, d, l, n)
    y = _scan_output((states * Cx).sum(-1), u, D, z, dtype_in)
    return (y, states[:, :, -1]) if return_last_state else y


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False):
    """The recurrence one token at a time, through autograd: the ground truth the reference scan and the kernel
    are tested against."""
    dtype_in = u.dtype
    u, delta, Bx, Cx = _scan_inputs(u, delta, B, C, delta_bias, delta_softplus)
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A.float()) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[:, :, t]
        ys.append((h * Cx[:, :, t]).sum(-1))
    y = _scan_output(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (y, h) if return_last_state else y


def _need(kernel, name: str):
    if kernel is None:
        raise RuntimeError(f"the {name} kernel is not importable here; ssm_ops.decide_mamba only plans it where it is "
                           "(launch/build_kernels.sh)")
    return kernel


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   backend: str = "reference", reset: torch.Tensor | None = None):
    """The selective scan by ``backend`` (a ``MambaPlan.scan``: "mamba-ssm", "scan-reset" with ``reset``, or
    "reference", ``selective_scan_ref``); no decision here. The kernels want delta, z and variable B/C in u's dtype,
    and A, D, delta_bias in fp32 (RMSNorm outputs can come out fp32 under autocast or with fp32 norm weights)."""
    if backend != "reference":
        dt = u.dtype
        args = (u, delta.to(dt), A.float(), B.to(dt).contiguous(), C.to(dt).contiguous(),
                None if D is None else D.float(), None if z is None else z.to(dt),
                None if delta_bias is None else delta_bias.float(), delta_softplus)
        if backend == "scan-reset":
            return _ScanKernelFn.apply(_need(_scan_reset_ext, "jambatrain_scan_reset_cuda"), *args, reset)
        assert reset is None, "the mamba-ssm scan has no document resets: plan scan-reset"
        return _need(_selective_scan_cuda, "mamba-ssm selective scan")(
            *args[:6], z=args[6], delta_bias=args[7], delta_softplus=delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              reset=reset)


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "silu"):
    """Depthwise causal conv. x: (b, d, l); weight: (d, k)."""
    k = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def causal_conv1d_doc_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reset: torch.Tensor,
                          activation: str | None = "silu") -> torch.Tensor:
    """Causal depthwise conv over packed documents: tap j of position t is dropped when a document starts in
    (t-j, t]. x: (b, d, l), any strides; weight: (d, k); reset: bool (b, l), True where a document starts."""
    b, d, L = x.shape
    k = weight.shape[-1]
    doc = torch.cumsum(reset.long(), dim=1)  # document index of each position
    out = x.new_zeros(b, d, L) if bias is None else bias.view(1, d, 1).expand(b, d, L).to(x.dtype)
    for j in range(k):  # j = how far back; tap k-1 is the current token
        shifted = F.pad(x, (j, 0))[..., :L]
        same = F.pad(doc, (j, 0), value=-1)[:, :L] == doc
        out = out + shifted * same[:, None, :].to(x.dtype) * weight[:, k - 1 - j, None].to(x.dtype)
    return F.silu(out) if activation == "silu" else out


def causal_conv1d_doc(x, weight, bias, reset, activation: str | None = "silu", compiled: bool = True):
    """``causal_conv1d_doc_ref``, compiled by Inductor into one kernel each way on CUDA (causal-conv1d's own
    document support, ``seq_idx``, needs channel-last inputs, which the Mamba kernel layout does not have)."""
    fn = maybe_compiled(causal_conv1d_doc_ref, compiled and x.is_cuda)
    return fn(x, weight, bias, reset, activation)


def causal_conv1d(x, weight, bias, activation: str | None = "silu", backend: str = "reference"):
    """The causal depthwise conv by ``backend`` (a ``MambaPlan.conv`` without resets: "causal-conv1d" or
    "reference"); no decision here."""
    if backend == "causal-conv1d":
        # x may have stride(-1) == 1 (any batch/channel strides) or be channel-last (stride(1) == 1): the kernel
        # has a path for each. Its stride(-1) == 1 backward reads past the end of the sequence when the length is
        # not a multiple of its 16-byte vector (seen in causal-conv1d 1.7.0: wrong dx in the last width-1
        # positions): such inputs go through the channel-last path instead. Weight and bias share one dtype.
        if x.stride(1) != 1 and (x.shape[-1] * x.element_size()) % 16:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return _need(_causal_conv1d_cuda, "causal-conv1d")(x, weight, None if bias is None else bias.to(weight.dtype),
                                                           activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)
