"""The model's typed config. Field names follow Hugging Face ``JambaConfig`` so presets and exports map 1:1."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from enum import Enum


class Choice(str, Enum):
    """A config field with a fixed set of values (OmegaConf types them; a wrong one fails at start-up). Members are
    named by their values, so they compare, print and serialise as the plain string (``"auto"``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def choices(cls) -> str:
        return ", ".join(m.value for m in cls)


def choice(name: str, *values: str, module: str = __name__) -> type[Choice]:
    """A ``Choice`` enum whose members are ``values``, each named by its value."""
    return Choice(name, {v: v for v in values}, module=module)


def coerce_choices(obj, prefix: str) -> None:
    """Turn every ``Choice`` field of the dataclass ``obj`` given as a plain string into its member: the one check of
    a choice for configs built in Python (``ModelConfig(moe_impl="native")``); OmegaConf checks composed ones."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        if isinstance(tp, type) and issubclass(tp, Choice) and not isinstance(getattr(obj, name), tp):
            value = getattr(obj, name)
            try:
                setattr(obj, name, tp(value))
            except ValueError:
                raise ValueError(f"{prefix}{name}={value!r}: choose {tp.choices()}") from None


MambaImpl = choice("MambaImpl", "auto", "reference", "cuda")
MoEImpl = choice("MoEImpl", "auto", "native", "grouped", "megablocks")
Recompute = choice("Recompute", "none", "full", "ffn", "mixer")
Fp8 = choice("Fp8", "none", "tensorwise", "rowwise")
Fp8Wgrad = choice("Fp8Wgrad", "fp8", "bf16")


def arch(default, *, hf: bool = True, weights: bool = True, moe_only: bool = False):
    """An architecture field: what the model computes. A checkpoint is resumed or evaluated only with its own value.
    ``hf``: HF ``JambaConfig`` has it under the same name and meaning (exported and imported 1:1); ``weights``: HF
    weights load only into a model that agrees on it (it changes their shapes or the function they compute;
    ``moe_only``: only when the model has MoE layers)."""
    return field(default=default, metadata={"kind": "arch", "hf": hf, "weights": weights, "moe_only": moe_only})


def runtime(default):
    """A run-time knob: how a run executes the same model (kernels, recomputation, loss chunking, labels). It may
    differ between a checkpoint and the run that resumes, evaluates or exports it. A list default is copied per
    instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"kind": "runtime"})
    return field(default=default, metadata={"kind": "runtime"})


@dataclass
class ModelConfig:
    """Every field is declared with ``arch(...)`` or ``runtime(...)``: the checkpoint's resume check, the evaluator
    and the HF conversion read these marks (``runtime_fields``, ``hf_fields``, ``weight_fields``), so a new knob
    needs no list edited anywhere (tests/test_config.py holds every field to having a mark)."""
    name: str = runtime("jamba_v0_1")  # the defaults below are Jamba v0.1 (= HF JambaConfig())
    vocab_size: int = arch(65536)
    hidden_size: int = arch(4096)
    intermediate_size: int = arch(14336)  # 0: no FFN in dense layers (Zoology's state_mixer = Identity)
    num_hidden_layers: int = arch(32)
    num_attention_heads: int = arch(32)
    num_key_value_heads: int = arch(8)
    # hybrid layout: layer i is attention iff i % attn_layer_period == attn_layer_offset (else Mamba)
    attn_layer_period: int = arch(8)
    attn_layer_offset: int = arch(4)
    # a non-attention layer i is a gated short conv (models/short_conv.py, Zoology's BaseConv) instead of Mamba iff
    # short_conv_layer_period > 0 and i % short_conv_layer_period == short_conv_layer_offset
    short_conv_layer_period: int = arch(0, hf=False)
    short_conv_layer_offset: int = arch(0, hf=False)
    short_conv_kernel: int = arch(3, hf=False)
    # layer i has an MoE FFN iff num_experts > 1 and i % expert_layer_period == expert_layer_offset
    expert_layer_period: int = arch(2, moe_only=True)
    expert_layer_offset: int = arch(1, moe_only=True)
    num_experts: int = arch(16)
    num_experts_per_tok: int = arch(2)
    router_aux_loss_coef: float = arch(0.001, weights=False)
    router_z_loss_coef: float = arch(0.0, hf=False, weights=False)
    # Mamba-1
    mamba_d_state: int = arch(16)
    mamba_d_conv: int = arch(4)
    mamba_expand: int = arch(2)
    mamba_dt_rank: int = arch(0, hf=False)  # 0 = "auto" = ceil(hidden_size / 16); HF stores the resolved int
    mamba_conv_bias: bool = arch(True)
    mamba_proj_bias: bool = arch(False)
    # Jamba's RMSNorms on the Mamba mixer's dt, B and C (Jamba paper sec. 6.1; HF JambaMambaMixer has them always);
    # false: plain Mamba-1 as mamba_ssm's Mamba (and Zoology's) computes it. Not exportable to HF Jamba when false
    mamba_dt_bc_norm: bool = arch(True, hf=False)
    # attention
    use_rope: bool = arch(False, hf=False)
    rope_theta: float = arch(10000.0, hf=False, weights=False)
    # misc
    rms_norm_eps: float = arch(1e-6)
    tie_word_embeddings: bool = arch(False)
    initializer_range: float = arch(0.02, weights=False)
    max_position_embeddings: int = arch(262144, weights=False)
    # kernels: "auto" takes the fused kernel when it is importable and tensors are on CUDA
    mamba_impl: MambaImpl = runtime(MambaImpl.auto)  # auto | reference | cuda
    moe_impl: MoEImpl = runtime(MoEImpl.auto)  # auto | native | grouped (torch._grouped_mm) | megablocks
    # recompute in backward instead of storing: none | full (whole layers) | ffn (FFN/MoE sub-layers: the
    # large expert intermediates) | mixer (Mamba/attention sub-layers)
    activation_checkpointing: Recompute = runtime(Recompute.none)
    # >0: training loss computed this many tokens at a time with the logits recomputed in backward (memory)
    loss_chunk_tokens: int = runtime(0)
    # training loss: apply the LM head only at positions that have a label; the same loss, for tasks that score few
    # positions (MQAR: 4-64 of 64-256 per sequence). The trainer counts the labels on the host batch, so this costs
    # no device sync (a caller that passes no count pays one per micro batch)
    loss_labeled_only: bool = runtime(False)
    # CUDA only: torch.compile the SwiGLU product and the fp32 cross-entropy (models/fused_ops.py)
    compile_elementwise: bool = runtime(True)
    # CUDA only, A/B switches of bench/throughput.py (True is the fast path): mamba-ssm's fused Triton RMSNorm; the
    # Mamba kernels in the (d, batch*seq) layout (models/mamba.py) instead of the generic forward
    fused_rms_norm: bool = runtime(True)
    mamba_kernel_layout: bool = runtime(True)
    # CUDA sm89+ only (Hopper: H100/H200): the projections' GEMMs in float8 through torchao's float8 training,
    # applied by a model converter after the model is built (jambatrain/quantization/float8.py): none | tensorwise |
    # rowwise (torchao's recipes); refused elsewhere, never silently bf16. fp8_experts: the MoE experts' grouped GEMMs
    # too (torchao's rowwise FP8 grouped GEMM on torch._scaled_grouped_mm); off by default: measured slower than the
    # bf16 experts (docs/benchmarks.md, "FP8 training")
    fp8: Fp8 = runtime(Fp8.none)
    fp8_experts: bool = runtime(False)
    # cast each FP8 weight once per optimizer step and reuse it in every micro batch and recompute (tensorwise, ZeRO
    # 0-2; the start-up report says when it does not apply); false: torchao's per-GEMM weight casts
    fp8_cache_weights: bool = runtime(True)
    # module names kept bf16 under model.fp8 (torchtitan's filter_fqns): a projection or expert stack whose fully
    # qualified name contains one of them, e.g. [out_proj] (every Mamba out_proj) or [layers.0.,layers.15.]
    fp8_filter_fqns: list[str] = runtime([])
    # FP8 experts' weight gradients: fp8 (torchao's backward: per-group column casts of the grad outputs and inputs,
    # then an FP8 grouped GEMM) | bf16 (torch._grouped_mm on the bf16 operands: no column casts, the forward and
    # input-gradient GEMMs stay FP8); the default is the faster one measured (docs/benchmarks.md, "Experts")
    fp8_expert_wgrad: Fp8Wgrad = runtime(Fp8Wgrad.bf16)
    # CUDA only: torch.compile each block's regions around the custom kernels (models/compiled_blocks.py): Mamba
    # input RMSNorm + in_proj and out_proj + residual, attention RMSNorm + q/k/v and o_proj + residual, the dense FFN
    # sub-layer (RMSNorm + SwiGLU + residual), so Inductor fuses the FP8 casts (or bf16 elementwise ops) with the
    # norms, SwiGLU and residual adds around the GEMMs. null (auto): on with model.fp8 (measured faster: 1.3b dense FP8
    # 0.95x -> 1.11x of bf16), off in bf16 (measured no faster); true / false force it. Off under ZeRO-3 and context
    # parallelism (the report says so)
    compile_blocks: bool | None = runtime(None)
    init_from: str | None = runtime(None)  # HF Jamba directory to initialise weights from

    def __post_init__(self):
        coerce_choices(self, "model.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return self.mamba_dt_rank or math.ceil(self.hidden_size / 16)

    def is_attention_layer(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_short_conv_layer(self, i: int) -> bool:
        return (self.short_conv_layer_period > 0 and i % self.short_conv_layer_period == self.short_conv_layer_offset
                and not self.is_attention_layer(i))

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    def layer_pattern(self) -> str:
        """One letter pair per layer: 'a'/'m'/'c' for attention/Mamba/short-conv mixer, 'E'/'d'/'-' for MoE/dense/no
        FFN."""
        return " ".join(
            ("a" if self.is_attention_layer(i) else "c" if self.is_short_conv_layer(i) else "m")
            + ("E" if self.is_moe_layer(i) else "d" if self.intermediate_size else "-")
            for i in range(self.num_hidden_layers)
        )

    def problems(self) -> list[str]:
        """Every inconsistency in this config, each with the fix. Empty when the config is usable."""
        p = []
        if self.hidden_size % self.num_attention_heads:
            p.append(f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                     f"{self.num_attention_heads}: pick heads that divide the width")
        if self.num_attention_heads % self.num_key_value_heads:
            p.append(f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                     f"model.num_key_value_heads={self.num_key_value_heads} (GQA groups must be whole)")
        if not 0 <= self.attn_layer_offset < self.attn_layer_period:
            p.append(f"model.attn_layer_offset={self.attn_layer_offset} must be in [0, attn_layer_period="
                     f"{self.attn_layer_period}); use attn_layer_period > num_hidden_layers for pure Mamba")
        if not 0 <= self.expert_layer_offset < self.expert_layer_period:
            p.append(f"model.expert_layer_offset={self.expert_layer_offset} must be in [0, "
                     f"expert_layer_period={self.expert_layer_period})")
        if self.num_experts > 1 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            p.append(f"model.num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                     f"{self.num_experts}]")
        if self.use_rope and self.head_dim % 2:
            p.append(f"model.use_rope needs an even head_dim, got {self.head_dim}")
        if self.loss_chunk_tokens < 0:
            p.append(f"model.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0 = whole-batch loss)")
        if self.intermediate_size < 0 or (self.intermediate_size == 0 and self.num_experts > 1):
            p.append(f"model.intermediate_size={self.intermediate_size} must be > 0 (MoE layers need it) or 0 for no "
                     "FFN in a model without experts (model.num_experts=1)")
        if self.short_conv_layer_period < 0 or self.short_conv_kernel < 1 or (
                self.short_conv_layer_period and not 0 <= self.short_conv_layer_offset < self.short_conv_layer_period):
            p.append(f"model.short_conv_layer_period={self.short_conv_layer_period} (0 = none), offset "
                     f"{self.short_conv_layer_offset} (in [0, period)) and short_conv_kernel={self.short_conv_kernel}"
                     " (>= 1) are inconsistent")
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "mamba_d_state",
                  "mamba_d_conv", "mamba_expand"):
            if getattr(self, k) <= 0:
                p.append(f"model.{k} must be positive, got {getattr(self, k)}")
        return p


# ---------------------------------------------------------------- the field classes, read from the marks
def _marks(schema=None) -> dict[str, dict]:
    return {f.name: dict(f.metadata) for f in fields(schema or ModelConfig)}


def runtime_fields(schema=None) -> tuple[str, ...]:
    """Run-time knobs: may change between a checkpoint and the run resuming or evaluating it."""
    return tuple(k for k, m in _marks(schema).items() if m.get("kind") == "runtime")


def hf_fields(schema=None) -> tuple[str, ...]:
    """Fields HF ``JambaConfig`` has under the same name and meaning."""
    return tuple(k for k, m in _marks(schema).items() if m.get("kind") == "arch" and m.get("hf"))


def weight_fields(schema=None, moe: bool = True) -> tuple[str, ...]:
    """Fields HF weights must agree on to load (their shapes or the function they compute); the expert layout
    only when ``moe``. A field without a mark counts as one (the safe side)."""
    return tuple(k for k, m in _marks(schema).items() if m.get("kind") != "runtime" and m.get("weights", True)
                 and (moe or not m.get("moe_only")))


def architecture_changes(saved: dict, now: dict, schema=None) -> dict[str, tuple]:
    """{field: (saved, now)} for every architecture field (anything not a run-time knob) whose value differs
    between two ``asdict(ModelConfig)`` dicts; a field one of them lacks (an older checkpoint) is not compared."""
    skip = set(runtime_fields(schema))
    return {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in skip}
