"""Why pure Mamba sits at chance on Zoology's MQAR: Jamba's Mamba vs a port of Zoology's, one difference at a time.

    OMP_NUM_THREADS=1 python bench/mqar_mamba_ab.py --variants jamba,zoology --steps 600 --lr 3e-3 --batch 64

Trains 2-layer d64 pure-Mamba language models (no FFN, tied embeddings, vocabulary 8192) on the easy Zoology MQAR
segments (train (64, 4) and (64, 8), from ``jambatrain.data.mqar.zoology_segment``) with AdamW + cosine to 0, loss on
the query positions only, and prints the query loss every ``--log-every`` steps (the plateau is ln 4096 = 8.32) and
the accuracy on held-out (64, 4) / (64, 8) segments at the end. One JSON line per variant goes to ``--out``.

Variants (``--variants``, comma-separated):
  jamba            ``jambatrain.models.jamba.JambaLM`` as ``experiment=zoology_mamba`` builds it
  jamba-<knob>...  the same model with knobs changed (``+``-joined; e.g. ``jamba-nonorm+zinit``):
                   nonorm: no dt/B/C RMSNorms (``model.mamba_dt_bc_norm=false``)
                   zinit:  Zoology's init (PyTorch default Linear init, out_proj kaiming / sqrt(layers))
                   lnf:    LayerNorm as the final norm (Zoology's ln_f)
                   untied: an LM head of its own (what the trainer built before JambaLM.tie_weights)
  zoology          the port of Zoology's model below (pinned HazyResearch/zoology dbcb60d: ``zoology/model.py``
                   ``LanguageModel`` with ``block_type="MambaBlock"``, ``zoology/mixers/mamba.py`` ``Mamba`` /
                   ``MambaBlock``, mamba_ssm's ``selective_scan_ref``), pure PyTorch
  zoology-<knob>   the port with a Jamba detail added: norm (dt/B/C RMSNorms), jinit (normal 0.02 init)
Training knobs: ``--wd-all`` (weight decay on every parameter, as Zoology's optimizer; default: the framework's rule,
none on norms, biases, A_log, D).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------- the port of Zoology's Mamba model
def selective_scan_port(u, delta, A, B, C, D, z, delta_bias, loop=False):
    """On CUDA with mamba-ssm importable: its ``selective_scan_fn`` kernel (the function Zoology's Mamba calls on its
    slow path); elsewhere ``selective_scan_ref``."""
    if u.is_cuda and not loop:
        from jambatrain.models import ssm_ops

        if ssm_ops.kernels_available().get("selective_scan"):
            return ssm_ops.selective_scan(u, delta, A, B.contiguous(), C.contiguous(), D, z=z, delta_bias=delta_bias,
                                          delta_softplus=True, backend="mamba-ssm")
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, loop=loop)


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, loop=False):
    """mamba_ssm's ``selective_scan_ref`` (real A, B and C per token, softplus on delta); ``loop``: its token loop
    as written there, else the same recurrence through ``linear_scan``."""
    dtype_in = u.dtype
    u, delta = u.float(), F.softplus(delta.float() + delta_bias[..., None].float())
    b, d, L = u.shape
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    if loop:
        x, ys = A.new_zeros((b, d, A.shape[1])), []
        for i in range(L):
            x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
            ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
        y = torch.stack(ys, dim=2)
    else:  # the same recurrence, x_i = deltaA_i x_{i-1} + deltaB_u_i, with an analytic backward (8x faster on CPU)
        from jambatrain.models.linear_scan import linear_scan

        y = torch.einsum("bdln,bnl->bdl", linear_scan(deltaA, deltaB_u), C.float())
    out = y + u * D[:, None]
    return (out * F.silu(z.float())).to(dtype_in)


class ZRMSNorm(nn.Module):
    """mamba_ssm's (triton) RMSNorm, eager: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ZMamba(nn.Module):
    """Zoology's ``Mamba`` (d_conv 4, expand 2, dt_rank ceil(d/16), dt in [1e-3, 0.1], conv bias, no proj bias) on
    the slow path. ``bc_norm``: Jamba's RMSNorms on dt, B, C (the A/B knob; not in Zoology)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, bc_norm=False):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = expand * d_model, d_state, math.ceil(d_model / 16)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)
        self.norms = nn.ModuleList([ZRMSNorm(self.dt_rank, 1e-6), ZRMSNorm(d_state, 1e-6), ZRMSNorm(d_state, 1e-6)]) \
            if bc_norm else None

    def forward(self, h, loop=False):
        b, L, _ = h.shape
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (b, d, l)
        x = F.silu(self.conv1d(x)[..., :L])
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.norms is not None:
            dt, B, C = self.norms[0](dt), self.norms[1](B), self.norms[2](C)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y = selective_scan_port(x, dt, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                               self.D.float(), z, self.dt_proj.bias, loop=loop)
        return self.out_proj(y.transpose(1, 2))


class ZooMambaLM(nn.Module):
    """Zoology's ``LanguageModel`` with ``MambaBlock``s: embed -> [residual add -> RMSNorm (eps 1e-5) -> Mamba] x n
    -> add -> LayerNorm (eps 1e-5) -> tied head, residual in fp32; ``_init_weights`` for block_type Mamba: Linear
    weights keep PyTorch's default init (kaiming-uniform), biases zeroed except dt_proj's, embedding N(0, 0.02),
    ``out_proj.weight`` kaiming-uniform / sqrt(n_layers). ``jamba_init``: normal(0.02) Linears and out_proj
    0.02 / sqrt(2 n_layers) instead (Jamba's ``init_weights``)."""

    def __init__(self, vocab=8192, d_model=64, n_layers=2, d_state=16, bc_norm=False, jamba_init=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(ZRMSNorm(d_model, 1e-5) for _ in range(n_layers))
        self.mixers = nn.ModuleList(ZMamba(d_model, d_state, bc_norm=bc_norm) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, ZMamba):
                    if jamba_init:
                        for lin in (m.in_proj, m.x_proj):
                            nn.init.normal_(lin.weight, std=0.02)
                        nn.init.normal_(m.out_proj.weight, std=0.02 / math.sqrt(2 * n_layers))
                    else:
                        nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
                        m.out_proj.weight /= math.sqrt(n_layers)
        self.lm_head.weight = self.embed.weight

    def hidden(self, ids):
        h, res = self.embed(ids), None
        for norm, mix in zip(self.norms, self.mixers):
            res = h if res is None else h + res
            h = mix(norm(res))
        return self.ln_f(h + res)


# ---------------------------------------------------------------- Jamba's model, and its knobs
def jamba_model(d_state: int, knobs: set[str], vocab: int = 8192, d_model: int = 64) -> nn.Module:
    from jambatrain.models.config import ModelConfig
    from jambatrain.models.jamba import JambaLM
    from jambatrain.models.mamba import MambaMixer

    kw = dict(name="zoology", vocab_size=vocab, hidden_size=d_model, intermediate_size=0, num_hidden_layers=2,
              num_attention_heads=1, num_key_value_heads=1, num_experts=1, attn_layer_period=1000,
              attn_layer_offset=999, tie_word_embeddings=True, compile_elementwise=False, mamba_d_state=d_state)
    if "nonorm" in knobs:
        kw["mamba_dt_bc_norm"] = False
    model = JambaLM(ModelConfig(**kw))
    with torch.no_grad():
        if "zinit" in knobs:
            for m in model.modules():
                if isinstance(m, MambaMixer):
                    for lin in (m.in_proj, m.x_proj):
                        lin.reset_parameters()
                    nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
                    m.out_proj.weight /= math.sqrt(model.cfg.num_hidden_layers)
        if "untied" in knobs:  # what the trainer built before the tie_weights fix: a head of its own, N(0, 0.02)
            model.lm_head.weight = nn.Parameter(torch.empty_like(model.embed_tokens.weight).normal_(0.0, 0.02))
        if "lnf" in knobs:
            model.final_layernorm = nn.LayerNorm(d_model, eps=1e-5)
    return model


def build(variant: str, d_state: int, vocab: int = 8192, d_model: int = 64) -> tuple[nn.Module, callable]:
    family, _, rest = variant.partition("-")
    knobs = set(rest.split("+")) - {""}
    if family == "jamba":
        m = jamba_model(d_state, knobs, vocab, d_model)
        return m, lambda ids: m.hidden_states(ids)[0]
    if family == "zoology":
        m = ZooMambaLM(vocab, d_model, d_state=d_state, bc_norm="norm" in knobs, jamba_init="jinit" in knobs)
        return m, m.hidden
    raise SystemExit(f"unknown variant {variant!r}")


def query_loss(hidden_fn, head, ids, labels):
    h = hidden_fn(ids)
    keep = labels != -100
    return F.cross_entropy(head(h[keep]), labels[keep])


@torch.no_grad()
def accuracy(hidden_fn, head, ids, labels, bs=250):
    """Zoology's metric: the mean over sequences of the share of its queries answered by the argmax."""
    per_seq = []
    for i in range(0, len(ids), bs):
        x, y = ids[i:i + bs], labels[i:i + bs]
        pred = head(hidden_fn(x)).argmax(-1)
        keep = y != -100
        per_seq.append(((pred == y) & keep).sum(1).float() / keep.sum(1))
    return torch.cat(per_seq).mean().item()


def recipe(a) -> None:
    """Zoology's own training loop (``zoology/train.py``) on the real segments: the train segments in order, batches
    of 256 in order, AdamW (wd 0.1 on every parameter, torch betas), ``CosineAnnealingLR(T_max=epochs)`` stepped once
    per epoch, test accuracy on the 7 test segments after every epoch, stop past 0.99; ``--deadline-s`` stops between
    steps and still writes the result."""
    from jambatrain.data.mqar import MqarZoologyConfig, zoology_segments

    t0 = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dcfg = MqarZoologyConfig(cache_dir=a.cache)
    if a.toy:
        dcfg = MqarZoologyConfig(vocab=256, train=[[16, 2, 64], [32, 4, 32]], test=[[16, 2, 32], [64, 8, 16]],
                                 cache_dir=a.cache)
    train = [tuple(torch.from_numpy(np.asarray(t, dtype=np.int64)) for t in seg) for seg in zoology_segments(dcfg, "train")]
    test = [tuple(torch.from_numpy(np.asarray(t, dtype=np.int64)) for t in seg) for seg in zoology_segments(dcfg, "test")]
    for variant in a.variants.split(","):
        torch.manual_seed(a.seed)
        model, hidden_fn = build(variant, a.d_state, vocab=dcfg.vocab, d_model=a.d_model)
        model.to(dev)
        head = model.lm_head
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs, eta_min=0.0)
        curve, accs, step, run, cut = [], [], 0, [], False
        for epoch in range(a.epochs):
            model.train()
            for x, y in train:
                for i in range(0, len(x), a.batch):
                    loss = query_loss(hidden_fn, head, x[i:i + a.batch].to(dev), y[i:i + a.batch].to(dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    run.append(loss.detach())
                    if step % a.log_every == 0:
                        curve.append((step, round(torch.stack(run).mean().item(), 4)))
                        run = []
                        print(f"{variant} epoch {epoch} step {step} loss {curve[-1][1]:.4f} ({time.time() - t0:.0f}s)",
                              flush=True)
                    cut = a.deadline_s and time.time() - t0 > a.deadline_s
                    if cut:
                        break
                if cut:
                    break
            sched.step()
            model.eval()
            per_seg = {f"L{len(x[0])}_N{int((y[0] != -100).sum())}": accuracy(hidden_fn, head, x.to(dev), y.to(dev), 125)
                       for x, y in test}
            accs.append({"epoch": epoch + 1, "step": step, "acc": float(np.mean(list(per_seg.values()))),
                         "by_segment": per_seg})
            print(f"{variant} epoch {epoch + 1} step {step} test acc {accs[-1]['acc']:.4f} {per_seg}", flush=True)
            if accs[-1]["acc"] > 0.99 or cut:
                break
        rec = dict(mode="recipe", variant=variant, lr=a.lr, batch=a.batch, epochs=a.epochs, d_model=a.d_model,
                   d_state=a.d_state, steps=step, cut_by_deadline=bool(cut), curve=curve, test=accs,
                   device=str(dev), seconds=round(time.time() - t0, 1))
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


def main():
    from jambatrain.data.mqar import zoology_segment

    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="jamba,zoology")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--accum", type=int, default=1, help="micro batches of --batch per step (batch x accum per step)")
    ap.add_argument("--sched-steps", type=int, default=0, help="cosine length (0: --steps); longer: a flatter lr")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--wd-all", action="store_true", help="decay every parameter (Zoology); else the framework's rule")
    ap.add_argument("--train", default="64:4:20000,64:8:20000", help="seq_len:pairs:examples,... (mixed per batch)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--recipe", action="store_true", help="Zoology's training loop on the real segments (recipe())")
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--cache", default="", help="the segments' cache dir (data.mqar_zoology.cache_dir)")
    ap.add_argument("--deadline-s", type=float, default=0)
    ap.add_argument("--toy", action="store_true", help="with --recipe: the driver's CPU toy segments, vocabulary 256")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.recipe:
        return recipe(a)
    segs = []
    for k, s in enumerate(a.train.split(",")):
        L, p, n = map(int, s.split(":"))
        x, y = zoology_segment(8192, L, p, n, seed=1000 + k)
        segs.append((torch.from_numpy(x), torch.from_numpy(y)))
    tests = {f"{L},{p}": tuple(torch.from_numpy(t) for t in zoology_segment(8192, L, p, 500, seed=2 ** 31 + L + p))
             for L, p in ((64, 4), (64, 8))}
    for variant in a.variants.split(","):
        torch.manual_seed(a.seed)
        model, hidden_fn = build(variant, a.d_state)
        head = model.lm_head
        if a.wd_all:
            groups = [{"params": list(model.parameters()), "weight_decay": a.wd}]
        else:
            from jambatrain.optim import param_groups

            groups = param_groups(model, a.wd)
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999))
        T = a.sched_steps or a.steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, T) / T)))
        g = torch.Generator().manual_seed(a.seed)
        curve, t0, run = [], time.time(), []
        for step in range(1, a.steps + 1):
            x, y = segs[(step - 1) % len(segs)]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(a.accum):
                idx = torch.randint(len(x), (a.batch,), generator=g)
                loss = query_loss(hidden_fn, head, x[idx], y[idx]) / a.accum
                loss.backward()
                total += loss.item()
            opt.step()
            sched.step()
            run.append(total)
            if step % a.log_every == 0:
                curve.append((step, round(float(np.mean(run)), 3)))
                run = []
                print(f"{variant} step {step} loss {curve[-1][1]:.3f} ({time.time() - t0:.0f}s)", flush=True)
        model.eval()
        acc = {k: round(accuracy(hidden_fn, head, *v), 4) for k, v in tests.items()}
        rec = dict(variant=variant, lr=a.lr, batch=a.batch * a.accum, steps=a.steps, sched_steps=T, d_state=a.d_state, wd_all=a.wd_all,
                   train=a.train, seed=a.seed, curve=curve, test_acc=acc, seconds=round(time.time() - t0, 1))
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
