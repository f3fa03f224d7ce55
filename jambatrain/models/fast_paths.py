"""Which implementation each hot op will take for a run, said before training starts.

A slow path taken silently is the classic way to lose 10x on a GPU (the kernels failed to import, a document
mask forced the reference scan). ``describe`` reads the same availability checks the ops use at run time and
returns a one-line summary plus a warning, with its fix, for every slow path a CUDA run would take.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import attention, compiled_blocks, moe_backends, ssm_ops
from .config import ModelConfig


@dataclass
class FastPaths:
    paths: dict[str, str]
    warnings: list[str] = field(default_factory=list)  # slow paths a CUDA run would take, each with its fix
    errors: list[str] = field(default_factory=list)  # an implementation asked for by name that cannot run

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.paths.items())


def describe(cfg: ModelConfig, device_type: str, precision: str, doc_mask: bool, ep: int = 1,
             cp: int = 1, zero_stage: int = 0) -> FastPaths:
    """device_type: "cuda" / "cpu"; precision: "bf16" / "fp32"; doc_mask: the data config's packed-document mask;
    ep: the expert-parallel size; cp: the context-parallel size; zero_stage: DeepSpeed's (the FP8 weight cache)."""
    cuda = device_type == "cuda"
    k = ssm_ops.kernels_available()
    fp = FastPaths({})
    layers = range(cfg.num_hidden_layers)

    if any(not cfg.is_attention_layer(i) and not cfg.is_short_conv_layer(i) for i in layers):
        # the plan MambaMixer.plan executes (the same call with the mixer's fields)
        mamba = ssm_ops.decide_mamba(cfg.mamba_impl, device_type, doc_mask, cfg.mamba_kernel_layout,
                                     cfg.compile_elementwise, cp)
        fp.paths["mamba"] = mamba.describe()
        fp.errors += [mamba.error] if mamba.error else []
        fp.warnings += [mamba.warning] if mamba.warning else []
    if any(cfg.is_attention_layer(i) for i in layers):
        if cuda and doc_mask and attention.flex_available():
            fp.paths["attention"] = "flex attention (document mask)"
        else:
            fp.paths["attention"] = "flash SDPA" if cuda and precision == "bf16" and not doc_mask else "SDPA"
        if cp > 1:
            fp.paths["attention"] += f", context parallel {cp} (Ulysses all-to-all over heads)"
    fp.paths["rmsnorm"] = "triton" if cuda and k["rms_norm"] and cfg.fused_rms_norm else "eager"
    blocks = compiled_blocks.decide(cfg.compile_blocks, device_type, zero_stage, cp, cfg.fp8)  # what apply executes
    if blocks.asked:
        fp.paths["blocks"] = blocks.describe()
        fp.warnings += [blocks.warning] if blocks.warning else []
    fp8_experts = False
    if cfg.fp8 != "none":  # the converter's own plan (jambatrain/quantization/float8.py), on a meta model
        from ..quantization import float8

        plan = float8.plan_for_config(cfg)
        fp.paths["fp8"] = float8.report(cfg, plan, zero_stage, ep, blocks.on)
        fp8_errors = float8.problems(cfg.fp8, device_type, precision) + float8.filter_problems(plan)
        fp.errors += fp8_errors
        fp8_experts = bool(plan.experts()) and not fp8_errors
    if cfg.num_experts > 1:
        moe = moe_backends.decide(cfg.moe_impl, device_type, precision == "bf16", cfg.hidden_size,
                                  cfg.intermediate_size, fp8=fp8_experts)
        fp.paths["moe"] = moe_backends.REPORT_NAMES[moe.backend] + (f", expert parallel {ep}" if ep > 1 else "")
        fp.errors += [moe.error] if moe.error else []
        fp.warnings += [moe.warning] if moe.warning else []
    fp.paths["compile"] = "on" if cuda and cfg.compile_elementwise else "off"
    return fp
