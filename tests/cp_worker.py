"""Worker for tests/test_context_parallel.py, run by torchrun on CPU (gloo). Rank 0 prints ``RESULT <json>``.

  model [CONTROL]   for every (cp, case) the world allows: the model with context parallelism against one process
                    running the whole sequences: the logits of each slice, the loss, and every parameter gradient
                    (summed over the world and divided by it, as DeepSpeed reduces). CONTROL: ``nohalo`` (the conv
                    gets zeros instead of the previous rank's tokens) or ``rankmean`` (each rank's loss is the mean
                    over its own slice): negative controls that must fail.
  step STAGE        two optimizer steps of the real DeepSpeed engine (ZeRO-STAGE, cp = world, grad accumulation 2,
                    clipping) against one process on the same global batch.
Errors are relative: max |a - b| / max |b|.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from jambatrain.config import ParallelConfig, TrainConfig
from jambatrain.models import JambaLM, ModelConfig
from jambatrain.optim import build_optimizer, build_scheduler, param_groups
from jambatrain.parallel import (build_deepspeed_config, build_engine, context_parallel, expert_parallel,
                                 init_distributed)
from jambatrain.parallel.parallel_dims import build as build_dims

SEQ, VOCAB = 32, 64
BASE = dict(name="cp", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1,
            num_experts=1, num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
            mamba_impl="reference", moe_impl="native", compile_elementwise=False)
MOE = dict(expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
           router_aux_loss_coef=0.01, router_z_loss_coef=0.001)


def rel(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item() / max(b.detach().float().abs().max().item(),
                                                                               1e-12)


def sample(j: int, doc: bool):
    """Sequence j of the batch: ids, labels with unevenly placed ignored (-100) positions, document starts that fall
    on rank boundaries, inside a conv halo and anywhere."""
    g = torch.Generator().manual_seed(100 + j)
    ids = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, : 3 + 2 * j] = -100  # the first slice has far fewer labelled tokens than the others
    labels[:, 20] = -100
    starts = None
    if doc:
        starts = torch.zeros(1, SEQ, dtype=torch.bool)
        starts[:, [0, 5, 8, 15, 17, 26]] = True  # 8, 16 and 24 are the slice edges at cp 4; 15, 17 sit next to them
        starts[:, 9 + j] = True
    return ids[:, :-1], labels, starts


def model_case(cp: int, case: str, control: str | None, rank: int, world: int) -> dict:
    mcfg = ModelConfig(**{**BASE, **(MOE if "moe" in case else {}), **({"use_rope": True} if "rope" in case else {}),
                          **({"activation_checkpointing": "full", "loss_chunk_tokens": 5} if "recompute" in case
                             else {})})
    doc = "doc" in case
    ep = 2 if "moe" in case else 1
    torch.manual_seed(0)
    full = JambaLM(mcfg)
    ref = copy.deepcopy(full)
    ep_info = expert_parallel.create_groups(ep) if ep > 1 else None
    model = full
    if ep_info is not None:
        expert_parallel.apply(model, ep_info)
    dims = build_dims(world, rank, cp, ep)
    assert context_parallel.apply(model, dims) > 0
    # the reference: each dp replica's sequence through one process; the loss is the mean over the replicas
    ref_losses, ref_logits = [], []
    for j in range(dims.dp):
        ids, labels, starts = sample(j, doc)
        out = ref(ids, labels=labels, doc_starts=starts)
        ref_losses.append(out.loss)
        ref_logits.append(out.logits)
    (sum(ref_losses) / dims.dp).backward()
    cpg = context_parallel.CPGroup(dims.cp_group, dims.cp_rank, dims.cp)
    ids, labels, starts = sample(dims.dp_rank, doc)
    local = context_parallel.shard_batch({"input_ids": ids, "labels": labels, "doc_starts": starts}, cpg)
    model.train()
    out = model(local["input_ids"], labels=local["labels"], doc_starts=local["doc_starts"],
                return_logits="recompute" not in case)
    out.loss.backward()
    errs = {"logits": 0.0 if out.logits is None else rel(out.logits, context_parallel.local_slice(
                ref_logits[dims.dp_rank], cpg)),
            "loss": rel(out.loss, ref_losses[dims.dp_rank])}
    refs = dict(ref.named_parameters())
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        r = refs[name].grad
        if getattr(p, "allreduce", True) is False:  # an expert weight: summed over the ranks holding it
            dist.all_reduce(g, group=ep_info.edp_group)
            lo, hi = next(m.expert_range for n, m in model.named_modules() if name.startswith(n + ".") and
                          hasattr(m, "expert_range"))
            r = r[lo:hi]
        else:
            dist.all_reduce(g)
        grads[name] = rel(g / world, r)
    errs["grad"] = max(grads.values())
    errs["worst_grad"] = max(grads, key=grads.get)
    gathered = [None] * world
    dist.all_gather_object(gathered, errs)
    return {k: max(e[k] for e in gathered) if k != "worst_grad" else gathered[0][k] for k in errs}


def model_mode(rank: int, world: int, control: str | None) -> dict:
    if control == "nohalo":
        context_parallel.previous_tail = lambda t, width, cp: torch.zeros_like(t[..., :width])
    elif control == "rankmean":
        context_parallel.cp_sum = lambda x, cp: x
    cases = {2: ["plain", "doc", "moe_doc", "recompute_doc"], 4: ["plain", "doc", "rope_doc"]} \
        if world == 2 or control else \
        {2: ["plain", "doc"], 4: ["plain", "doc", "rope_doc"]}
    out = {}
    for cp in (2, 4):
        if world % cp:
            continue
        for case in cases[cp]:
            if control and case != "doc":
                continue
            out[f"cp{cp}_{case}"] = model_case(cp, case, control, rank, world)
    return out


# ---------------------------------------------------------------- engine steps (cp = world, dp = 1)
GAS, STEPS = 2, 2


def step_mode(rank: int, world: int, stage: int, dist_info) -> dict:
    mcfg = ModelConfig(**BASE)
    cfg = TrainConfig(model=mcfg, parallel=ParallelConfig(zero_stage=stage, micro_batch_size=1, grad_accum_steps=GAS,
                                                          context_parallel_size=world, device="cpu", precision="fp32"))
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.weight_decay = 1e-2, 0, 0.05, 0.1
    dims = build_dims(world, rank, world)
    ds = build_deepspeed_config(cfg, world, torch.device("cpu"))
    ds["zero_optimization"].update(reduce_bucket_size=200, allgather_bucket_size=200)
    torch.manual_seed(0)
    model = JambaLM(mcfg)
    ref = copy.deepcopy(model)
    context_parallel.apply(model, dims)
    engine = build_engine(model, cfg, dist_info, ds)
    cpg = context_parallel.CPGroup(dims.cp_group, dims.cp_rank, dims.cp)
    losses = []
    for s in range(STEPS):
        for m in range(GAS):
            ids, labels, starts = sample(10 * s + m, True)
            b = context_parallel.shard_batch({"input_ids": ids, "labels": labels, "doc_starts": starts}, cpg)
            out = engine(input_ids=b["input_ids"], labels=b["labels"], doc_starts=b["doc_starts"])
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
    opt = build_optimizer(param_groups(ref, cfg.optim.weight_decay), cfg.optim, fused=False)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    ref_losses = []
    for s in range(STEPS):
        opt.zero_grad()
        for m in range(GAS):
            ids, labels, starts = sample(10 * s + m, True)
            loss = ref(ids, labels=labels, doc_starts=starts).loss
            ref_losses.append(loss.item())
            (loss / GAS).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    refs = dict(ref.named_parameters())
    err = max(rel(p, refs[n]) for n, p in model.named_parameters())
    gathered = [None] * world
    dist.all_gather_object(gathered, err)
    return {"max_param_err": max(gathered), "losses": losses, "ref_losses": ref_losses}


def main():
    dist_info = init_distributed(ParallelConfig(device="cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    mode = sys.argv[1]
    if mode == "model":
        result = model_mode(rank, world, sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        result = step_mode(rank, world, int(sys.argv[2]), dist_info)
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined before exit (a rank aborted at exit without it, once, in CI)


if __name__ == "__main__":
    main()
