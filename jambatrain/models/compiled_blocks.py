"""Compiled block regions (``model.compile_blocks``): ``torch.compile`` around everything of a block but its custom
kernels, so Inductor fuses the elementwise work around each GEMM with the GEMM's neighbours.

Under FP8 (``model.fp8``) every converted GEMM casts its input (amax, scale, cast) and, in backward, its
grad-output and the transposed copies its backward GEMMs take. Compiled one GEMM at a time those are kernels of
their own; compiled with their producers they fuse into them: the RMSNorm that makes the q/k/v (or gate/up, or
in_proj) input computes its amax and FP8 copy in the same pass, q/k/v and gate/up share one cast of their common
input, and the residual add's backward hands out the grad-output cast. torchtitan compiles each transformer block
around torchao's float8 the same way; here the block holds custom CUDA kernels (the selective scan, causal-conv1d,
flash / flex attention, the MoE backends), which stay eager between the regions instead of being registered as
custom ops: the regions are

    Mamba mixer      input RMSNorm + in_proj (the kernel layout's ``weight_mm``)  |  out_proj + residual add
    attention        input RMSNorm + q/k/v                                        |  o_proj + residual add
    dense FFN        pre-FFN RMSNorm + gate/up + SwiGLU + down + residual add (the whole sub-layer)
    eager            conv, x_proj / dt_proj and scan; SDPA / flex; the MoE FFN (router, experts); short-conv mixers

Inside a region RMSNorm runs its eager formula (not mamba-ssm's Triton kernel) and the SwiGLU product its
reference (Inductor fuses both); FP8 linears cast their weights in the region (no step cache: the cache reads
storage pointers, which do not trace; ``float8.cache_decision``). Each region is one function compiled once per
process with ``fullgraph=True`` and shared by every block (parameters are graph inputs), so there is one compiled
graph per region kind and shape. Activation checkpointing wraps the regions (recompute re-runs the compiled
forward); the regions hold no DeepSpeed hook under ZeRO-1/2 (its hooks run on the gradients, after the compiled
backward). ``decide`` is the one decision: ``apply`` executes it and the start-up report prints it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

REGIONS = ("mamba: norm+in_proj, out_proj+residual", "attention: norm+q/k/v, o_proj+residual",
           "dense FFN: norm+SwiGLU+residual")


@dataclass(frozen=True)
class BlocksPlan:
    on: bool
    why: str  # the start-up report's words
    warning: str | None = None  # asked for but off here, with the reason
    asked: bool = False  # set to true, or auto with FP8: the start-up report prints the verdict

    def describe(self) -> str:
        return self.why


def decide(compile_blocks: bool | None, device_type: str, zero_stage: int = 0, cp: int = 1,
           fp8: str = "none") -> BlocksPlan:
    """Whether ``model.compile_blocks`` compiles the block regions on this run. ``None`` (auto): with ``model.fp8``
    (the regions fuse its casts: measured faster, docs/benchmarks.md), not in bf16 (measured no faster)."""
    auto = compile_blocks is None
    if not (str(fp8) != "none" if auto else compile_blocks):
        return BlocksPlan(False, "off")
    how = "auto with model.fp8: " if auto else ""
    off = None
    if device_type != "cuda":
        return BlocksPlan(False, f"off on {device_type} (compiled regions are CUDA-only; eager ops)", asked=True)
    if zero_stage >= 3:
        off = ("ZeRO-3 gathers and frees each module's parameters through forward hooks inside the regions, which "
               "dynamo would trace")
    elif cp > 1:
        off = f"context parallel {cp} runs collectives inside the mixers"
    if off:
        warning = None if auto else (f"model.compile_blocks=true is switched off: {off}; the blocks run eager (set "
                                     "model.compile_blocks=false to silence this)")
        return BlocksPlan(False, f"{how}off: {off}", warning, asked=True)
    return BlocksPlan(True, how + "compiled regions (" + "; ".join(REGIONS) + "; scan, conv, attention kernel and "
                            "MoE eager)", asked=True)


def apply(model: torch.nn.Module, plan: BlocksPlan) -> None:
    """Switch every ``JambaBlock`` of ``model`` to its compiled regions when ``plan.on`` (call after
    ``float8.convert``, before the DeepSpeed engine is built). The FP8 linears inside the regions leave the weight
    cache and their own per-GEMM compile: the region traces and casts them."""
    from ..quantization.float8 import uses_compiled_region
    from .fused_ops import raise_recompile_limits
    from .jamba import JambaBlock

    if not plan.on:
        return
    raise_recompile_limits(64, 1024)  # one graph per region kind and shape (training, eval, a last short batch ...)
    for block in model.modules():
        if isinstance(block, JambaBlock):
            block.compiled_regions = True
            for m in block.region_modules():
                for sub in m.modules():
                    uses_compiled_region(sub)


# ------------------------------------------------------------------------------------------------ the regions
def mamba_in(norm, mixer, x: torch.Tensor, kernel_layout: bool):
    """(b, l, h) -> u, z (b, d, l): the input RMSNorm and in_proj."""
    return mixer._in_proj(norm(x), kernel_layout)


def mamba_out(mixer, x: torch.Tensor, y: torch.Tensor, kernel_layout: bool) -> torch.Tensor:
    """x + out_proj(y): y (b, d, l) the scan's output, x (b, l, h) the block input."""
    return x + mixer._out_proj(y, kernel_layout)


def attention_in(norm, attn, x: torch.Tensor):
    return attn.qkv(norm(x))


def attention_out(attn, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return x + attn.out(o)


def dense_ffn(norm, ffn, x: torch.Tensor) -> torch.Tensor:
    return x + ffn(norm(x))


_compiled: dict[Callable, Callable] = {}


def region(fn: Callable) -> Callable:
    """``fn`` compiled (once per process, one graph: ``fullgraph``), shared by every block."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True)
    return _compiled[fn]
