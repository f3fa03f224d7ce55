"""FP8 training of the model's GEMMs (``model.fp8``), as a model converter applied after the model is built.

Built on torchao's float8 training (``torchao.float8``: dynamic scaling, the ``tensorwise`` and ``rowwise``
recipes, ``torch._scaled_mm``) for the projections, and torchao's rowwise FP8 grouped GEMM
(``torchao.prototype.moe_training``, on ``torch._scaled_grouped_mm``) for the stacked experts: no scaling code of
our own. Scales are computed from the live tensors every step (dynamic scaling): there is no amax history or
scale state, so a checkpoint holds the same bf16 weights with or without FP8, resume and ``export_hf`` need
nothing more, and a run can switch FP8 on or off at a resume.

``plan`` is the one decision of which GEMMs run FP8: ``convert`` swaps exactly those, and the start-up report
(``models/fast_paths.py``) prints its summary. It needs no GPU and no torchao (tests run it on a meta model).

What stays bf16, and why (each with its share of the model's forward GEMM FLOPs in the report):
  router            top-k routing flips on small logit errors; E (16) outputs, a negligible GEMM
  x_proj, dt_proj   narrow (r + 2n and r = hidden/16 wide) GEMMs feeding the scan's dt (through softplus and exp),
                    B and C, the precision-critical inputs of the recurrence
  lm_head           the logits and the loss; the common practice (torchtitan, Transformer Engine recipes) keeps
                    the output projection in bf16
  any projection whose widths are not multiples of 16 (torch._scaled_mm's requirement)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

# module name suffix -> why that projection stays bf16
KEEP_BF16 = {
    "router": "top-k routing flips on small logit errors",
    "x_proj": "feeds the scan's dt, B, C",
    "dt_proj": "the scan's step size, through softplus and exp",
    "lm_head": "the logits and the loss",
}
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm89) and Hopper (sm90); measured on Hopper only


@dataclass
class Entry:
    name: str
    kind: str  # "linear" | "experts"
    flops: int  # forward GEMM FLOPs per token
    reason: str | None = None  # None: runs FP8


@dataclass
class Float8Plan:
    recipe: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def fp8(self) -> list[Entry]:
        return [e for e in self.entries if e.reason is None]

    @property
    def bf16(self) -> list[Entry]:
        return [e for e in self.entries if e.reason is not None]

    def linears(self) -> set[str]:
        return {e.name for e in self.fp8 if e.kind == "linear"}

    def experts(self) -> set[str]:
        return {e.name for e in self.fp8 if e.kind == "experts"}

    def share(self, entries) -> float:
        total = sum(e.flops for e in self.entries)
        return sum(e.flops for e in entries) / total if total else 0.0

    def by_class(self, fp8: bool) -> dict[str, float]:
        """GEMM FLOP share per projection class (the name's last part: in_proj, q_proj, experts...)."""
        out: dict[str, float] = {}
        for e in (self.fp8 if fp8 else self.bf16):
            cls = e.name.rsplit(".", 1)[-1] if e.kind == "linear" else "experts"
            out[cls] = out.get(cls, 0.0) + self.share([e])
        return out

    def summary(self) -> str:
        if self.recipe == "none":
            return "off"
        fp8 = ", ".join(f"{k} {v:.1%}" for k, v in self.by_class(True).items())
        why = self.reasons()
        bf16 = ", ".join(f"{k} {v:.1%} ({why[k]})" for k, v in self.by_class(False).items())
        return (f"{self.recipe}: {len(self.linears())} linears + {len(self.experts())} expert stacks in FP8 "
                f"({self.share(self.fp8):.1%} of forward GEMM FLOPs: {fp8}); bf16: {bf16 or 'none'}")

    def reasons(self) -> dict[str, str]:
        """Why each bf16 class stays bf16 (one line each)."""
        return {e.name.rsplit(".", 1)[-1] if e.kind == "linear" else "experts": e.reason for e in self.bf16}


def plan(model: nn.Module, recipe: str, experts: bool = True) -> Float8Plan:
    """Which GEMMs of ``model`` run FP8 under ``recipe`` (any device, meta included)."""
    from ..models.moe import MoE

    p = Float8Plan(str(recipe))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            reason = KEEP_BF16.get(name.rsplit(".", 1)[-1])
            if reason is None and (m.in_features % 16 or m.out_features % 16):
                reason = f"widths {m.in_features}x{m.out_features} not multiples of 16"
            p.entries.append(Entry(name, "linear", 2 * m.in_features * m.out_features, reason))
        elif isinstance(m, MoE):
            E, f, h = getattr(m.w_gate, "ds_shape", m.w_gate.shape)
            reason = None
            if not experts:
                reason = "model.fp8_experts=false, the default: measured slower, docs/benchmarks.md"
            elif f % 16 or h % 16:
                reason = f"expert widths {h}x{f} not multiples of 16"
            p.entries.append(Entry(name, "experts", 3 * 2 * h * f * m.top_k, reason))
    if str(recipe) == "none":
        for e in p.entries:
            e.reason = e.reason or "model.fp8=none"
    return p


def plan_for_config(cfg) -> Float8Plan:
    """``plan`` of the model ``cfg`` builds (on the meta device: no memory)."""
    from ..models.jamba import JambaLM

    with torch.device("meta"):
        model = JambaLM(cfg)
    return plan(model, cfg.fp8, cfg.fp8_experts)


def torchao_problem() -> str | None:
    try:
        import torchao.float8  # noqa: F401
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm  # noqa: F401 - experts
    except Exception as e:  # noqa: BLE001 - ImportError, or a torch/torchao mismatch at import
        return (f"model.fp8 needs torchao's float8 training (pip install 'jambatrain[fp8]'; torchao 0.17 for "
                f"torch 2.11), which does not import here: {type(e).__name__}: {e}")
    return None


def problems(recipe: str, device_type: str, precision: str, device_index: int | None = None) -> list[str]:
    """Why ``model.fp8=recipe`` cannot run on this device, each with the fix; empty when it can (or is off)."""
    if str(recipe) == "none":
        return []
    off = "; or set model.fp8=none"
    if device_type != "cuda":
        return [f"model.fp8={recipe} needs a CUDA GPU with float8 tensor cores (Hopper H100/H200, sm90); this run "
                f"is on {device_type}{off}"]
    p = []
    cap = torch.cuda.get_device_capability(device_index)
    if cap < MIN_CAPABILITY:
        p.append(f"model.fp8={recipe} needs float8 tensor cores (sm89+, Hopper sm90 measured); "
                 f"{torch.cuda.get_device_name(device_index)} is sm{cap[0]}{cap[1]}{off}")
    if precision != "bf16":
        p.append(f"model.fp8={recipe} needs parallel.precision=bf16 (the FP8 GEMMs take and return bf16), got "
                 f"{precision}{off}")
    err = torchao_problem()
    if err:
        p.append(err + off)
    return p


def convert(model: nn.Module, cfg) -> Float8Plan:
    """Swap the projections ``plan`` selects for torchao ``Float8Linear``s (same parameters, so optimizer state,
    checkpoints and ZeRO partitioning see the same tensors) and switch the selected MoE layers to the FP8 grouped
    GEMM. Call after the model is built and initialised, before the optimizer / DeepSpeed engine is made."""
    p = plan(model, cfg.fp8, cfg.fp8_experts)
    if p.recipe == "none":
        return p
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = p.linears()
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(p.recipe),
                               module_filter_fn=lambda m, fqn: fqn in names)
    for name in p.experts():
        model.get_submodule(name).fp8 = True
    if cfg.compile_elementwise:  # fuse each GEMM's amax/scale/cast passes (eager: several passes per operand)
        import types

        from torchao.float8.float8_linear import Float8Linear

        dyn = torch._dynamo.config
        for k in ("recompile_limit", "cache_size_limit"):  # one compiled GEMM function for every shape and layout
            if hasattr(dyn, k):
                setattr(dyn, k, max(getattr(dyn, k), 64))
        for m in model.modules():
            if isinstance(m, Float8Linear):
                m.forward = types.MethodType(_compiled_forward, m)
                m.jt_compiled = True
    return p


def _mm(a, b, mm_config, config):
    """a @ b through torchao's float8 matmul (dynamic scaling of both operands, the recipe's backward)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args.apply(a, b, mm_config, config)


_mm_compiled = None


def _mm_fn(compiled: bool):
    global _mm_compiled
    if not compiled:
        return _mm
    if _mm_compiled is None:
        _mm_compiled = torch.compile(_mm)
    return _mm_compiled


def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Float8Linear.forward`` with its matmul (casts included) compiled: one compiled function shared by every
    converted projection, so Inductor fuses each operand's amax, scale and cast into a kernel or two."""
    out = _mm_fn(True)(x, self.weight.t(), self.linear_mm_config, self.config)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def float8_weight_mm(proj: nn.Module, x_t: torch.Tensor) -> torch.Tensor:
    """``proj.weight @ x_t`` for a torchao ``Float8Linear``: its own float8 matmul with the operands in the other
    order (weight as the row-major left operand, the (features, tokens) activations as the column-major right
    one: the same roles and per-row / per-token scalings as in ``proj(x)``), so the (out, tokens) result keeps the
    Mamba kernel layout."""
    return _mm_fn(getattr(proj, "jt_compiled", False))(proj.weight, x_t, proj.linear_mm_config, proj.config)


def grouped_mm_fp8(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) row-major @ b_t (E, K, N) column-major per group, groups of rows ending at ``offs`` (multiples of
    16): torchao's differentiable rowwise FP8 grouped GEMM (``torch._scaled_grouped_mm``), bf16 out."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    return _to_fp8_rowwise_then_scaled_grouped_mm(a, b_t, offs, torch.bfloat16, torch.float8_e4m3fn, False)
