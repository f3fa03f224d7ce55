"""Worker for tests/test_fp8_experts.py: FP8 with FP8 experts under expert parallelism against the same FP8 model in
one process, run by torchrun on CPU (gloo). Rank 0 prints ``RESULT <json>``.

Each rank builds the model by the trainer's ``build_model`` (meta, ``expert_parallel.apply``, materialised,
``float8.convert`` with the ZeRO-2 weight cache; then bf16), so the experts run ``grouped_fp8`` through the real
``exchange`` on the local (E/ep, ffn, hidden) block. The reference, on every rank: ep 1, every expert, the same
weights, no weight cache, fed every rank's micro batches one after another (what the ranks' gradient sum is). The
dense Float8Linears run torchao's code (``torch._scaled_mm`` runs on CPU); the FP8 grouped GEMMs run
tests/fp8_ref_kernels.py in place of torchao's Triton kernels and ``torch._scaled_grouped_mm``, and the MoE layers
take ``grouped_fp8`` on CPU (which ``moe_backends.decide`` refuses off CUDA). Two optimizer steps of MICRO micro
batches each; after the first the reference's updated weights are written into both models in place (same storage,
so only ``float8.optimizer_stepped`` can make the cache re-cast them). Then one optimizer step of the trainer's
DeepSpeed engine (``engine_case``: ZeRO-2, bf16, expert parameter groups) on the reference's weights.

BREAK (negative controls): ``slice`` the EP ranks hold the other rank's experts; ``tag`` rank 1's MoE layers run
without the FP8 tag (bf16 experts); ``stale`` the EP model's cache is not told of the optimizer step."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp8_ref_kernels  # noqa: E402
from conftest import randomize  # noqa: E402

from jambatrain.config import ParallelConfig  # noqa: E402
from jambatrain.models import JambaLM, ModelConfig, moe_backends  # noqa: E402
from jambatrain.models.moe import MoE  # noqa: E402
from jambatrain.parallel import expert_parallel, init_distributed  # noqa: E402
from jambatrain.quantization import float8  # noqa: E402
from jambatrain.train import build_model  # noqa: E402

SEQ, VOCAB, MICRO, STEPS, LR = 16, 64, 2, 2, 0.5
MODEL = ModelConfig(name="fp8ep", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1,
                    expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                    mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_impl="reference", moe_impl="grouped",
                    compile_elementwise=False, fused_rms_norm=False, fp8="tensorwise", fp8_experts=True,
                    router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
EXPERT = ("w_gate", "w_up", "w_down")


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    ids = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def build(cfg: ModelConfig, dist_info, ep=None) -> JambaLM:
    """The trainer's ``build_model`` under ZeRO-2 (meta, sharded by expert, materialised, initialised, FP8
    converted with the weight cache), then bf16, as DeepSpeed's bf16 engine casts it."""
    torch.manual_seed(0)
    return build_model(cfg, dist_info, {"zero_optimization": {"stage": 2}}, ep).to(torch.bfloat16)


@torch.no_grad()
def load_from(model: JambaLM, ref: JambaLM, swap: bool = False) -> None:
    """``ref``'s weights into ``model`` in place (this rank's experts of the stacks; ``swap``: the other half)."""
    refs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = refs[name]
        owner, _, leaf = name.rpartition(".")
        m = model.get_submodule(owner)
        if isinstance(m, MoE) and leaf in EXPERT:
            lo, hi = m.expert_range
            if swap:
                n = m.num_experts
                lo, hi = (lo + n // 2) % n, (hi + n // 2 - 1) % n + 1
            r = r[lo:hi]
        p.copy_(r)


def accumulate(model: JambaLM, acc: dict) -> None:
    for name, p in model.named_parameters():
        acc[name] = acc.get(name, 0) + p.grad.float()
        p.grad = None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def case(wgrad: str, dist_info, ep_info, rank: int, world: int, brk: str) -> dict:
    cfg = dataclasses.replace(MODEL, fp8_expert_wgrad=wgrad)
    model = build(cfg, dist_info, ep_info)
    # the reference: every expert, no cache; random weights (experts that matter, sharp routing), copied to model
    ref = randomize(build(dataclasses.replace(cfg, fp8_cache_weights=False), dist_info))
    load_from(model, ref, swap=brk == "slice")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(m.fp8 and m.exchange is not None for m in moes)
    if brk == "tag" and rank == 1:
        for m in moes:
            m.fp8, m.impl = False, "native"  # bf16 experts (the per-expert loop: the grouped ones need CUDA)
    cache = float8.weight_cache(model)
    assert cache is not None and float8.weight_cache(ref) is None
    ran.clear()
    err = {"loss": 0.0, "logits": 0.0, "dense_grad": 0.0, "expert_grad": 0.0}
    worst = {}
    casts = []
    for step in range(STEPS):
        acc, ref_acc = {}, {}  # gradients accumulated in fp32 (as DeepSpeed's bf16 ZeRO does): no bf16 sum order
        for micro in range(MICRO):
            ids, labels = batch(rank, step, micro)
            out = model(ids, labels=labels)
            out.loss.backward()
            accumulate(model, acc)
            for r in range(world):  # every rank's micro batch through the reference: the sum of the ranks' grads
                rids, rlabels = batch(r, step, micro)
                rout = ref(rids, labels=rlabels)
                rout.loss.backward()
                accumulate(ref, ref_acc)
                if r == rank:
                    err["loss"] = max(err["loss"], abs(out.loss.item() - rout.loss.item()) / abs(rout.loss.item()))
                    err["logits"] = max(err["logits"], rel(out.logits, rout.logits))
        for name, grad in acc.items():
            owner, _, leaf = name.rpartition(".")
            m = model.get_submodule(owner)
            if isinstance(m, MoE) and leaf in EXPERT:  # the owner's experts: summed over their EDP group (size 1)
                dist.all_reduce(grad, group=ep_info.edp_group)
                lo, hi = m.expert_range
                e, key = rel(grad, ref_acc[name][lo:hi]), "expert_grad"
            else:  # dense (router included): each rank's own tokens, summed over the ranks
                dist.all_reduce(grad)
                e, key = rel(grad, ref_acc[name]), "dense_grad"
            if e >= err[key]:
                err[key], worst[key] = e, name
        with torch.no_grad():  # the step: the reference's weights move, the EP model gets them in place
            for name, p in ref.named_parameters():
                p.add_(ref_acc[name].to(p.dtype), alpha=-LR)
        load_from(model, ref)
        if brk != "stale":
            float8.optimizer_stepped(model)  # the trainer's call after every optimizer step
        casts.append(cache.casts)
    return {**err, "worst": worst, "casts": casts, "ran": sorted(set(ran)), "expert_calls": len(ran)}


def engine_case(dist_info, ep_info, rank: int, world: int, brk: str) -> dict:
    """One optimizer step of MICRO micro batches by the trainer's DeepSpeed engine (build_engine: ZeRO-2, bf16, the
    expert groups) at ep 2, the weights the reference's: each micro batch's loss, and the gradient every parameter's
    AdamW step saw (its first moment after one step over 1 - beta1), against the reference's mean gradient."""
    from jambatrain import checkpoint
    from jambatrain.config import TrainConfig
    from jambatrain.parallel import build_deepspeed_config, build_engine

    cfg = TrainConfig(model=dataclasses.replace(MODEL, fp8_expert_wgrad="bf16"),
                      parallel=ParallelConfig(zero_stage=2, micro_batch_size=1, grad_accum_steps=MICRO,
                                              expert_parallel_size=world, device="cpu", precision="bf16"))
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.weight_decay = 1e-3, 0, 0.0, 0.0
    ds = build_deepspeed_config(cfg, world, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg.model, dist_info, ds, ep_info)
    ref = randomize(build(dataclasses.replace(cfg.model, fp8_cache_weights=False), dist_info))
    load_from(model, ref, swap=brk == "slice")
    engine = build_engine(model, cfg, dist_info, ds, ep_info)
    err = {"loss": 0.0, "dense_grad": 0.0, "expert_grad": 0.0}
    worst, ref_acc = {}, {}
    for micro in range(MICRO):
        ids, labels = batch(rank, 0, micro)
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        for r in range(world):
            rids, rlabels = batch(r, 0, micro)
            rout = ref(rids, labels=rlabels)
            rout.loss.backward()
            accumulate(ref, ref_acc)
            if r == rank:
                err["loss"] = max(err["loss"], abs(loss.item() - rout.loss.item()) / abs(rout.loss.item()))
    float8.optimizer_stepped(engine.module)
    states = checkpoint.optimizer_states(engine, model)
    for name, st in states.items():
        g = st["exp_avg"] / (1 - cfg.optim.beta1)  # the applied gradient: mean over ranks and micro batches
        r = ref_acc[name] / (world * MICRO)
        rng = checkpoint.expert_range(model, name)
        key = "dense_grad" if rng is None else "expert_grad"
        e = rel(g, r if rng is None else r[rng[0]:rng[1]])
        if e >= err[key]:
            err[key], worst[key] = e, name
    return {**err, "worst": worst, "global_steps": engine.global_steps}


ran: list[str] = []


def main() -> None:
    dist_info = init_distributed(ParallelConfig(device="cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    fp8_ref_kernels.install()
    real_select = moe_backends.select

    def select(impl, x, w_gate, fp8=False):  # grouped_fp8 on CPU, where decide refuses it (FP8 is CUDA-only)
        return moe_backends.BACKENDS["grouped_fp8"] if fp8 else real_select(impl, x, w_gate, fp8)

    moe_backends.select = select
    for name, backend in list(moe_backends.BACKENDS.items()):  # which expert MLPs ran, on this rank
        def expert_mlp(*args, _backend=backend, **kwargs):
            ran.append(_backend.name)
            return _backend.expert_mlp(*args, **kwargs)

        moe_backends.BACKENDS[name] = dataclasses.replace(backend, expert_mlp=expert_mlp)
    ep_info = expert_parallel.create_groups(world)
    brk = os.environ.get("BREAK", "")
    result = {}
    for wgrad in sys.argv[1:]:
        gathered = [None] * world
        dist.all_gather_object(gathered, case(wgrad, dist_info, ep_info, rank, world, brk))
        result[wgrad] = gathered
    if os.environ.get("ENGINE", "1") == "1":
        gathered = [None] * world
        dist.all_gather_object(gathered, engine_case(dist_info, ep_info, rank, world, brk))
        result["engine"] = gathered
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
