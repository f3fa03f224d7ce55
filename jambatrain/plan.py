"""Plan a run before asking a cluster for it: size, per-GPU model-state memory for each ZeRO stage, and time.

    python -m jambatrain.plan --gpus 64 --tokens 250e9 --mfu 0.35 experiment=jamba_v0_1 [more Hydra overrides]

Reads the same Hydra config the trainer would (the overrides are the trainer's), builds the model on the meta
device (no memory, no GPU), checks the config for that many GPUs, and prints:
  * parameters (total / active), layer pattern, training FLOPs per token, tokens per optimizer step;
  * model-state memory per GPU under ZeRO 0 (plain data parallel), 1, 2 and 3 with bf16 weights, fp32 master weights and fp32 Adam
    moments (the ZeRO paper's accounting: 2 + 2 + 12 bytes per parameter, the sharded part divided by the GPU
    count), with the config's expert parallelism ``ep`` (each GPU holds 1/ep of the experts; their gradients and
    optimizer state are sharded over the gpus/ep GPUs holding the same experts; ZeRO-3 rows take ep = 1, the only
    ep it runs with), and for ZeRO-3 the largest module one GPU gathers whole;
  * activation memory per GPU for the config's sequence length, micro batch, recomputation
    (``model.activation_checkpointing``), chunked loss and context parallelism (``parallel.context_parallel_size``:
    each GPU holds seq_len / cp tokens of every layer's activations): ``activation_bytes`` below, an estimate from the
    tensors each layer keeps for backward (checked against measured peaks in docs/benchmarks.md), and whether model
    states + activations fit ``--gpu-mem``; a table over every cp the GPU count allows says which cp a sequence
    length needs;
  * the time to train ``--tokens`` at ``--mfu`` of ``--peak`` FLOP/s per GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

GB = 1e9
RESERVE_GB = 4.0  # CUDA context, NCCL, allocator fragmentation, cuBLAS / kernel workspaces
MARGIN = 0.9  # "fits": within 90% of the GPU (the activation estimate is within 8% of the measured peaks)


def model_state_bytes(dense: int, zero_stage: int, gpus: int, experts: int = 0, ep: int = 1) -> dict[str, float]:
    """Per-GPU bytes of bf16 weights, bf16 gradients and fp32 optimizer state (master + Adam m, v) for ``dense``
    replicated parameters and ``experts`` expert parameters split over ``ep`` GPUs (each block's gradients and
    optimizer state then sharded over the gpus / ep GPUs holding it, as ZeRO does over the expert-data-parallel
    group): a GPU's share of a sharded state is (dense + experts) / gpus either way."""
    held = dense + experts / ep  # what one GPU holds unsharded
    spread = (dense + experts) / gpus  # one GPU's share when sharded
    shard = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}
    w_s, g_s, o_s = shard[zero_stage]
    out = {"weights": 2.0 * (spread if w_s else held), "grads": 2.0 * (spread if g_s else held),
           "optimizer": 12.0 * (spread if o_s else held)}
    out["total"] = sum(out.values())
    return out


def layer_activation_bytes(m, kind: str, cp: int = 1) -> float:
    """bf16 bytes per token one sub-layer keeps for backward (kind: "mamba", "attention", "ffn", "moe"), counted
    from the tensors our kernels save: the RMSNorm input; Mamba: in_proj's x and z (4d), the conv output, delta, the
    scan's output and y (2d each), x_proj's dt/B/C; attention (flash / flex): q, k, v, the output; SwiGLU: gate and up
    (the compiled product saves nothing more); MoE: each of the top-k rows' input copy, gate, up and output.
    Under cp (> 1) the mixers also keep their inputs in the other layout for backward: Mamba x, delta, z and y in
    the channel layout (4 x d_inner), attention q, k, v and the output in the head layout."""
    h, d, f = m.hidden_size, m.mamba_d_inner, m.intermediate_size
    norm = 2 * h
    if kind == "mamba":
        return norm + 2 * (2 * d + d + d + d + d) + 2 * (m.dt_rank + 2 * m.mamba_d_state) + (2 * 4 * d if cp > 1 else 0)
    if kind == "attention":
        kv = m.num_key_value_heads * m.head_dim * max(1, cp // m.num_key_value_heads)  # replicated KV heads
        return norm + 2 * (h + 2 * kv + h) * (2 if cp > 1 else 1) + 4 * m.num_attention_heads  # + fp32 logsumexp
    if kind == "ffn":
        return norm + 2 * 2 * f
    return norm + m.num_experts_per_tok * 2 * (h + 2 * f + h) + 4 * m.num_experts  # moe (+ fp32 router probs)


def activation_bytes(cfg, cp: int) -> dict[str, float]:
    """Per-GPU activation bytes of one micro batch (micro_batch_size x seq_len / cp tokens on each GPU): what the
    recompute policy keeps through the forward; in backward one layer's activations (rebuilt, when recomputed) plus
    the gradient of its largest tensor (in_proj's output, 4 x d_inner bytes); the logits and their gradient (bf16
    each with the compiled cross-entropy, + fp32 softmax and gradient without; one ``loss_chunk_tokens`` chunk when
    set); under cp the send and receive buffers of one all-to-all (2 x d_inner bf16 per token each)."""
    m, par = cfg.model, cfg.parallel
    tokens = par.micro_batch_size * cfg.data.seq_len / cp
    policy = str(m.activation_checkpointing)
    kept = work = 0.0
    for i in range(m.num_hidden_layers):
        mixer = layer_activation_bytes(m, "attention" if m.is_attention_layer(i) else "mamba", cp)
        ffn = layer_activation_bytes(m, "moe" if m.is_moe_layer(i) else "ffn")
        resid = 2 * m.hidden_size  # the block input (the checkpoint of a recomputed layer)
        if policy == "full":
            kept += resid
            work = max(work, mixer + ffn)
        elif policy == "ffn":
            kept += mixer + resid
            work = max(work, ffn)
        elif policy == "mixer":
            kept += ffn + resid
            work = max(work, mixer)
        else:
            kept += mixer + ffn
            work = max(work, mixer + ffn)  # the gradients of one layer in flight
    logit_tokens = min(tokens, m.loss_chunk_tokens) if m.loss_chunk_tokens else tokens
    out = {"kept": kept * tokens, "backward": (work + 4 * m.mamba_d_inner) * tokens,
           "logits": logit_tokens * m.vocab_size * (4 if m.compile_elementwise else 2 + 4 + 4),
           "cp_buffers": 2 * 2 * m.mamba_d_inner * tokens if cp > 1 else 0.0}
    out["total"] = sum(out.values())
    return out


def largest_gathered_params(model) -> int:
    """Parameters of the largest module ZeRO-3 gathers whole: a layer, the embedding or the LM head."""
    modules = [*model.layers, model.embed_tokens, model.lm_head]
    return max(sum(p.numel() for p in m.parameters()) for m in modules)


def plan(cfg, gpus: int, tokens: float, mfu: float, peak: float) -> dict:
    from .config import problems
    from .flops import flops_per_token
    from .models import JambaLM

    with torch.device("meta"):
        model = JambaLM(cfg.model)
    n, active = model.num_params(), model.num_active_params()
    experts = sum(p.numel() for name, p in model.named_parameters() if name.endswith(("w_gate", "w_up", "w_down")))
    par = cfg.parallel
    ep = par.expert_parallel_size
    if cfg.data.seq_len is None:  # data=shards leaves it to the manifest
        cfg.data.seq_len = _manifest_seq_len(cfg.data.dir)
    tokens_per_step = par.micro_batch_size * par.grad_accum_steps * cfg.data.seq_len * gpus
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["training"]
    tokens_per_s = mfu * peak * gpus / flops
    cp = par.context_parallel_size
    from .parallel.parallel_dims import ParallelDims

    m = cfg.model
    attn = any(m.is_attention_layer(i) for i in range(m.num_hidden_layers))
    cps = [c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if not ParallelDims.problems(
        gpus, c, ep, cfg.data.seq_len, m.num_attention_heads, m.num_key_value_heads, attn)]
    tokens_per_step //= cp  # a cp group shares its sequences
    return {"context_parallel_size": cp,
            "activations_gb": {c: {k: v / GB for k, v in activation_bytes(cfg, c).items()} for c in sorted({cp, *cps})},
            "params": n, "active_params": active, "layer_pattern": cfg.model.layer_pattern(),
            "flops_per_token": flops, "tokens_per_step": tokens_per_step,
            "expert_params": experts, "expert_parallel_size": ep,
            "model_state_gb": {s: {k: v / GB for k, v in model_state_bytes(n - experts, s, gpus, experts,
                                                                           1 if s == 3 else ep).items()}
                               for s in (0, 1, 2, 3)},
            "zero3_largest_gathered_gb": 2.0 * largest_gathered_params(model) / GB,
            "tokens_per_s": tokens_per_s, "days": tokens / tokens_per_s / 86400, "steps": math.ceil(tokens / tokens_per_step),
            "problems": problems(cfg, world_size=gpus), "zero_stage": par.zero_stage}


def _manifest_seq_len(data_dir: str) -> int:
    path = os.path.join(os.path.expanduser(data_dir), "manifest.json")
    try:
        with open(path) as f:
            return int(json.load(f)["seq_len"])
    except (OSError, KeyError, ValueError):
        raise SystemExit(f"jambatrain.plan: data.seq_len is unset and {path} is not readable here: pass "
                         "data.seq_len=N") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs in all")
    ap.add_argument("--tokens", type=float, default=0, help="training tokens to plan the time for")
    ap.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation to assume (measured: "
                    "docs/benchmarks.md; 0.35-0.39 for the 1.3b/7b presets on H200s)")
    ap.add_argument("--peak", type=float, default=989e12, help="per-GPU dense bf16 peak FLOP/s (H100/H200: 989e12)")
    ap.add_argument("--gpu-mem", type=float, default=141.0, help="GB of memory per GPU (H200: 141, H100: 80)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for jambatrain.train")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAMBATRAIN_RUN_DIR", os.path.join(os.getcwd(), "runs", "plan"))
    from .runs import compose_train_config

    cfg = compose_train_config(args.overrides)
    p = plan(cfg, args.gpus, args.tokens, args.mfu, args.peak)
    print(f"{cfg.name}: {p['params'] / 1e9:.2f}B parameters ({p['active_params'] / 1e9:.2f}B active), "
          f"layers [{p['layer_pattern']}]")
    print(f"  {p['flops_per_token'] / 1e9:.1f} GFLOP/token (training); {p['tokens_per_step']:,} tokens per optimizer "
          f"step on {args.gpus} GPUs")
    print(f"  model states per GPU (bf16 weights + bf16 grads + fp32 master/Adam), GB, expert parallel "
          f"{p['expert_parallel_size']} (ZeRO-3: 1); {p['expert_params'] / 1e9:.2f}B of the parameters are experts; "
          "activations come on top:")
    for s, m in p["model_state_gb"].items():
        mark = "  <- this config" if s == p["zero_stage"] else ""
        print(f"    ZeRO-{s}: {m['total']:8.1f}  (weights {m['weights']:.1f}, grads {m['grads']:.1f}, "
              f"optimizer {m['optimizer']:.1f}){mark}")
    print(f"    ZeRO-3 also gathers one module whole at a time (a layer, the embedding, the LM head): largest "
          f"{p['zero3_largest_gathered_gb']:.2f} GB in bf16")
    fixed = p["model_state_gb"][p["zero_stage"]]["total"]
    fixed += p["zero3_largest_gathered_gb"] if p["zero_stage"] == 3 else 0.0
    left = p["gb_left_per_gpu"] = args.gpu_mem - fixed
    print(f"  this config (ZeRO-{p['zero_stage']}) leaves {left:.1f} of {args.gpu_mem:.0f} GB per GPU for activations, "
          f"buffers and the allocator" + ("" if left > 0 else ": DOES NOT FIT, use more GPUs or a higher ZeRO stage"))
    m, par = cfg.model, cfg.parallel
    cp = p["context_parallel_size"]
    print(f"  activations per GPU (estimate), micro batch {par.micro_batch_size} x {cfg.data.seq_len:,} tokens, "
          f"recompute {m.activation_checkpointing}, loss chunk {m.loss_chunk_tokens or 'none'}; + "
          f"{RESERVE_GB:.0f} GB for the allocator and workspaces:")
    print("    cp   tokens/GPU  kept    backward  logits  all-to-all   total GB  with model states")
    need = None
    for c, a in p["activations_gb"].items():
        total = fixed + a["total"] + RESERVE_GB
        fits = total <= MARGIN * args.gpu_mem
        if fits and need is None:
            need = c
        mark = ("fits" if fits else "tight (within the estimate's error)" if total <= args.gpu_mem else "DOES NOT FIT")
        mark += "  <- this config" if c == cp else ""
        tokens = par.micro_batch_size * cfg.data.seq_len // c
        print(f"    {c:<4} {tokens:>10,}  {a['kept']:6.1f}  {a['backward']:8.1f}  "
              f"{a['logits']:6.1f}  {a['cp_buffers']:10.1f}  {a['total']:9.1f}  {total:7.1f}  {mark}")
    p["smallest_fitting_cp"] = need
    print(f"  smallest context-parallel size that fits {MARGIN:.0%} of {args.gpu_mem:.0f} GB: " + (
        f"parallel.context_parallel_size={need}" if need else "none of those: more GPUs, a higher ZeRO stage, more "
        "recomputation (model.activation_checkpointing=full) or a chunked loss (model.loss_chunk_tokens)"))
    if args.tokens:
        print(f"  {args.tokens:.3g} tokens at MFU {args.mfu:.0%} of {args.peak / 1e12:.0f} TFLOP/s: "
              f"{p['tokens_per_s'] / args.gpus:,.0f} tokens/s/GPU, {p['steps']:,} steps, {p['days']:.1f} days")
    for prob in p["problems"]:
        print(f"  PROBLEM: {prob}")
    return p


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)  # a PROBLEM line is a failed plan for scripts and CI
