"""Expert-computation backends behind one signature: fn(x, routing, w_gate, w_up, w_down) -> y.

All backends are dropless and compute, for every (token t, slot j) assignment to expert e = experts[t, j],
    y_t += weights[t, j] * (silu(x_t W_gate[e]^T) * (x_t W_up[e]^T)) @ W_down[e]
with the stacked (E, ffn, hidden) weights of ``moe.MoE``.

  native   per-expert Python loop over the sorted assignments (any device/dtype; one host sync for the counts).
  grouped  sort-by-expert permutation + three ``torch._grouped_mm`` calls (CUTLASS grouped GEMM on Hopper):
           no host sync, no padding. CUDA, bf16, hidden and ffn multiples of 8.
  megablocks  MegaBlocks' dMoE "grouped" data path (its CUDA sort/histogram and Triton gather/scatter
           kernels) with the grouped GEMM done by ``grouped_gemm`` when installed, else by
           ``torch._grouped_mm``. Needs the megablocks wheel (launch/build_kernels.sh).

``select('auto', x)`` takes ``AUTO_CUDA`` (the backend that measured fastest on an H200, docs/benchmarks.md;
megablocks, else grouped when megablocks does not import) for bf16 CUDA tensors, and ``native`` otherwise.
"""
from __future__ import annotations

import functools

import torch

from .fused_ops import silu_mul_ref
from .moe import experts_forward_native

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# The default for moe_impl=auto on CUDA in bf16, chosen with bench/throughput.py on an H200 (docs/benchmarks.md):
# MegaBlocks' data path was ~2% faster per training step than "grouped" (231.8/232.5 vs 237.4/236.7 ms, 1.3b with
# 16 experts); "grouped" is taken when megablocks does not import.
AUTO_CUDA = "megablocks"


def _sort_by_expert(routing):
    """Permutation of the T*k assignments sorted by expert, their source tokens, and int32 end offsets."""
    T, k = routing.experts.shape
    order = torch.argsort(routing.experts.flatten(), stable=True)
    offs = torch.cumsum(routing.counts, 0, dtype=torch.int32)
    return order, order // k, offs


def experts_forward_grouped(x: torch.Tensor, routing, w_gate, w_up, w_down, act=silu_mul_ref) -> torch.Tensor:
    """Dropless grouped-GEMM experts: gather rows by expert, 3 grouped GEMMs, weighted scatter-add back."""
    order, token_of, offs = _sort_by_expert(routing)
    xs = x.index_select(0, token_of)  # (T*k, hidden), grouped by expert; backward is an index_add_, not a sort
    g = _grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)  # (T*k, ffn)
    u = _grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    h = act(g, u)
    y = _grouped_mm(h, w_down, offs=offs)  # (T*k, hidden)
    y = y * routing.weights.flatten().index_select(0, order)[:, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, y)


def grouped_gemm_available(device_index: int | None = None) -> bool:
    """torch has a grouped GEMM and the GPU (``device_index``, else the current one, if any is visible) is sm80+."""
    if _grouped_mm is None:
        return False
    if not torch.cuda.is_available():
        return True  # nothing to check the architecture of; the tensors' device decides later
    return _capability(torch.cuda.current_device() if device_index is None else device_index) >= (8, 0)


def grouped_supported(x: torch.Tensor, w_gate: torch.Tensor | None = None) -> bool:
    if not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if w_gate is not None and (w_gate.dtype != torch.bfloat16 or w_gate.shape[1] % 8 or w_gate.shape[2] % 8):
        return False
    return grouped_gemm_available(x.device.index)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# ---------------------------------------------------------------- MegaBlocks
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
                    offs = torch.cumsum(batch_sizes, 0, dtype=torch.int32)
                    return _grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=offs)
            _mb = (mb_ops, gmm)
        except Exception:  # noqa: BLE001 - ImportError or a CUDA/triton error at import
            _mb = False
    return _mb or None


def megablocks_available() -> bool:
    return _megablocks() is not None


def experts_forward_megablocks(x: torch.Tensor, routing, w_gate, w_up, w_down, act=silu_mul_ref) -> torch.Tensor:
    """MegaBlocks ``ParallelDroplessMLP.grouped_forward_once`` with our weight layout."""
    mb = _megablocks()
    if mb is None:
        raise RuntimeError("model.moe_impl=megablocks but megablocks does not import (build it with "
                           "launch/build_kernels.sh, or use model.moe_impl=auto)")
    ops, gmm = mb
    E = w_gate.shape[0]
    k = routing.experts.shape[1]
    top = routing.experts.flatten().int()
    with torch.no_grad():
        bin_ids, indices = ops.sort(top, max(1, (E - 1).bit_length()))
        tokens_per_expert = ops.histogram(top, E)
        bins = ops.inclusive_cumsum(tokens_per_expert, 0)
        bins = bins.view(1) if not bins.dim() else bins
    xs = ops.gather(x, indices, bin_ids, bins, k)
    g = gmm(xs, w_gate, tokens_per_expert, trans_b=True)
    u = gmm(xs, w_up, tokens_per_expert, trans_b=True)
    h = gmm(act(g, u), w_down, tokens_per_expert)
    return ops.scatter(h, indices, bin_ids, routing.weights.flatten().to(x.dtype), bins, k)


_BACKENDS = {
    "native": experts_forward_native,
    "grouped": experts_forward_grouped,
    "megablocks": experts_forward_megablocks,
}


def select(impl: str, x, w_gate: torch.Tensor | None = None):
    if impl == "auto":
        if grouped_supported(x, w_gate):
            if AUTO_CUDA == "megablocks" and megablocks_available():
                return experts_forward_megablocks
            return experts_forward_grouped
        return experts_forward_native
    if impl == "grouped" and not grouped_supported(x, w_gate):
        raise RuntimeError("model.moe_impl=grouped needs bf16 CUDA tensors on sm80+ and torch._grouped_mm; "
                           "use model.moe_impl=auto or native")
    if impl in _BACKENDS:
        return _BACKENDS[impl]
    raise RuntimeError(f"model.moe_impl={impl!r} is not available: choose auto, native, grouped or megablocks")
