"""Training throughput on one GPU: jambatrain's JambaLM vs transformers' JambaForCausalLM, same config.

    python bench/throughput.py [--model conf/model/1.3b.yaml | v0.1-block] [--set num_experts=16 ...]
                               [--seq 4096] [--batch 4] [--steps 10] [--warmup 3] [--grad-accum 8]
                               [--which jambatrain,hf] [--jt-variants opt,opt+fp8] [--moe-bench] [--profile]

Both models are built on the GPU in bf16 (parameters, activations and AdamW state in bf16; torch
``AdamW(fused=True)``), fed the same random token batches, and stepped ``--steps`` times after
``--warmup`` steps. Reported per model: tokens/s (timed with CUDA events over the timed steps),
model FLOPs utilisation (training FLOPs per token x tokens/s / 989e12, the H100/H200 dense bf16
peak), and peak allocated memory. A batch that runs out of memory is halved and retried (reported).
HF Jamba takes mamba-ssm / causal-conv1d kernels when they import and its default experts
implementation (grouped_mm in transformers 5) -- the bench prints what it found.
``--jt-variants opt,opt+fp8`` times the bf16 ``opt`` row and FP8 (``model.fp8``; ``fp8row``: rowwise, ``fp8dense``:
experts left bf16) side by side in one run. Each optimizer step is ``--grad-accum`` micro batches of
forward+backward, then AdamW: tokens/s are reported for forward+backward alone and for the full step, and MFU is
always against the bf16 peak (FP8 rows included). ``--model v0.1-block``: Jamba v0.1 width (the schema defaults:
hidden 4096, ffn 14336, 16 experts top-2) with 8 layers, 13.3B parameters, one GPU; ``--set num_hidden_layers=4``
for 80 GB cards. Presets are read with their Hydra ``defaults:`` (52b.yaml -> jamba_v0_1.yaml).
``--moe-bench`` times the MoE expert backends alone (fwd+bwd, gradients accumulating over the calls) at the model's
shapes: bf16 native / grouped / megablocks and the FP8 grouped experts (weight gradients FP8 or bf16, cache on/off).
``--profile`` prints a CUDA-kernel time breakdown by op class for a couple of steps of each model.
Last line: ``ratio jambatrain/hf = X.XX`` (tokens/s).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jambatrain.flops import flops_per_token  # noqa: E402
from jambatrain.hf_convert import shift_labels, to_hf_config  # noqa: E402
from jambatrain.models import JambaLM, ModelConfig  # noqa: E402
from jambatrain.models import moe_backends, ssm_ops  # noqa: E402

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 datasheet peak

V01_BLOCK = "v0.1-block"  # --model v0.1-block: Jamba v0.1 width (the schema defaults), 8 layers (one Jamba block)


def _read_preset(path: str) -> dict:
    """A conf/model preset's keys, following its Hydra ``defaults:`` list (52b.yaml -> jamba_v0_1.yaml); an empty
    preset (jamba_v0_1.yaml: every value is the schema default) is {}."""
    import yaml

    with open(path) as f:  # conf/model/*.yaml: a missing file is an error, not a silent stand-in
        raw = yaml.safe_load(f) or {}
    kw = {}
    for d in raw.pop("defaults", None) or []:
        if isinstance(d, str) and d != "_self_":
            kw.update(_read_preset(os.path.join(os.path.dirname(path), d + ".yaml")))
    kw.update(raw)
    return kw


def load_cfg(path: str | None, overrides: list[str]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if path == V01_BLOCK:
        raw = {"name": V01_BLOCK, "num_hidden_layers": 8}
    else:
        raw = _read_preset(path)
    kw = {k: v for k, v in raw.items() if k in names}
    print(f"config: {path}")
    for o in overrides:
        k, v = o.split("=", 1)
        kw[k] = yaml_scalar(v)
        if k in ("num_experts", "num_hidden_layers") and "name" in kw:
            kw["name"] = f"{kw['name']}+{k}={v}"
    return ModelConfig(**kw)


def yaml_scalar(v: str):
    import yaml

    return yaml.safe_load(v)


# ------------------------------------------------------------------------------------------------ models
def _flop_parts(flops: dict) -> dict:
    """Forward GFLOP/token by part, from jambatrain.flops' dict (its totals and layer counts left out)."""
    return {k: round(v / 1e9, 3) for k, v in flops.items()
            if k not in ("forward", "training", "seq_len") and not k.endswith("_layers")}


def _build_bf16_on_gpu(ctor):
    """Construct directly on the GPU in bf16 (no fp32 copy on the host)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = ctor()
    finally:
        torch.set_default_dtype(torch.float32)
    return model.to(torch.bfloat16)


def build_jambatrain(cfg: ModelConfig):
    from jambatrain.models import compiled_blocks
    from jambatrain.quantization import float8

    model = _build_bf16_on_gpu(lambda: JambaLM(cfg))
    err = float8.problems(cfg.fp8, "cuda", "bf16")
    if err:
        raise SystemExit("; ".join(err))
    float8.convert(model, cfg)  # the trainer's converter (no-op for model.fp8=none)
    compiled_blocks.apply(model, compiled_blocks.decide(cfg.compile_blocks, "cuda", fp8=cfg.fp8))  # the trainer's order
    return model


def build_hf(cfg: ModelConfig):
    from transformers import JambaForCausalLM

    hf_cfg = to_hf_config(cfg, use_cache=False)
    hf_cfg._attn_implementation = "sdpa"
    model = _build_bf16_on_gpu(lambda: JambaForCausalLM(hf_cfg))
    model.config.use_cache = False
    info = {"attn_implementation": getattr(model.config, "_attn_implementation", "?")}
    try:
        info["experts_implementation"] = model.config._experts_implementation_internal
    except Exception:  # noqa: BLE001
        info["experts_implementation"] = getattr(model.config, "_experts_implementation", "?")
    try:
        import transformers.models.jamba.modeling_jamba as mj

        info["hf_fast_path_flag"] = getattr(mj, "is_fast_path_available", "n/a")
    except Exception:  # noqa: BLE001
        pass
    return model, info


def variant_config(cfg: ModelConfig, variant: str) -> ModelConfig:
    """The model config of a jambatrain A/B row: '+'-joined tokens. 'opt' = layout+norm+compile (the defaults);
    'base' = none of them; 'layout': Mamba kernels in the (d, b*l) layout (model.mamba_kernel_layout); 'norm':
    fused Triton RMSNorm (model.fused_rms_norm); 'compile': torch.compile'd SwiGLU product and cross-entropy
    (model.compile_elementwise); 'grouped' / 'megablocks' / 'native': the MoE backend instead of moe_impl=auto;
    'fp8' / 'fp8row': model.fp8=tensorwise / rowwise with the experts in FP8 too (model.fp8_experts=true);
    'fp8dense': model.fp8=tensorwise with the experts left bf16; 'nocache': model.fp8_cache_weights=false (torchao
    re-casts every weight in every GEMM instead of once per optimizer step); 'fp8wgfp8' / 'fp8wgbf16': the FP8
    experts' weight gradients in FP8 / bf16 (model.fp8_expert_wgrad; neither: the schema default);
    'blocks' / 'noblocks': model.compile_blocks=true / false (each block's regions around the custom kernels
    compiled: models/compiled_blocks.py; neither: the config's, auto = on with FP8);
    'docs': packed documents (``doc_starts`` with a boundary every ~1k tokens: attention masked per document, Mamba
    state reset; data, not config); 'cp1': the context-parallel code path at cp = 1 (a one-rank NCCL group set on
    the mixers, ``force_cp_path``: its all-to-all layout changes and collectives at no parallelism, the overhead
    cp = 1 itself does not pay: ``context_parallel.apply`` sets nothing there)."""
    toks = set(variant.replace("opt", "layout+norm+compile").split("+")) - {"", "base", "docs", "cp1", "nocache",
                                                                               "blocks", "noblocks"}
    wgrad = "bf16" if "fp8wgbf16" in toks else "fp8" if "fp8wgfp8" in toks else cfg.fp8_expert_wgrad
    moe = toks & {"grouped", "megablocks", "native"}
    fp8 = "rowwise" if "fp8row" in toks else "tensorwise" if toks & {"fp8", "fp8dense"} else "none"
    return dataclasses.replace(cfg, mamba_kernel_layout="layout" in toks, fused_rms_norm="norm" in toks,
                               compile_elementwise="compile" in toks,
                               moe_impl=next(iter(moe)) if moe else cfg.moe_impl,
                               fp8=fp8 if fp8 != "none" else cfg.fp8,
                               fp8_experts="fp8dense" not in toks if fp8 != "none" else cfg.fp8_experts,
                               fp8_cache_weights="nocache" not in variant.split("+") and cfg.fp8_cache_weights,
                               fp8_expert_wgrad=wgrad,
                               compile_blocks=True if "blocks" in variant.split("+") else
                               False if "noblocks" in variant.split("+") else cfg.compile_blocks)


def variant_report(vcfg: ModelConfig) -> dict:
    """What a jambatrain row runs beyond the kernels: the FP8 plan and weight-cast words, the compiled block regions
    (the decisions ``build_jambatrain`` executes, as the trainer's start-up report prints them)."""
    from jambatrain.models import compiled_blocks
    from jambatrain.quantization import float8

    out = {}
    blocks = compiled_blocks.decide(vcfg.compile_blocks, "cuda", fp8=vcfg.fp8)
    if vcfg.fp8 != "none":
        p = float8.plan_for_config(vcfg)
        out["fp8"] = float8.report(vcfg, p, compile_blocks=blocks.on)  # the start-up report's words
        out["fp8_bf16_reasons"] = p.reasons()
    if blocks.asked:
        out["blocks"] = blocks.describe()
    return out


def force_cp_path(model) -> None:
    """Give every cp-aware module a context-parallel group of this one rank (NCCL)."""
    import torch.distributed as dist

    from jambatrain.parallel import context_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29534")
        dist.init_process_group("nccl", rank=0, world_size=1)
    group = context_parallel.CPGroup(dist.group.WORLD, 0, 1)
    for m in model.modules():
        if hasattr(m, "cp_group"):
            m.cp_group = group


def doc_starts_like(ids: torch.Tensor, mean_len: int = 1024, seed: int = 0) -> torch.Tensor:
    """bool (batch, seq): True at 0 and then with probability 1/mean_len per position (packed documents)."""
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    starts = torch.rand(ids.shape, device=ids.device, generator=gen) < 1.0 / mean_len
    starts[:, 0] = True
    return starts


def loss_fn(kind: str, model, ids, doc_starts=None):
    if kind == "jambatrain":  # the same next-token task as HF's
        return model(ids, labels=shift_labels(ids), doc_starts=doc_starts, return_logits=False).loss
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# ------------------------------------------------------------------------------------------------ timing
def run_model(kind: str, cfg: ModelConfig, seq: int, batch: int, steps: int, warmup: int, profile: bool,
              variant: str = "opt", grad_accum: int = 1):
    """One optimizer step = ``grad_accum`` micro batches (forward+backward) then AdamW. Timed with CUDA events
    apart: forward+backward of the micro batches, and the whole step (optimizer included)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t_build = time.time()
    info = {}
    if kind == "jambatrain":
        vcfg = variant_config(cfg, variant)
        model = build_jambatrain(vcfg)
        if "cp1" in variant.split("+"):
            force_cp_path(model)
        from jambatrain.models.moe import MoE
        from jambatrain.quantization import float8

        moes = [m for m in model.modules() if isinstance(m, MoE)]
        info = {"variant": variant, "kernels": ssm_ops.kernels_available(),
                "moe_backend": sorted({moe_backends.decide(m.impl, "cuda", m.w_gate.dtype == torch.bfloat16,
                                                           cfg.hidden_size, cfg.intermediate_size, m.fp8).backend
                                       for m in moes}) or "none (dense)"}
        info.update(variant_report(vcfg))
    else:
        model, info = build_hf(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{kind}] built in {time.time() - t_build:.1f} s: {n_params / 1e9:.3f} B params; {info}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    model.train()
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=gen) for _ in range(4)]
    docs = None
    if kind == "jambatrain" and "docs" in variant.split("+"):
        docs = [doc_starts_like(b, seed=i) for i, b in enumerate(batches)]
        info["documents_per_sequence"] = float(docs[0].sum(1).float().mean())
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    fb_ms = []

    def step(i, timed=False):
        s0, s1 = ev(), ev()
        s0.record()
        for j in range(grad_accum):
            n = i * grad_accum + j
            loss = loss_fn(kind, model, batches[n % len(batches)], None if docs is None else docs[n % len(docs)])
            (loss / grad_accum).backward()
        s1.record()
        opt.step()
        if kind == "jambatrain":
            float8.optimizer_stepped(model)  # the trainer's call: this step's FP8 weight casts are stale
        opt.zero_grad(set_to_none=True)
        if timed:
            fb_ms.append((s0, s1))
        return loss

    losses = []
    t_warm = time.time()
    for i in range(warmup):  # the first step compiles (model.compile_elementwise / compile_blocks)
        losses.append(step(i).item())
    torch.cuda.synchronize()
    t_warm = time.time() - t_warm
    start, end = ev(), ev()
    t0 = time.time()
    start.record()
    for i in range(steps):
        loss = step(i, timed=True)
    end.record()
    torch.cuda.synchronize()
    wall = time.time() - t0
    ms = start.elapsed_time(end)
    fb = sum(a.elapsed_time(b) for a, b in fb_ms)
    losses.append(loss.item())
    tokens = batch * seq * grad_accum * steps
    res = {"kind": kind, "variant": variant if kind == "jambatrain" else "", "batch": batch, "seq": seq,
           "grad_accum": grad_accum, "steps": steps, "step_ms": ms / steps, "fwd_bwd_ms": fb / steps,
           "tokens_per_s": tokens / (ms / 1e3), "fwd_bwd_tokens_per_s": tokens / (fb / 1e3), "wall_s": wall,
           "warmup_s": t_warm,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "params": n_params, "info": info,
           "loss_first_last": (losses[0], losses[-1])}
    if profile:
        res["profile"] = profile_steps(kind, step, steps=2)
    del model, opt, batches
    torch._dynamo.reset()  # compiled code of this variant's model (guards, graphs) goes with it
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run_model_fit(kind, cfg, seq, batch, steps, warmup, profile, variant="opt", grad_accum=1):
    while batch >= 1:
        try:
            return run_model(kind, cfg, seq, batch, steps, warmup, profile, variant, grad_accum)
        except torch.cuda.OutOfMemoryError:
            print(f"[{kind}] out of memory at batch {batch}; halving", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError(f"{kind}: out of memory even at batch 1")


# ------------------------------------------------------------------------------------------------ profile
def profile_steps(kind, step, steps=2):
    from jambatrain import profiling

    torch.cuda.synchronize()
    t0 = time.time()
    prof = profiling.start(cuda=True)
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return profiling.stop(prof, True, steps, (time.time() - t0) * 1e6, None, f"{kind}, CUDA kernels", True)


# ------------------------------------------------------------------------------------------------ MoE
def float8_problem() -> str | None:
    from jambatrain.quantization import float8

    p = float8.problems("tensorwise", "cuda", "bf16")
    return "; ".join(p) if p else None


def fp8_expert_variants() -> dict[str, dict]:
    """The FP8 expert rows of ``--moe-bench`` (grouped_fp8, the FP8 converter's tags on the stacks): weight gradients
    in FP8 or bf16 (model.fp8_expert_wgrad), stacks' casts cached (cast once, before the timed calls, as once per
    optimizer step) or not."""
    if float8_problem():
        return {}
    return {"grouped_fp8 wgrad fp8, cache": dict(wgrad="fp8", cached=True),
            "grouped_fp8 wgrad bf16, cache": dict(wgrad="bf16", cached=True),
            "grouped_fp8 wgrad fp8, no cache": dict(wgrad="fp8", cached=False)}


def tag_fp8_experts(stacks, wgrad: str, cached: bool) -> None:
    """What ``float8.convert`` sets on an FP8 MoE layer's stacks, on bare tensors."""
    from jambatrain.quantization import float8

    cache = float8.WeightCache() if cached else None
    for w in stacks:
        w.jt_fp8_wgrad = float8.expert_wgrad_decision(wgrad)[0]
        if cache is not None:
            w.jt_fp8_cache = cache


def moe_bench(cfg: ModelConfig, tokens: int, E: int, k: int, iters: int = 10):
    """Expert computation alone, fwd+bwd, at the model's hidden/ffn sizes with near-uniform routing."""
    from jambatrain.models.moe import route
    from jambatrain.models.moe_backends import experts_forward_native

    h, f = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=g)
    logits = torch.randn(tokens, E, device="cuda", generator=g)
    ws = [(torch.randn(E, f, h, device="cuda", generator=g) * h ** -0.5).to(torch.bfloat16) for _ in range(3)]
    gy = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=g)
    w_down_cm = ws[2].transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major storage
    backends = [("native", experts_forward_native, ws[2]),
                ("grouped", moe_backends.experts_forward_grouped, ws[2]),
                ("grouped(w_down col-major)", moe_backends.experts_forward_grouped, w_down_cm)]
    if moe_backends.megablocks_available():
        backends.append(("megablocks", moe_backends.experts_forward_megablocks, ws[2]))
    else:
        print("(megablocks does not import: not benchmarked)")
    fp8_rows = fp8_expert_variants()
    if fp8_rows:
        backends += [(name, moe_backends.BACKENDS["grouped_fp8"], ws[2]) for name in fp8_rows]
    else:
        print(f"(FP8 experts not benchmarked: {float8_problem()})")
    flops = 3 * 2 * tokens * k * 3 * h * f
    print(f"\nMoE experts fwd+bwd: tokens={tokens} hidden={h} ffn={f} experts={E} top{k}; "
          f"{flops / 1e12:.2f} TFLOP per call")
    out = {}
    y_ref = None
    for name, fn, wd in backends:
        params = [w.detach().clone().requires_grad_() for w in (ws[0], ws[1])] + [wd.detach().requires_grad_()]
        if name in fp8_rows:
            params[2] = wd.detach().clone().requires_grad_()  # the tags below go on this row's own tensors
            tag_fp8_experts(params, **fp8_rows[name])

        def call():
            xx = x.detach().requires_grad_()
            routing = route(logits, k)
            y = fn(xx, routing, *params)
            y.backward(gy)  # the gradients accumulate over the calls, as over micro batches
            return y

        try:
            for _ in range(2):  # with the cache, its casts are made here, once: the timed calls are micro batches
                y = call()
            torch.cuda.synchronize()
            ts = []
            for _ in range(iters):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                call()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            ms = sorted(ts)[len(ts) // 2]
            err = float("nan") if y_ref is None else ((y.float() - y_ref).norm() / y_ref.norm()).item()
            if y_ref is None:
                y_ref = y.detach().float()
            out[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_native": err}
            print(f"  {name:32s} {ms:8.2f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  rel err vs native {err:.2e}")
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name:32s} FAILED {type(e).__name__}: {str(e)[:300]}")
        del params
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="conf/model/1.3b.yaml",
                    help=f"a conf/model preset, or {V01_BLOCK} (v0.1 width, 8 layers; --set num_hidden_layers=N)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro batches (fwd+bwd) per optimizer step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--which", default="jambatrain,hf")
    ap.add_argument("--moe-bench", action="store_true")
    ap.add_argument("--moe-experts", type=int, default=16)
    ap.add_argument("--moe-topk", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--jt-variants", default="opt",
                    help="comma list of jambatrain variants to time (see variant_config), e.g. base,layout,opt; "
                         "opt,opt+fp8 times bf16 and FP8 side by side")
    ap.add_argument("--moe-repeats", type=int, default=2, help="times the MoE table is measured (spread = noise)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("bench/throughput.py times training on a CUDA GPU and none is visible here "
                         "(torch.cuda.is_available() is False); run it on a GPU machine. The presets and variants "
                         "load on CPU: python -m jambatrain.plan, tests/test_bench_cpu.py")
    cfg = load_cfg(args.model, args.set)
    with torch.device("meta"):  # parameter counts without allocating
        meta = JambaLM(cfg)
    flops = flops_per_token(cfg, args.seq)
    fpt, fsrc = float(flops["training"]), "jambatrain.flops"
    import transformers

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"model {cfg.name}: {meta.num_params() / 1e9:.3f} B params ({meta.num_active_params() / 1e9:.3f} B active),"
          f" layers {cfg.layer_pattern()}")
    print(json.dumps(dataclasses.asdict(cfg)))
    print(f"training FLOPs/token at seq {args.seq}: {fpt / 1e9:.2f} GFLOP ({fsrc}); "
          f"forward breakdown {_flop_parts(flops)}")
    print(f"kernels: {ssm_ops.kernels_available()}, megablocks: {moe_backends.megablocks_available()}", flush=True)
    del meta

    results = {"config": dataclasses.asdict(cfg), "flops_per_token": fpt, "flops_source": fsrc}
    if args.moe_bench:
        results["moe"] = [moe_bench(cfg, args.batch * args.seq, args.moe_experts, args.moe_topk)
                          for _ in range(args.moe_repeats)]
    runs = []
    for kind in [k for k in args.which.split(",") if k]:
        if kind == "jambatrain":
            runs += [("jambatrain", v) for v in args.jt_variants.split(",") if v]  # in the order given
        else:
            runs.append((kind, ""))
    kinds = []
    for kind, variant in runs:
        try:
            r = run_model_fit(kind, cfg, args.seq, args.batch, args.steps, args.warmup,
                              args.profile and (variant in ("opt", "") or "fp8" in variant or "blocks" in variant),
                              variant or "opt",
                              args.grad_accum if kind == "jambatrain" else 1)
        except RuntimeError as e:  # out of memory even at batch 1: the other rows still run
            print(f"[{kind}:{variant}] FAILED: {str(e)[:300]}", flush=True)
            results[f"{kind}[{variant}]"] = {"error": str(e)[:1000]}
            gc.collect()
            torch.cuda.empty_cache()
            continue
        r["mfu"] = fpt * r["tokens_per_s"] / PEAK_BF16  # against the bf16 peak, FP8 rows included
        r["fwd_bwd_mfu"] = fpt * r["fwd_bwd_tokens_per_s"] / PEAK_BF16
        key = kind if variant in ("opt", "") else f"jambatrain[{variant}]"
        kinds.append(key)
        results[key] = r
        print(f"[{key}] batch {r['batch']}x{r['seq']} x{r['grad_accum']} accum: {r['step_ms']:.1f} ms/step, "
              f"{r['tokens_per_s']:,.0f} tokens/s full step, {r['fwd_bwd_tokens_per_s']:,.0f} fwd+bwd, "
              f"MFU(bf16 peak) {r['mfu']:.1%}, peak mem {r['peak_mem_gib']:.1f} GiB, warm-up {r['warmup_s']:.0f} s, loss {r['loss_first_last'][0]:.3f}"
              f"->{r['loss_first_last'][1]:.3f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    if not kinds:
        return
    print(f"\nsummary (grad accumulation {args.grad_accum} for jambatrain; MFU against the bf16 peak "
          f"{PEAK_BF16 / 1e12:.0f} TFLOP/s, FP8 rows included)")
    print(f"{'model':28s} {'batch':>5s} {'fwd+bwd tok/s':>14s} {'step tok/s':>12s} {'MFU(bf16)':>9s} {'peak GiB':>9s}")
    for kind in kinds:
        r = results[kind]
        print(f"{kind:28s} {r['batch']:5d} {r['fwd_bwd_tokens_per_s']:14,.0f} {r['tokens_per_s']:12,.0f} "
              f"{r['mfu']:9.1%} {r['peak_mem_gib']:9.1f}")
    base = results.get("jambatrain")
    for kind in kinds:
        if base and ("fp8" in kind or "blocks" in kind):
            r = results[kind]
            print(f"speedup {kind} / jambatrain(bf16 opt): fwd+bwd {r['fwd_bwd_tokens_per_s'] / base['fwd_bwd_tokens_per_s']:.2f}x, "
                  f"full step {r['tokens_per_s'] / base['tokens_per_s']:.2f}x, peak mem {r['peak_mem_gib']:.1f} vs "
                  f"{base['peak_mem_gib']:.1f} GiB")
    if "jambatrain" in results and "hf" in results:
        print(f"ratio jambatrain/hf = {results['jambatrain']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
