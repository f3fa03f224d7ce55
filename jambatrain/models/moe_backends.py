"""Expert computation: one decision of the backend (``decide``), and the backends behind one signature.

All backends are dropless and compute, for every (token t, slot j) assignment to expert e = experts[t, j],
    y_t += weights[t, j] * (silu(x_t W_gate[e]^T) * (x_t W_up[e]^T)) @ W_down[e]
with the stacked (E, ffn, hidden) weights of ``moe.MoE``. Each backend is three pieces:

  permute     the T*k assignments gathered into rows grouped by expert, plus tokens per expert (E,)
  expert_mlp  the SwiGLU experts on rows already grouped by expert (counts given)
  unpermute   rows back to tokens, weighted by the router probabilities and summed over the k slots

Without expert parallelism a MoE layer is ``unpermute(expert_mlp(permute(x)))``. With it, the grouped rows are
sent to the ranks that own their experts in between (``jambatrain.parallel.expert_parallel.exchange``), which
runs ``expert_mlp`` on the local (E/ep, ffn, hidden) block: the same three pieces, so ep = 1 is today's path.

  native      per-expert Python loop (any device/dtype; one host sync for the counts).
  grouped     argsort permutation + three ``torch._grouped_mm`` calls (CUTLASS grouped GEMM on Hopper): no host
              sync, no padding. CUDA, bf16, hidden and ffn multiples of 8.
  grouped_fp8 ``grouped``'s permutation with the three GEMMs in FP8 (``model.fp8`` with ``model.fp8_experts``):
              torchao's rowwise FP8 grouped GEMM (``torch._scaled_grouped_mm``, Hopper), each expert's rows padded
              to a multiple of 16 (its requirement) inside the MLP, so expert parallelism exchanges unpadded rows;
              the weight gradients by FP8 or bf16 grouped GEMMs (``model.fp8_expert_wgrad``).
  megablocks  MegaBlocks' dMoE data path (its CUDA sort/histogram and Triton gather/scatter kernels) with the
              grouped GEMM done by ``grouped_gemm`` when installed, else by ``torch._grouped_mm``. Needs the
              megablocks wheel (launch/build_kernels.sh) and what ``grouped`` needs.

``decide`` is the only place that chooses among them: the start-up report (``fast_paths.describe``) and the
layer at run time (``select``) both call it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .fused_ops import silu_mul_ref

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# What `model.moe_impl=auto` prefers on CUDA in bf16 when more than one backend can run (docs/benchmarks.md has
# the measurement); "grouped" is taken when megablocks does not import.
AUTO_CUDA = "megablocks"

REPORT_NAMES = {"native": "native loop", "grouped": "grouped GEMM", "megablocks": "megablocks",
                "grouped_fp8": "FP8 grouped GEMM (torchao rowwise)"}


@dataclass(frozen=True)
class MoEPath:
    backend: str  # native | grouped | megablocks
    error: str | None = None  # an implementation asked for by name that cannot run here
    warning: str | None = None  # a slow path a CUDA run would take, with its fix


def decide(impl: str, device_type: str, bf16: bool, hidden: int, ffn: int, fp8: bool = False) -> MoEPath:
    """The MoE backend for ``model.moe_impl=impl`` on a ``device_type`` run whose expert inputs and weights are
    bf16 (``bf16``) with the given widths; ``fp8``: the FP8 converter selected this layer's experts."""
    fast_ok = (device_type == "cuda" and bf16 and hidden % 8 == 0 and ffn % 8 == 0 and grouped_gemm_available())
    if fp8:
        if impl in ("auto", "grouped") and fast_ok and hidden % 16 == 0 and ffn % 16 == 0:
            return MoEPath("grouped_fp8")
        return MoEPath("native", error=f"FP8 experts (model.fp8 with model.fp8_experts) run torchao's FP8 grouped GEMM "
                                       f"only: they need model.moe_impl=auto or grouped (now {impl}), CUDA, bf16 and "
                                       f"widths that are multiples of 16 (now {hidden}, {ffn}); or set "
                                       "model.fp8_experts=false")
    if impl == "auto":
        if fast_ok:
            return MoEPath("megablocks" if AUTO_CUDA == "megablocks" and megablocks_available() else "grouped")
        warning = None
        if device_type == "cuda":
            warning = ("MoE experts run the per-expert loop: the grouped-GEMM backends need parallel.precision=bf16, "
                       f"model.hidden_size and model.intermediate_size multiples of 8 (now {hidden}, {ffn}) and "
                       "megablocks (launch/build_kernels.sh) or torch's grouped GEMM on sm80+")
        return MoEPath("native", warning=warning)
    if impl == "native":
        return MoEPath("native")
    if impl in ("grouped", "megablocks"):
        if fast_ok and (impl == "grouped" or megablocks_available()):
            return MoEPath(impl)
        need = "megablocks (launch/build_kernels.sh)" if impl == "megablocks" else "torch grouped GEMM on sm80+"
        return MoEPath("native", error=f"model.moe_impl={impl} needs CUDA, parallel.precision=bf16, hidden and ffn "
                                       f"widths that are multiples of 8 and {need}; use model.moe_impl=auto")
    return MoEPath("native", error=f"model.moe_impl={impl!r}: choose auto, native, grouped or megablocks")


def decide_for(impl: str, x: torch.Tensor, w_gate: torch.Tensor, fp8: bool = False) -> MoEPath:
    """``decide`` for the tensors a layer actually holds at run time."""
    bf16 = x.dtype == torch.bfloat16 and w_gate.dtype == torch.bfloat16
    return decide(impl, x.device.type, bf16, w_gate.shape[2], w_gate.shape[1], fp8)


# ---------------------------------------------------------------- the three pieces, per backend
@dataclass
class Permuted:
    rows: torch.Tensor  # (T*k, hidden) assignments grouped by expert
    tokens_per_expert: torch.Tensor  # (E,) int
    undo: tuple  # what unpermute needs


def _permute_torch(x: torch.Tensor, routing) -> Permuted:
    k = routing.experts.shape[1]
    order = torch.argsort(routing.experts.flatten(), stable=True)
    token_of = order // k  # source token of each sorted assignment
    # gather; its backward is an index_add_, not a sort
    return Permuted(x.index_select(0, token_of), routing.counts, (order, token_of))


def _unpermute_torch(x: torch.Tensor, rows: torch.Tensor, routing, undo) -> torch.Tensor:
    order, token_of = undo
    rows = rows * routing.weights.flatten().index_select(0, order)[:, None].to(rows.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, rows)


def _mlp_native(xs, tokens_per_expert, w_gate, w_up, w_down, act=silu_mul_ref, counts: list[int] | None = None):
    counts = tokens_per_expert.tolist() if counts is None else counts
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            xe = xs[start:start + c]
            outs.append(act(xe @ w_gate[e].t(), xe @ w_up[e].t()) @ w_down[e])
        start += c
    if not outs:  # no rows (a rank that received no tokens): still a graph to every weight, so each gets a grad
        return act(xs @ w_gate[0].t(), xs @ w_up[0].t()) @ w_down[0]
    return torch.cat(outs, dim=0)


def _mlp_grouped(xs, tokens_per_expert, w_gate, w_up, w_down, act=silu_mul_ref, counts=None):
    offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    h = act(_grouped_mm(xs, w_gate.transpose(1, 2), offs=offs), _grouped_mm(xs, w_up.transpose(1, 2), offs=offs))
    return _grouped_mm(h, w_down, offs=offs)


def _pad_groups(tokens_per_expert: torch.Tensor, rows: int, align: int = 16):
    """Where each of ``rows`` expert-grouped rows goes when every expert's group is padded to a multiple of
    ``align`` rows, without a host sync: (destination row of each row (rows,), padded group end offsets (E,) int32,
    padded row count). The padded count is the static bound rows + align * E, the last group taking the slack, so
    every row of the padded buffer lies in a group (zero rows in, zero rows out, no uninitialised output)."""
    E = tokens_per_expert.shape[0]
    tpe = tokens_per_expert.to(torch.int64)
    padded = (tpe + align - 1) // align * align
    total = (rows + align * E + align - 1) // align * align
    pend = torch.cumsum(padded, 0)
    pend[-1] = total
    shift = (pend - padded) - (torch.cumsum(tpe, 0) - tpe)  # padded start - start, per expert
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=tpe.device), tpe, output_size=rows)
    dest = torch.arange(rows, device=tpe.device) + shift[expert_of_row]
    return dest, pend.to(torch.int32), total


def _mlp_grouped_fp8(xs, tokens_per_expert, w_gate, w_up, w_down, act=silu_mul_ref, counts=None):
    from ..quantization.float8 import grouped_mm_fp8

    dest, offs, total = _pad_groups(tokens_per_expert, xs.shape[0])
    xp = xs.new_zeros(total, xs.shape[1]).index_copy(0, dest, xs)
    # one autograd Function per GEMM (float8._GroupedMMFP8): the stacks' FP8 casts (forward and backward) made once
    # per optimizer step under model.fp8_cache_weights, the weight gradients in the stacks' stored layout, in FP8 or
    # bf16 (model.fp8_expert_wgrad)
    h = act(grouped_mm_fp8(xp, w_gate, offs), grouped_mm_fp8(xp, w_up, offs))
    return grouped_mm_fp8(h, w_down, offs, down=True).index_select(0, dest)


def _mlp_megablocks(xs, tokens_per_expert, w_gate, w_up, w_down, act=silu_mul_ref, counts=None):
    _, gmm = _megablocks()
    if counts is not None:  # already on the host (expert parallelism synced them): no second device->host copy
        tokens_per_expert = torch.tensor(counts, dtype=torch.int64)
    g = gmm(xs, w_gate, tokens_per_expert, trans_b=True)
    u = gmm(xs, w_up, tokens_per_expert, trans_b=True)
    return gmm(act(g, u), w_down, tokens_per_expert)


def _permute_megablocks(x: torch.Tensor, routing) -> Permuted:
    ops, _ = _megablocks()
    E = routing.counts.shape[0]
    k = routing.experts.shape[1]
    top = routing.experts.flatten().int()
    with torch.no_grad():
        bin_ids, indices = ops.sort(top, max(1, (E - 1).bit_length()))
        tokens_per_expert = ops.histogram(top, E)
        bins = ops.inclusive_cumsum(tokens_per_expert, 0)
        bins = bins.view(1) if not bins.dim() else bins
    return Permuted(ops.gather(x, indices, bin_ids, bins, k), tokens_per_expert, (indices, bin_ids, bins, k))


def _unpermute_megablocks(x, rows, routing, undo):
    ops, _ = _megablocks()
    indices, bin_ids, bins, k = undo
    return ops.scatter(rows, indices, bin_ids, routing.weights.flatten().to(x.dtype), bins, k)


@dataclass(frozen=True)
class Backend:
    name: str
    permute: Callable
    expert_mlp: Callable
    unpermute: Callable

    def __call__(self, x, routing, w_gate, w_up, w_down, act=silu_mul_ref, exchange=None) -> torch.Tensor:
        """y for tokens x (T, hidden); ``exchange`` (expert parallelism) runs the experts on their owner ranks."""
        p = self.permute(x, routing)
        if exchange is None:
            rows = self.expert_mlp(p.rows, p.tokens_per_expert, w_gate, w_up, w_down, act)
        else:
            rows = exchange(p.rows, p.tokens_per_expert,
                            lambda xs, tpe, counts: self.expert_mlp(xs, tpe, w_gate, w_up, w_down, act, counts=counts))
        return self.unpermute(x, rows, routing, p.undo)


BACKENDS = {
    "native": Backend("native", _permute_torch, _mlp_native, _unpermute_torch),
    "grouped": Backend("grouped", _permute_torch, _mlp_grouped, _unpermute_torch),
    "megablocks": Backend("megablocks", _permute_megablocks, _mlp_megablocks, _unpermute_megablocks),
    "grouped_fp8": Backend("grouped_fp8", _permute_torch, _mlp_grouped_fp8, _unpermute_torch),
}
experts_forward_native = BACKENDS["native"]
experts_forward_grouped = BACKENDS["grouped"]
experts_forward_megablocks = BACKENDS["megablocks"]


def select(impl: str, x: torch.Tensor, w_gate: torch.Tensor, fp8: bool = False) -> Backend:
    """The backend ``decide`` picks for these tensors; an impossible explicit choice raises with the fix."""
    path = decide_for(impl, x, w_gate, fp8)
    if path.error:
        raise RuntimeError(path.error)
    return BACKENDS[path.backend]


# ---------------------------------------------------------------- availability
def grouped_gemm_available(device_index: int | None = None) -> bool:
    """torch has a grouped GEMM and the GPU (``device_index``, else the current one, if any is visible) is sm80+."""
    if _grouped_mm is None:
        return False
    if not torch.cuda.is_available():
        return True  # nothing to check the architecture of; the tensors' device decides later
    return _capability(torch.cuda.current_device() if device_index is None else device_index) >= (8, 0)


def grouped_supported(x: torch.Tensor, w_gate: torch.Tensor | None = None) -> bool:
    """Whether ``grouped`` can run on these tensors (``decide`` with moe_impl=grouped finds no error)."""
    w = w_gate if w_gate is not None else x.new_empty((1, 8, 8))
    return decide_for("grouped", x, w).error is None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_mb = None  # (megablocks.ops, gmm) once imported; False if the import failed


def _megablocks():
    global _mb
    if _mb is None:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from megablocks import ops as mb_ops  # noqa: F401 - needs megablocks_ops (CUDA) and stk
            try:
                from grouped_gemm import ops as gg_ops

                def gmm(a, b, batch_sizes, trans_b=False):
                    return gg_ops.gmm(a, b, batch_sizes.cpu(), trans_b=trans_b)
            except ImportError:
                def gmm(a, b, batch_sizes, trans_b=False):
                    offs = torch.cumsum(batch_sizes.to(a.device), 0, dtype=torch.int32)
                    return _grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=offs)
            _mb = (mb_ops, gmm)
        except Exception:  # noqa: BLE001 - ImportError or a CUDA/triton error at import
            _mb = False
    return _mb or None


def megablocks_available() -> bool:
    return _megablocks() is not None
