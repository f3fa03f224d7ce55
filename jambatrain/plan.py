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
  * the time to train ``--tokens`` at ``--mfu`` of ``--peak`` FLOP/s per GPU.
Activations are not estimated: they depend on the kernels and recomputation; docs/benchmarks.md has measured peaks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

GB = 1e9


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
    return {"params": n, "active_params": active, "layer_pattern": cfg.model.layer_pattern(),
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


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from .config import register_schema, to_train_config
    from .paths import CONF_DIR, require_configs

    require_configs()
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


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
    cfg = _compose(args.overrides)
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
    if args.tokens:
        print(f"  {args.tokens:.3g} tokens at MFU {args.mfu:.0%} of {args.peak / 1e12:.0f} TFLOP/s: "
              f"{p['tokens_per_s'] / args.gpus:,.0f} tokens/s/GPU, {p['steps']:,} steps, {p['days']:.1f} days")
    for prob in p["problems"]:
        print(f"  PROBLEM: {prob}")
    return p


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)  # a PROBLEM line is a failed plan for scripts and CI
