"""Worker for tests/test_resume_precision.py, run by torchrun (one process, gloo) on CPU. Prints ``RESULT <json>``.

  exact DIR    per case (ZeRO stage, precision): an engine trains A steps, saves (jambatrain.checkpoint.save), trains
               B more and saves again; a differently initialised engine loads the first checkpoint, trains the same
               B steps and saves. Reports whether the two last checkpoints hold the same fp32 masters and Adam moments
               (bit for bit) and Adam step, what the first checkpoint holds (moments, masters finer than bf16), how
               far a ZeRO-1 engine of the same precision trained the same A steps is from it (largest difference
               relative to the largest value, per kind of tensor) and whether that engine then loads the
               checkpoint's exact state (the format is portable across stages).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from ep_worker import NS, fresh_model, run_steps, train_config
from jambatrain import checkpoint
from jambatrain.config import ParallelConfig
from jambatrain.parallel import build_deepspeed_config, build_engine, init_distributed

A, B = 2, 2
CASES = ((0, "bf16"), (0, "fp32"))


def engine_for(stage: int, precision: str, seed: int, dist_info):
    cfg = train_config(stage, 1, NS // dist.get_world_size())
    cfg.parallel.precision = precision
    ds = build_deepspeed_config(cfg, dist.get_world_size(), torch.device("cpu"))
    model = fresh_model(seed)
    return build_engine(model, cfg, dist_info, ds), model


def saved(run_dir: str, step: int) -> tuple[dict, float]:
    """{name: {fp32, exp_avg, exp_avg_sq}} of checkpoint ``step`` and its Adam step."""
    tag_dir = os.path.join(checkpoint.ckpt_root(run_dir), f"step_{step:08d}")
    with open(os.path.join(tag_dir, "manifest.json")) as f:
        manifest = json.load(f)
    out = {}
    for rel in sorted(r for r in manifest["files"] if r.startswith("params_")):
        for key, e in torch.load(os.path.join(tag_dir, rel), weights_only=True).items():
            out[key.split("@")[0]] = {k: v for k, v in e.items() if k != "where"}
    return out, manifest["adam_step"]


def same(a: dict, b: dict) -> list[str]:
    """Where two {name: {key: tensor}} differ (empty: equal bit for bit)."""
    return sorted(f"{n}.{k}" for n in a for k in a[n] if not torch.equal(a[n][k], b[n][k]))


def exact_case(stage: int, precision: str, root: str, dist_info) -> dict:
    rank = dist.get_rank()
    straight, resumed = os.path.join(root, f"straight_{stage}_{precision}"), os.path.join(root, f"resumed_{stage}_"
                                                                                          f"{precision}")
    par = {"world_size": dist.get_world_size(), "zero_stage": stage, "expert_parallel_size": 1, "global_batch": NS}
    engine, model = engine_for(stage, precision, 0, dist_info)
    run_steps(engine, 0, A)
    checkpoint.save(engine, model, straight, checkpoint.TrainState(step=A, parallel=par), rank, keep=3)
    at_a, adam_a = saved(straight, A)
    out = {
        "params": len(at_a),
        "no_moments": sorted(n for n, v in at_a.items() if not bool(v["exp_avg_sq"].abs().sum() > 0)),
        # an fp32 master is finer than bf16 somewhere (a bf16 weight read as the master is not)
        "masters_finer_than_bf16": any(not torch.equal(v["fp32"], v["fp32"].bfloat16().float())
                                       for v in at_a.values()),
    }
    try:
        norms_straight = run_steps(engine, A, B)
        checkpoint.save(engine, model, straight, checkpoint.TrainState(step=A + B, parallel=par), rank, keep=3)

        engine, model = engine_for(stage, precision, 7, dist_info)  # another init: everything must come from disk
        state = checkpoint.load(engine, model, straight, f"step_{A:08d}", rank)
        norms_resumed = run_steps(engine, state.step, B)
        checkpoint.save(engine, model, resumed, checkpoint.TrainState(step=A + B, parallel=par), rank, keep=3)
        end_straight, adam_straight = saved(straight, A + B)
        end_resumed, adam_resumed = saved(resumed, A + B)
        out.update(differ=same(end_straight, end_resumed), adam_steps=[adam_a, adam_straight, adam_resumed],
                   norms_equal=norms_straight == norms_resumed)
        # ZeRO-1 of the same precision trained the same A steps: the same state (to rounding) and Adam step
        z1, z1_model = engine_for(1, precision, 0, dist_info)
        run_steps(z1, 0, A)
        z1_state = checkpoint.optimizer_states(z1, z1_model)
        out["zero1_trained"] = {k: max((at_a[n][k] - z1_state[n][k]).abs().max().item() /
                                       max(z1_state[n][k].abs().max().item(), 1e-30) for n in at_a)
                                for k in ("fp32", "exp_avg", "exp_avg_sq")}
        out["zero1_adam_step"] = checkpoint._adam_step(z1)
        # and that engine loads the checkpoint's state exactly (the format is portable across stages)
        checkpoint.load(z1, z1_model, straight, f"step_{A:08d}", rank)
        out["zero1_load_differs"] = same(at_a, checkpoint.optimizer_states(z1, z1_model))
    except Exception as exc:  # noqa: BLE001 - reported, so that the other cases still run
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    dist_info = init_distributed(ParallelConfig(device="cpu"))
    mode, root = sys.argv[1], sys.argv[2]
    assert mode == "exact", mode
    result = {f"zero{stage}_{precision}": exact_case(stage, precision, root, dist_info) for stage, precision in CASES}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined before exit


if __name__ == "__main__":
    main()
