"""Worker for tests/test_expert_parallel.py, run by torchrun on CPU (gloo). Rank 0 prints ``RESULT <json>``.

  dispatch             the EP MoE layer against one process holding all experts, for every ep dividing the world:
                       outputs, input grads, router and expert grads; top-1 and top-2; an expert no token picks
  step STAGE EP        one jambatrain model trained GAS x micro steps by the real engine (ZeRO-STAGE, expert
                       parallel EP, clipping, grad accumulation) against one process on the same global batch
  save STAGE EP DIR    train STEPS_A steps and write a checkpoint into DIR (jambatrain.checkpoint.save)
  load STAGE EP DIR    a differently initialised engine loads DIR, trains STEPS_B steps; compared with one process
                       that trained STEPS_A + STEPS_B steps. SKIP_MOMENTS=1 (negative control) drops the moments;
                       SAVE_AFTER=DIR2 then writes a checkpoint into DIR2.
  hooks                every hook of jambatrain/parallel/ds_compat.py on a real engine per ZeRO stage and precision
                       (tests/test_ds_compat.py)
  guard STAGE EP       the step guard through the trainer's train_step: a NaN loss on rank 1, then a loss spike on
                       rank 0, are skipped on both ranks (weights, Adam state and LR schedule unchanged); the next
                       clean step applies; max_skipped_steps skips in a row stop the run
The global batch is NS sequences per step whatever the world size: rank r takes sequences r*GAS .. (r+1)*GAS-1.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from jambatrain import checkpoint
from jambatrain.config import ParallelConfig, TrainConfig
from jambatrain.models import JambaLM, ModelConfig
from jambatrain.models.moe import MoE, route
from jambatrain.models.moe_backends import experts_forward_native
from jambatrain.optim import build_optimizer, build_scheduler, param_groups
from jambatrain.parallel import build_deepspeed_config, build_engine, expert_parallel, init_distributed

NS, SEQ, VOCAB = 4, 16, 64
MODEL = ModelConfig(name="ep", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1,
                    expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                    mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_impl="reference", moe_impl="native",
                    compile_elementwise=False, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)


def max_err(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# ---------------------------------------------------------------- dispatch
def dispatch(rank: int, world: int) -> dict:
    out = {}
    H, F, E, T = 16, 24, 8, 12
    for ep in [e for e in (1, 2, 4) if world % e == 0]:
        info = expert_parallel.create_groups(ep) if ep > 1 else None
        for k in (1, 2):
            torch.manual_seed(0)  # the same full layer on every rank
            cfg = ModelConfig(hidden_size=H, intermediate_size=F, num_experts=E, num_experts_per_tok=k,
                              compile_elementwise=False, moe_impl="native")
            full = MoE(cfg)
            for w in (full.router.weight, full.w_gate, full.w_up, full.w_down):
                torch.nn.init.normal_(w, 0, 0.3)
            with torch.no_grad():  # feature 0 of every token is 1 (below): these weights act as router biases
                full.router.weight[:, 0] = 0.0
                full.router.weight[4:6, 0] = -100.0  # experts 4 and 5 get no token: at ep = 4, a rank receives none
            # every rank's tokens, and the upstream gradient, from one generator: the reference sees them all
            g = torch.Generator().manual_seed(123)
            xs = [torch.randn(T + 3 * r, H, generator=g) for r in range(world)]  # uneven token counts per rank
            for x in xs:
                x[:, 0] = 1.0
            gys = [torch.randn(T + 3 * r, H, generator=g) for r in range(world)]
            layer = MoE(cfg)
            layer.load_state_dict(full.state_dict())
            if info is not None:
                wrapper = torch.nn.Module()
                wrapper.moe = layer
                expert_parallel.apply(wrapper, info)
            x = xs[rank].clone().requires_grad_()
            y, _ = layer(x)
            (y * gys[rank]).sum().backward()
            # the reference: the same weights, every rank's tokens in one process (router as on each rank)
            ref = MoE(cfg)
            ref.load_state_dict(full.state_dict())
            errs = {"y": 0.0, "x_grad": 0.0}
            for r in range(world):
                xr = xs[r].clone().requires_grad_()
                yr, _ = ref(xr)
                (yr * gys[r]).sum().backward()
                if r == rank:
                    errs["y"], errs["x_grad"] = max_err(y, yr), max_err(x.grad, xr.grad)
            lo, hi = layer.expert_range
            for name in ("w_gate", "w_up", "w_down"):
                grad = getattr(layer, name).grad.clone()
                if info is not None:  # summed over the ranks holding the same experts
                    dist.all_reduce(grad, group=info.edp_group)
                else:
                    dist.all_reduce(grad)
                errs[name] = max_err(grad, getattr(ref, name).grad[lo:hi]) / getattr(ref, name).grad.abs().max().item()
            errs["empty_expert_grad"] = max([getattr(layer, n).grad[e - lo].abs().max().item() for n in
                                             ("w_gate", "w_up", "w_down") for e in (4, 5) if lo <= e < hi] or [0.0])
            errs["received"] = layer.ep_stats.received if info is not None else None
            gathered = [None] * world
            dist.all_gather_object(gathered, errs)
            out[f"ep{ep}_top{k}"] = gathered
    return out


# ---------------------------------------------------------------- engine steps
def batch(i: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + i)
    ids = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def train_config(stage: int, ep: int, gas: int) -> TrainConfig:
    cfg = TrainConfig(model=MODEL, parallel=ParallelConfig(zero_stage=stage, micro_batch_size=1, grad_accum_steps=gas,
                                                           expert_parallel_size=ep, device="cpu", precision="fp32"))
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.weight_decay = 1e-2, 0, 0.05, 0.1
    return cfg


def build(stage: int, ep: int, seed: int, dist_info):
    world = dist.get_world_size()
    cfg = train_config(stage, ep, NS // world)
    ds = build_deepspeed_config(cfg, world, torch.device("cpu"))
    ds["zero_optimization"].update(reduce_bucket_size=200, allgather_bucket_size=200)  # many buckets
    info = expert_parallel.create_groups(ep) if ep > 1 else None
    model = fresh_model(seed, info)
    return build_engine(model, cfg, dist_info, ds, info), model, info, cfg


def fresh_model(seed: int, info=None) -> JambaLM:
    """As the trainer builds it: on the meta device, sharded by expert, materialised, initialised from ``seed``."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = JambaLM(MODEL)
    if info is not None:
        expert_parallel.apply(model, info)
    model.to_empty(device="cpu")
    if info is not None:
        expert_parallel.mark_expert_params(model, info)
    model.init_weights()
    return model


def run_steps(engine, first: int, steps: int) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    gas = NS // world
    norms = []
    for s in range(first, first + steps):
        for m in range(gas):
            ids, labels = batch(rank * gas + m, s)
            engine.backward(engine(input_ids=ids, labels=labels).loss)
            engine.step()
        g = engine.get_global_grad_norm()  # None under ZeRO-0 in fp32 (no norm is taken without clipping code)
        norms.append(None if g is None else float(g))
    return norms


def reference(steps: int, cfg: TrainConfig) -> tuple[JambaLM, list[float]]:
    """One process, all experts, the whole global batch; the same loss, clipping and AdamW."""
    model = fresh_model(0)
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, fused=False)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    norms = []
    for s in range(steps):
        opt.zero_grad()
        for i in range(NS):
            ids, labels = batch(i, s)
            (model(input_ids=ids, labels=labels).loss / NS).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        opt.step()
        sched.step()
    return model, norms


def compare(model, ref, engine=None, ref_opt_state=None) -> dict:
    """Largest |difference| of every parameter against the reference's (this rank's experts of it)."""
    errs = {}
    refs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = refs[name]
        rng = checkpoint.expert_range(model, name)
        if rng is not None:
            r = r[rng[0]:rng[1]]
        errs[name] = max_err(p, r)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, max(errs.values()))
    return {"max_param_err": max(gathered), "worst": max(errs, key=errs.get)}


def guard_case(stage: int, ep: int, dist_info) -> dict:
    import dataclasses

    from jambatrain.parallel.ds_compat import install_skip_hook
    from jambatrain.step_guard import StepGuard
    from jambatrain.train import train_step

    rank = dist.get_rank()
    engine, model, _, cfg = build(stage, ep, 0, dist_info)
    cfg.data.doc_mask = False
    gas = cfg.parallel.grad_accum_steps
    poison = {"factor": None, "rank": None}

    def hook(module, args, out):
        if poison["factor"] is not None and rank == poison["rank"]:
            return dataclasses.replace(out, loss=out.loss * poison["factor"])
        return out

    model.register_forward_hook(hook)
    guard = StepGuard(engine, spike_factor=5.0, spike_warmup=1, max_skipped=3)
    install_skip_hook(engine.optimizer, guard.skip_requested)  # as train.setup does
    step = [0]

    def batches():
        while True:
            for m in range(gas):
                ids, labels = batch(rank * gas + m, step[0])
                yield {"input_ids": ids, "labels": labels}
            step[0] += 1

    it = batches()
    def snapshot():  # fp32 masters and Adam moments, whole (collectives: every rank calls it)
        return checkpoint.optimizer_states(engine, model)

    def same(a, b):
        diff = [(n, k, a[n][k].flatten()[:3].tolist(), b[n][k].flatten()[:3].tolist()) for n in a for k in a[n]
                if not torch.equal(a[n][k], b[n][k])]
        if diff and os.environ.get("DEBUG"):
            print("DIFF", rank, len(diff), diff[:3], flush=True)
        return not diff

    out = {}
    for s in range(2):  # two good steps: the running mean exists
        _, reason = train_step(engine, it, guard, cfg, dist_info)
        assert reason is None, reason
    for name, factor, who in (("nan", float("nan"), 1), ("spike", 100.0, 0)):
        before, sched = snapshot(), engine.lr_scheduler.last_epoch
        poison.update(factor=factor, rank=who)
        _, reason = train_step(engine, it, guard, cfg, dist_info)
        poison.update(factor=None)
        out[name] = {"reason": reason, "unchanged": same(before, snapshot()),
                     "sched_unchanged": engine.lr_scheduler.last_epoch == sched, "skipped": engine.skipped_steps}
    before = snapshot()
    _, reason = train_step(engine, it, guard, cfg, dist_info)
    out["clean"] = {"reason": reason, "changed": not same(before, snapshot())}
    poison.update(factor=float("inf"), rank=1)
    try:
        for _ in range(3):
            train_step(engine, it, guard, cfg, dist_info)
        out["stopped"] = None
    except SystemExit as exc:
        out["stopped"] = str(exc)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    return {"ranks": gathered}


def hooks_case(dist_info) -> dict:
    """Each private DeepSpeed hook (jambatrain/parallel/ds_compat.py) doing its job on a real engine of every ZeRO
    stage: the skip hook's path, a forced skip leaving masters, moments and schedule unchanged and counted; the Adam
    state of every parameter group reachable after a step (re-link); the fp32 partitions; which parameters have a
    ZeRO fragment; the schedule position; the expert groups."""
    from jambatrain.parallel import ds_compat

    out = {}
    for stage, precision in ((0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16-fp32acc")):
        cfg = train_config(stage, 1, NS // dist.get_world_size())
        cfg.parallel.precision = precision.split("-")[0]
        ds = build_deepspeed_config(cfg, dist.get_world_size(), torch.device("cpu"))
        if precision == "bf16-fp32acc":  # the one layout that makes DeepSpeed pick its BF16_Optimizer
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        model = fresh_model(0)
        engine = build_engine(model, cfg, dist_info, ds)
        skip = [False]
        path = ds_compat.install_skip_hook(engine.optimizer, lambda: skip[0])
        run_steps(engine, 0, 1)
        before, epoch, skipped = checkpoint.optimizer_states(engine, model), engine.lr_scheduler.last_epoch, \
            engine.skipped_steps
        skip[0] = True
        run_steps(engine, 1, 1)
        after, held = checkpoint.optimizer_states(engine, model), engine.lr_scheduler.last_epoch == epoch
        skip[0] = False
        run_steps(engine, 2, 1)
        applied = checkpoint.optimizer_states(engine, model)
        flats = ds_compat.fp32_partitions(engine)
        ds_compat.set_schedule_position(engine, 7, 5)
        out[f"zero{stage}_{precision}"] = {
            "path": path,
            "skip_unchanged": all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n]),
            "optimizer": type(engine.optimizer).__name__,
            "skip_counted": engine.skipped_steps - skipped, "schedule_held": held,
            "applied_changed": any(not torch.equal(after[n]["fp32"], applied[n]["fp32"]) for n in after),
            # every parameter group's moments reachable (without the re-link, the later groups' read as zeros)
            "moments_everywhere": all(bool(v["exp_avg_sq"].abs().sum() > 0) for v in applied.values()),
            "fp32_partitions": None if flats is None else len(flats),
            "zero0_masters": _zero0_masters(engine, model),
            "adam_step": checkpoint._adam_step(engine),  # two steps applied, one skipped
            "fragments": sorted({ds_compat.has_fp32_fragment(p) for p in model.parameters()}),
            "schedule_position": [engine.global_steps, engine.lr_scheduler.last_epoch,
                                  engine.get_lr()[0] == cfg.optim.lr * engine.lr_scheduler.lr_lambdas[0](5)]}
    out["expert_groups"] = {k: v for k, v in ds_compat.expert_groups(dist.get_world_size()).items()
                            if k in ("name", "rank", "edp_rank")}
    return out


def _zero0_masters(engine, model) -> dict:
    """ds_compat.zero0_fp32_masters on a real engine: how many parameters have an fp32 master apart from them, and
    whether each is fp32, of its parameter's shape, what the torch optimizer steps (holds Adam state), and the value
    its (bf16) parameter was last set from."""
    from jambatrain.parallel import ds_compat

    masters = ds_compat.zero0_fp32_masters(engine)
    stepped = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    state = getattr(engine.optimizer, "optimizer", engine.optimizer).state
    return {"count": len(masters), "all_params": len(masters) == len(list(model.parameters())),
            "consistent": all(m.dtype == torch.float32 and m.shape == p.shape and id(m) in stepped and
                              "exp_avg" in state[m] and torch.equal(m.to(p.dtype), p) for p, m in masters.items())}


def savefail_case(stage: int, ep: int, dist_info, run_dir: str) -> dict:
    """A checkpoint whose write fails on rank 1 (a full disk, as torch.save reports it) is not published: both ranks
    stop with the path and the reason, the partial tag is gone, the previous checkpoint stays the newest."""
    engine, model, info, cfg = build(stage, ep, 0, dist_info)
    rank, world = dist.get_rank(), dist.get_world_size()
    par = {"world_size": world, "zero_stage": stage, "expert_parallel_size": ep, "global_batch": NS}
    run_steps(engine, 0, 1)
    checkpoint.save(engine, model, run_dir, checkpoint.TrainState(step=1, parallel=par), rank, keep=3, ep=info)
    run_steps(engine, 1, 1)
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if rank == 1 and "params_r" in getattr(f, "name", ""):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
        return real(obj, f, *args, **kwargs)

    torch.save = full_disk
    try:
        checkpoint.save(engine, model, run_dir, checkpoint.TrainState(step=2, parallel=par), rank, keep=3, ep=info)
        message = None
    except SystemExit as exc:
        message = str(exc)
    torch.save = real
    return {"message": message, "tags": sorted(os.listdir(os.path.join(run_dir, "checkpoints"))),
            "latest": checkpoint.latest_tag(run_dir)}


def main() -> None:
    dist_info = init_distributed(ParallelConfig(device="cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    mode = sys.argv[1]
    if mode == "dispatch":
        result = dispatch(rank, world)
    elif mode == "hooks":
        result = hooks_case(dist_info)
    else:
        stage, ep = int(sys.argv[2]), int(sys.argv[3])
        if mode == "guard":
            result = guard_case(stage, ep, dist_info)
        elif mode == "savefail":
            result = savefail_case(stage, ep, dist_info, sys.argv[4])
        elif mode == "step":
            engine, model, _, cfg = build(stage, ep, 0, dist_info)
            norms = run_steps(engine, 0, 2)
            ref, ref_norms = reference(2, cfg)
            result = {**compare(model, ref), "norms": norms, "ref_norms": ref_norms}
        elif mode == "save":
            engine, model, info, cfg = build(stage, ep, 0, dist_info)
            a = int(os.environ.get("STEPS_A", "2"))
            run_steps(engine, 0, a)
            st = checkpoint.TrainState(step=a, parallel={"world_size": world, "zero_stage": stage,
                                                         "expert_parallel_size": ep, "global_batch": NS})
            checkpoint.save(engine, model, sys.argv[4], st, rank, keep=3, ep=info)
            result = {"saved": sorted(os.listdir(os.path.join(sys.argv[4], "checkpoints", f"step_{a:08d}")))}
        else:  # load
            engine, model, info, cfg = build(stage, ep, 7, dist_info)  # another init: everything must come from disk
            tag = checkpoint.latest_tag(sys.argv[4])
            if os.environ.get("SKIP_MOMENTS"):
                checkpoint.ADAM_KEYS = ()  # negative control: moments not restored (stay zero)
            state = checkpoint.load(engine, model, sys.argv[4], tag, rank)
            b = int(os.environ.get("STEPS_B", "1"))
            run_steps(engine, state.step, b)
            ref, _ = reference(state.step + b, cfg)
            result = {**compare(model, ref), "resumed_at": state.step}
            if os.environ.get("SAVE_AFTER"):  # for the bit-exact comparison with an uninterrupted run
                st = checkpoint.TrainState(step=state.step + b, parallel=state.parallel)
                checkpoint.save(engine, model, os.environ["SAVE_AFTER"], st, rank, keep=3, ep=info)
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined before exit


if __name__ == "__main__":
    main()
