"""FP8 training of the model's GEMMs (``model.fp8``), as a model converter applied after the model is built.

Built on torchao's float8 training (``torchao.float8``: dynamic scaling, the ``tensorwise`` and ``rowwise``
recipes, ``torch._scaled_mm``) for the projections, and torchao's rowwise FP8 grouped GEMM
(``torchao.prototype.moe_training``, on ``torch._scaled_grouped_mm``) for the stacked experts: no scaling code of
our own. Scales are computed from the live tensors every step (dynamic scaling): there is no amax history or
scale state, so a checkpoint holds the same bf16 weights with or without FP8, resume and ``export_hf`` need
nothing more, and a run can switch FP8 on or off at a resume. The weights' casts are made once per optimizer step
and reused by the step's micro batches (``WeightCache``, ``model.fp8_cache_weights``; ``cache_decision`` says where
it applies); the cache is never saved. The experts' weight gradients run FP8 or bf16 grouped GEMMs
(``model.fp8_expert_wgrad``, ``expert_wgrad_decision``).

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
    unmatched: list[str] = field(default_factory=list)  # model.fp8_filter_fqns entries that name no GEMM here

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


def plan(model: nn.Module, recipe: str, experts: bool = True, filter_fqns=()) -> Float8Plan:
    """Which GEMMs of ``model`` run FP8 under ``recipe`` (any device, meta included). ``filter_fqns``
    (``model.fp8_filter_fqns``): name parts whose projections and expert stacks stay bf16."""
    from ..models.moe import MoE

    p = Float8Plan(str(recipe))
    matched = set()

    def filtered(name: str) -> str | None:
        hits = [f for f in filter_fqns if f in name]
        matched.update(hits)
        return f"model.fp8_filter_fqns ({hits[0]})" if hits else None

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            reason = KEEP_BF16.get(name.rsplit(".", 1)[-1])
            if reason is None and (m.in_features % 16 or m.out_features % 16):
                reason = f"widths {m.in_features}x{m.out_features} not multiples of 16"
            reason = reason or filtered(name)
            p.entries.append(Entry(name, "linear", 2 * m.in_features * m.out_features, reason))
        elif isinstance(m, MoE):
            E, f, h = getattr(m.w_gate, "ds_shape", m.w_gate.shape)
            reason = None
            if not experts:
                reason = "model.fp8_experts=false, the default: measured slower, docs/benchmarks.md"
            elif f % 16 or h % 16:
                reason = f"expert widths {h}x{f} not multiples of 16"
            reason = reason or filtered(name)
            p.entries.append(Entry(name, "experts", 3 * 2 * h * f * m.top_k, reason))
    p.unmatched = [f for f in filter_fqns if f not in matched]
    if str(recipe) == "none":
        for e in p.entries:
            e.reason = e.reason or "model.fp8=none"
    return p


def plan_for_config(cfg) -> Float8Plan:
    """``plan`` of the model ``cfg`` builds (on the meta device: no memory)."""
    from ..models.jamba import JambaLM

    with torch.device("meta"):
        model = JambaLM(cfg)
    return plan(model, cfg.fp8, cfg.fp8_experts, cfg.fp8_filter_fqns)


def filter_problems(p: Float8Plan) -> list[str]:
    """A ``model.fp8_filter_fqns`` entry that names no FP8-able GEMM of the model (a typo keeps nothing bf16)."""
    return [f"model.fp8_filter_fqns: {f!r} is in no projection or expert stack name of this model (names look like "
            f"layers.3.mixer.out_proj, layers.1.ffn.down_proj, layers.1.ffn for an MoE layer's experts); fix or "
            f"remove it" for f in p.unmatched] if p.recipe != "none" else []


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


def cache_decision(recipe: str, cache_weights: bool, zero_stage: int = 0,
                   compile_blocks: bool = False) -> tuple[bool, str]:
    """Whether the FP8 weight casts are cached for an optimizer step (``model.fp8_cache_weights``), and the start-up
    report's words for it. The one decision ``convert`` executes and ``models/fast_paths.py`` reports.
    ``compile_blocks``: ``models.compiled_blocks.decide``'s verdict. Then the linears run inside compiled regions
    and cast their weights there (Inductor fuses each weight's amax and cast into the region; the cache reads
    storage pointers, which do not trace, and was no measured speedup): ``compiled_blocks.apply`` detaches them
    from the cache, which then holds only the FP8 expert stacks (their grouped GEMMs stay eager)."""
    if str(recipe) == "none":
        return False, "off"
    cached, why = _cache_decision(recipe, cache_weights, zero_stage)
    if compile_blocks:
        why = ("linear weights cast inside the compiled block regions (model.compile_blocks)"
               + ("; FP8 expert stacks: " + why if cached else ""))
    return cached, why


def _cache_decision(recipe: str, cache_weights: bool, zero_stage: int) -> tuple[bool, str]:
    if not cache_weights:
        return False, "weights re-cast every micro batch (model.fp8_cache_weights=false)"
    if zero_stage >= 3:
        return False, ("weights re-cast every micro batch: ZeRO-3 gathers the parameters per forward, so there is no "
                       "step-long weight to cache")
    if str(recipe) != "tensorwise":
        return False, (f"weights re-cast every micro batch: the {recipe} recipe scales the weight along different "
                       "axes for the forward and the backward GEMM (only tensorwise shares one cast, as torchao's "
                       "FSDP float8 all-gather)")
    return True, "weights cast to FP8 once per optimizer step, reused by every micro batch and recompute"


def expert_wgrad_decision(wgrad: str) -> tuple[str, str]:
    """How the FP8 experts' weight gradients are computed (``model.fp8_expert_wgrad``), and the start-up report's
    words for it. The one decision ``convert`` executes (the stacks' ``jt_fp8_wgrad`` tag) and
    ``models/fast_paths.py`` reports."""
    if str(wgrad) == "bf16":
        return "bf16", ("weight gradients in bf16 (model.fp8_expert_wgrad=bf16: torch._grouped_mm on the bf16 "
                        "operands, no per-group FP8 column casts)")
    if str(wgrad) == "fp8":
        return "fp8", ("weight gradients in FP8 (model.fp8_expert_wgrad=fp8: torchao's per-group column casts, "
                       "then the FP8 grouped GEMM)")
    raise ValueError(f"model.fp8_expert_wgrad={wgrad!r}: choose fp8 or bf16")


def experts_report(cfg, zero_stage: int = 0, ep: int = 1) -> str:
    """The start-up report's words for the FP8 experts (``model.fp8_experts``): the weight-gradient decision, and
    what the weight cache holds for them (two FP8 copies of every local expert stack, forward and backward casts:
    +2 bytes per expert parameter, on top of the bf16 weights)."""
    words = "experts: rowwise FP8 grouped GEMMs, " + expert_wgrad_decision(cfg.fp8_expert_wgrad)[1]
    cached, _ = cache_decision(cfg.fp8, cfg.fp8_cache_weights, zero_stage)
    if cached:
        layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        n = layers * cfg.num_experts // max(ep, 1) * 3 * cfg.hidden_size * cfg.intermediate_size
        words += (f"; the stacks' forward and backward FP8 casts cached per optimizer step: +2 bytes per expert "
                  f"parameter, {2 * n / 2**30:.2f} GiB per GPU")
    return words


def report(cfg, p: Float8Plan, zero_stage: int = 0, ep: int = 1, compile_blocks: bool = False) -> str:
    """The start-up report's FP8 words for ``model.fp8`` (``plan_for_config``'s ``p``): which GEMMs run FP8, how
    their weights are cast (``cache_decision``) and, with FP8 experts, ``experts_report``."""
    words = p.summary() + "; " + cache_decision(cfg.fp8, cfg.fp8_cache_weights, zero_stage, compile_blocks)[1]
    return words + ("; " + experts_report(cfg, zero_stage, ep) if p.experts() else "")


def uses_compiled_region(proj: nn.Module) -> None:
    """A projection ``convert`` swapped that now runs inside a compiled block region (``models/compiled_blocks``):
    the region traces its matmul and casts its weight (no step cache, no per-GEMM compile of its own), as
    ``cache_decision(..., compile_blocks=True)`` reports."""
    if hasattr(proj, "jt_weight_cache"):
        proj.jt_weight_cache = None
        proj.jt_compiled = False


class WeightCache:
    """The FP8 casts of the converted projections' weights, made by torchao's own ``hp_tensor_to_float8_dynamic``
    exactly as its uncached matmul makes them, once per optimizer step: the weights change only at the optimizer
    step, while torchao's matmul re-casts (amax, scale, cast) every weight in every micro batch's forward, again in
    its backward, and again in an activation-checkpoint recompute. The cast is handed to torchao's matmul already in
    FP8 (``matmul_with_hp_or_float8_args`` takes FP8 operands as they are: how its FSDP float8 all-gather runs)
    through ``_UseCast``, whose backward passes the weight gradient to the bf16 weight unchanged, as torchao's own
    cast does: outputs and gradients are the uncached path's, bit for bit.

    The trainer and the bench call ``optimizer_stepped(model)`` after every optimizer step (and after loading
    weights): that drops the casts. It is explicit because the weights' own version counters miss DeepSpeed's
    updates (it writes through ``.data``). A weight whose storage or shape changed since its cast (a parameter
    re-materialised) is re-cast. Never used under ZeRO-3 (``cache_decision``)."""

    def __init__(self):
        self.step = 0
        self.casts = 0  # casts made so far (tests, reports)
        self._casts: dict = {}

    def advance(self) -> None:
        self.step += 1
        self._casts.clear()

    def operand(self, proj: nn.Module, role) -> torch.Tensor:
        """The weight operand of ``proj``'s float8 matmul in ``role`` (``WEIGHT``: ``weight.t()`` as the right
        operand, ``proj(x)``; ``INPUT``: ``weight`` as the left operand, ``float8_weight_mm``), FP8, this step's."""
        from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole

        w = proj.weight
        as_weight = role is GemmInputRole.WEIGHT
        hp = w.t() if as_weight else w
        c = proj.config
        cast = c.cast_config_weight if as_weight else c.cast_config_input
        f8 = self._cached(w, role, lambda: hp_tensor_to_float8_dynamic(  # the arguments torchao's matmul passes
            hp, cast.target_dtype, proj.linear_mm_config, gemm_input_role=role,
            scaling_granularity=cast.scaling_granularity,
            axiswise_dim=get_maybe_axiswise_dim(0 if as_weight else -1, cast.scaling_granularity),
            round_scales_to_power_of_2=c.round_scales_to_power_of_2))
        return _UseCast.apply(hp, f8)

    def grouped_operand(self, w: torch.Tensor, down: bool):
        """The forward (FP8 data, scales) of the expert stack ``w`` as a grouped GEMM's right operand, this step's."""
        return self._cached(w, "grouped", lambda: _grouped_b_cast(_expert_b_t(w, down)))

    def grouped_operand_t(self, w: torch.Tensor, down: bool):
        """The backward's transposed (FP8 data, scales) of the expert stack ``w`` (the input-gradient GEMM's right
        operand, ``_grouped_bt_cast``), this step's: a second FP8 copy of the stack, +1 byte per expert parameter."""
        return self._cached(w, "grouped_t", lambda: _grouped_bt_cast(w, down))

    def _cached(self, w: torch.Tensor, role, make):
        """This step's cast of the weight ``w`` in ``role`` (``make()``, without autograd), made on first use or
        when ``w``'s storage or shape changed."""
        key = (id(w), role)
        hit = self._casts.get(key)
        if hit is None or hit[0] != w.data_ptr() or hit[1] != w.shape:
            with torch.no_grad():
                hit = self._casts[key] = (w.data_ptr(), w.shape, make())
            self.casts += 1
        return hit[2]


class _UseCast(torch.autograd.Function):
    """Forward: the cached FP8 cast of ``hp`` (a new wrapper around its data and scale); backward: the gradient
    to ``hp`` unchanged, as torchao's own cast function passes it."""

    @staticmethod
    def forward(ctx, hp, f8):
        from torchao.float8.float8_training_tensor import Float8TrainingTensor

        return Float8TrainingTensor(f8._data, f8._scale, f8._orig_dtype, f8._linear_mm_config, f8._gemm_input_role,
                                    f8._axiswise_dim)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def weight_cache(model: nn.Module) -> WeightCache | None:
    return getattr(model, "fp8_weight_cache", None)


def optimizer_stepped(model: nn.Module) -> None:
    """Call after every optimizer step (and after weights are loaded): the cached FP8 weights are stale."""
    cache = weight_cache(model)
    if cache is not None:
        cache.advance()


def convert(model: nn.Module, cfg, zero_stage: int = 0) -> Float8Plan:
    """Swap the projections ``plan`` selects for torchao ``Float8Linear``s (same parameters, so optimizer state,
    checkpoints and ZeRO partitioning see the same tensors) and switch the selected MoE layers to the FP8 grouped
    GEMM. Call after the model is built and initialised, before the optimizer / DeepSpeed engine is made.
    ``zero_stage``: the run's, for ``cache_decision``."""
    p = plan(model, cfg.fp8, cfg.fp8_experts, cfg.fp8_filter_fqns)
    if p.recipe == "none":
        return p
    if p.unmatched:
        raise ValueError("; ".join(filter_problems(p)))
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = p.linears()
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(p.recipe),
                               module_filter_fn=lambda m, fqn: fqn in names)
    for name in p.experts():
        model.get_submodule(name).fp8 = True
    cached, _ = cache_decision(p.recipe, cfg.fp8_cache_weights, zero_stage)
    cache = WeightCache() if cached else None
    if cache is not None:
        model.fp8_weight_cache = cache
    wgrad, _ = expert_wgrad_decision(cfg.fp8_expert_wgrad)
    for name in p.experts():  # what grouped_mm_fp8 reads: the step's casts (when cached), the weight gradient's path
        moe = model.get_submodule(name)
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.jt_fp8_wgrad = wgrad
            if cache is not None:
                w.jt_fp8_cache = cache
    if cfg.compile_elementwise:  # fuse each GEMM's amax/scale/cast passes (eager: several passes per operand)
        from ..models.fused_ops import raise_recompile_limits

        raise_recompile_limits(64)  # one compiled GEMM function for every shape and layout
    if cache is not None or cfg.compile_elementwise:
        import types

        from torchao.float8.float8_linear import Float8Linear

        for m in model.modules():
            if isinstance(m, Float8Linear):
                m.forward = types.MethodType(_forward, m)
                m.jt_compiled = bool(cfg.compile_elementwise)
                m.jt_weight_cache = cache
    return p


def _mm(a, b, mm_config, config):
    """a @ b through torchao's float8 matmul (dynamic scaling of both operands, the recipe's backward)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args.apply(a, b, mm_config, config)


_mm_compiled = None


def _mm_fn(compiled: bool):
    global _mm_compiled
    if not compiled or torch.compiler.is_compiling():  # inside a compiled block region: traced into its graph
        return _mm
    if _mm_compiled is None:
        _mm_compiled = torch.compile(_mm)
    return _mm_compiled


def _weight_operand(proj: nn.Module, role) -> torch.Tensor:
    """``proj``'s weight as its float8 matmul takes it in ``role``: the step's cached FP8 cast (``WeightCache``),
    or the bf16 weight (torchao casts it inside the matmul)."""
    from torchao.float8.float8_training_tensor import GemmInputRole

    cache = getattr(proj, "jt_weight_cache", None)
    if cache is not None:
        return cache.operand(proj, role)
    return proj.weight.t() if role is GemmInputRole.WEIGHT else proj.weight


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Float8Linear.forward`` with the weight from the step's cache (``model.fp8_cache_weights``) and the matmul
    (the activation casts included) compiled (``model.compile_elementwise``): one compiled function shared by every
    converted projection, so Inductor fuses each operand's amax, scale and cast into a kernel or two."""
    from torchao.float8.float8_training_tensor import GemmInputRole

    w_t = _weight_operand(self, GemmInputRole.WEIGHT)
    out = _mm_fn(getattr(self, "jt_compiled", False))(x, w_t, self.linear_mm_config, self.config)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def float8_weight_mm(proj: nn.Module, x_t: torch.Tensor) -> torch.Tensor:
    """``proj.weight @ x_t`` for a torchao ``Float8Linear``: its own float8 matmul with the operands in the other
    order (weight as the row-major left operand, the (features, tokens) activations as the column-major right
    one: the same roles and per-row / per-token scalings as in ``proj(x)``), so the (out, tokens) result keeps the
    Mamba kernel layout."""
    from torchao.float8.float8_training_tensor import GemmInputRole

    w = _weight_operand(proj, GemmInputRole.INPUT)
    return _mm_fn(getattr(proj, "jt_compiled", False))(w, x_t, proj.linear_mm_config, proj.config)


def _expert_b_t(w: torch.Tensor, down: bool) -> torch.Tensor:
    """The right operand (E, K, N), column-major per expert, of an expert stack stored (E, ffn, hidden):
    w_gate / w_up as (K=hidden, N=ffn) are, as transposed views; w_down as (K=ffn, N=hidden) is row-major, so it
    is copied transposed."""
    return w.transpose(1, 2).contiguous().transpose(1, 2) if down else w.transpose(1, 2)


def grouped_mm_fp8(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, down: bool = False) -> torch.Tensor:
    """a (M, K) row-major @ the expert stack ``w`` (``_expert_b_t``) per group, groups of rows ending at ``offs``
    (multiples of 16), bf16 out: torchao's rowwise FP8 grouped GEMM (``torch._scaled_grouped_mm``) in one autograd
    Function (``_GroupedMMFP8``), with or without the step's weight cache. The stack's tags (set by ``convert``):
    ``jt_fp8_cache`` (the ``WeightCache``, absent when ``cache_decision`` says no) and ``jt_fp8_wgrad``
    (``expert_wgrad_decision``: "fp8" or "bf16"; untagged: "fp8", torchao's own backward)."""
    return _GroupedMMFP8.apply(a, w, offs, down, getattr(w, "jt_fp8_cache", None),
                               getattr(w, "jt_fp8_wgrad", "fp8"))


def _grouped_b_cast(b_t: torch.Tensor):
    """The forward cast of a grouped GEMM's right operand, by torchao's own functions and arguments
    (``_Float8GroupedMM.forward``): per-column (axis -2) power-of-2 scales, e4m3, column-major data."""
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

    scales = tensor_to_scale(b_t, torch.float8_e4m3fn, scaling_granularity=ScalingGranularity.AXISWISE,
                             axiswise_dim=-2, round_scales_to_power_of_2=True)
    return to_fp8_saturated(b_t.to(torch.float32) * scales, torch.float8_e4m3fn), scales


def _grouped_bt_cast(w: torch.Tensor, down: bool):
    """The backward's cast of the stack as the input-gradient GEMM's right operand (``_expert_b_t(w)`` transposed,
    column-major per expert, scales per output column): torchao's ``triton_fp8_rowwise_3d_transpose_rhs`` with its
    ``_Float8GroupedMM.backward`` arguments. The kernel reads through strides, so w_down goes in as it is stored (no
    transposed copy), its values those of ``_expert_b_t(w_down)``."""
    from torchao.prototype.moe_training.kernels import triton_fp8_rowwise_3d_transpose_rhs

    return triton_fp8_rowwise_3d_transpose_rhs(w if down else w.transpose(1, 2), output_dtype=torch.float8_e4m3fn,
                                               round_scales_to_power_of_2=True)


class _GroupedMMFP8(torch.autograd.Function):
    """torchao 0.17's ``_Float8GroupedMM`` (rowwise, groups already padded: the same kernels, arguments and order),
    with three changes:
      - the stack's two FP8 casts, the forward's and the backward's transposed one, come from the step's
        ``WeightCache`` when there is one (made once per optimizer step instead of once per micro batch);
      - the weight gradient comes out contiguous in the stack's stored (E, ffn, hidden) layout, so the gradient
        accumulation over micro batches is a vectorized add: for w_down the weight-gradient GEMM takes its
        operands swapped (A^T @ grad_output instead of (grad_output^T @ A)^T, the same FP8 data and scales);
      - ``wgrad="bf16"``: the weight gradient by the bf16 grouped GEMM (``torch._grouped_mm``) on the saved bf16
        operands, skipping the per-group column casts (forward and input gradient stay FP8).
    ``down``: ``w`` is w_down (the right operand ``w`` itself, (E, K=ffn, N=hidden)); else w_gate / w_up (the right
    operand ``w^T``, (E, K=hidden, N=ffn))."""

    @staticmethod
    def forward(ctx, A, w, offs, down, cache, wgrad):
        from torchao.prototype.moe_training.kernels import triton_fp8_rowwise_2d_scale_and_cast

        b_data, b_scales = (cache.grouped_operand(w, down) if cache is not None
                            else _grouped_b_cast(_expert_b_t(w, down)))
        a_data, a_scales = triton_fp8_rowwise_2d_scale_and_cast(A, output_dtype=torch.float8_e4m3fn,
                                                                round_scales_to_power_of_2=True)
        ctx.save_for_backward(A, w, offs)
        ctx.down, ctx.cache, ctx.wgrad = down, cache, wgrad
        return torch._scaled_grouped_mm(a_data, b_data, a_scales.squeeze(-1).reciprocal(),
                                        b_scales.squeeze(1).reciprocal(), offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output):
        from torchao.prototype.moe_training.kernels import (triton_fp8_per_group_colwise_scales_dual,
                                                            triton_fp8_rowwise_2d_scale_and_cast)

        A, w, offs = ctx.saved_tensors
        down, f8 = ctx.down, torch.float8_e4m3fn
        go_data, go_scales = triton_fp8_rowwise_2d_scale_and_cast(grad_output, output_dtype=f8,
                                                                  round_scales_to_power_of_2=True)
        b_data, b_scales = (ctx.cache.grouped_operand_t(w, down) if ctx.cache is not None
                            else _grouped_bt_cast(w, down))
        grad_a = torch._scaled_grouped_mm(go_data, b_data, go_scales.squeeze(-1).reciprocal(),
                                          b_scales.squeeze(1).reciprocal(), offs, out_dtype=torch.bfloat16,
                                          use_fast_accum=True)
        if ctx.wgrad == "bf16":  # bf16 operands as saved; 2d-2d grouped GEMM, (E, ffn, hidden) out either way
            mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
            grad_w = mm(A.t(), grad_output, offs=offs) if down else mm(grad_output.t(), A, offs=offs)
            return grad_a, grad_w, None, None, None, None
        # 2d-2d scaled grouped GEMM: the first operand row-major (M, tokens), scales (groups * M,); the second
        # column-major (tokens, N), scales (groups * N,); out (groups, M, N). The dual kernel gives both tensors
        # column-major with per-group column scales, so either can be the (transposed) first operand.
        go_cm, go_cm_scales, a_cm, a_cm_scales = triton_fp8_per_group_colwise_scales_dual(
            grad_output, A, offs, f8, round_scales_to_power_of_2=True)
        if down:  # A^T @ grad_output: (E, ffn, hidden), w_down's layout
            grad_w = torch._scaled_grouped_mm(a_cm.t(), go_cm, a_cm_scales.reciprocal(), go_cm_scales.reciprocal(),
                                              offs, out_dtype=torch.bfloat16, use_fast_accum=True)
        else:  # grad_output^T @ A: (E, ffn, hidden), w_gate's / w_up's layout (torchao's operand order)
            grad_w = torch._scaled_grouped_mm(go_cm.t(), a_cm, go_cm_scales.reciprocal(), a_cm_scales.reciprocal(),
                                              offs, out_dtype=torch.bfloat16, use_fast_accum=True)
        return grad_a, grad_w, None, None, None, None
