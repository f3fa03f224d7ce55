"""MQAR as in Zoology / Based (arXiv 2402.18668 fig. 2), reproduced through the trainer, on one GPU.

    python bench/mqar_zoology.py run --out /tmp/mqz [--budget-s 300] [--arms ...] [--lrs ...] [--epochs 32]
    python bench/mqar_zoology.py report A.json [B.json ...] --docs docs/results.md --png docs/results/mqar_zoology.png
    python bench/mqar_zoology.py run --toy --out /tmp/mqz_toy        # the CPU toy CI runs (tests/test_mqar_zoology.py)

``run``:
 1. generates the Zoology train and test segments once, in parallel, into ``OUT/cache`` (every run memory-maps them);
 2. with ``--budget-s``: a probe (as many points as processes at once, ``--probe-steps`` steps on shuffled batches, no
    eval) measures the slowest run's step time with them sharing the GPU, and the epochs are cut to fit the budget:
    ``epochs = min(--epochs, budget / (runs per process x steps per epoch x that step time x 1.15))``, the same for
    every run;
 3. the grid: for each arm, ``python -m jambatrain.train -m experiment=zoology_<arm> ... optim.lr=a,b,...`` (Hydra
    multiruns through the trainer; ``--procs`` processes at once, default 6, the points shared out among them: by
    default one process per arm sweeping its lrs in turn; every point its own run dir), each run stopping early past
    0.99 test accuracy as Zoology's; past ``--budget-s`` x 1.15 + 40 s (or ``--deadline-s``) the trainers get SIGTERM,
    again every 15 s while a multirun starts its next job (they checkpoint and stop: ``cut_by_deadline`` in the JSON);
 4. ``python -m jambatrain.eval RUN_DIR`` (task mqar_zoology: the 7 test segments) on the last checkpoint of each arm's
    best run by the trainer's last test accuracy (``--eval-all``: every run; the others report that last accuracy);
 5. writes OUT/mqar_zoology.json (every run, per-segment accuracies, the best lr per arm beside the published value),
    OUT/mqar_zoology.md (the table) and OUT/mqar_zoology.png (accuracy vs d_model).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (family, d_model, d_state or None, experiment, published accuracy or None[, more overrides]). Published: the
# zoology README figure (HazyResearch/zoology, experiments/paper_configs/arxiv24_based_figure2).
_L8 = ("model.num_hidden_layers=8",)  # the ablation sweep's stacks (docs/results.md, run 2) at d 64, no FFN
ARMS = {
    "attention_d64": ("attention", 64, None, "zoology_attention", 1.00),
    "attention_d128": ("attention", 128, None, "zoology_attention", 1.00),
    "mamba_d64_N16": ("mamba N16", 64, 16, "zoology_mamba", 0.69),
    "mamba_d64_N24": ("mamba N24", 64, 24, "zoology_mamba", 0.70),
    "hybrid_d64": ("hybrid [mamba N16, attention]", 64, 16, "zoology_hybrid", None),
    "hybrid_d128": ("hybrid [mamba N16, attention]", 128, 16, "zoology_hybrid", None),
    "mamba_d128_N24": ("mamba N24", 128, 24, "zoology_mamba", 0.76),
    "mamba_d256_N24": ("mamba N24", 256, 24, "zoology_mamba", 0.85),
    # Zoology's Mamba-1 (no dt/B/C norms: model.mamba_dt_bc_norm=false) beside Jamba's
    "mamba_plain_d64_N16": ("mamba N16, no dt/B/C norms (Zoology's)", 64, 16, "zoology_mamba_plain", 0.69),
    "mamba_plain_d64_N24": ("mamba N24, no dt/B/C norms (Zoology's)", 64, 24, "zoology_mamba_plain", 0.70),
    # Jamba's Mamba on the PyTorch reference scan/conv instead of the CUDA kernels (the kernel path's A/B)
    "mamba_ref_d64_N16": ("mamba N16, reference path", 64, 16, "zoology_mamba", 0.69,
                          ("model.mamba_impl=reference", "model.fused_rms_norm=false")),
    # the ablation rows (Jamba sec. 6.1 / 6.5) on this task: 8 layers at d 64, 1:7 (attention at 4), 1:3 (at 2, 6),
    # 1:7 with RoPE
    "hybrid8_1to7_d64": ("hybrid 1:7, 8 layers", 64, 16, "zoology_hybrid", None,
                         _L8 + ("model.attn_layer_period=8", "model.attn_layer_offset=4")),
    "hybrid8_1to3_d64": ("hybrid 1:3, 8 layers", 64, 16, "zoology_hybrid", None,
                         _L8 + ("model.attn_layer_period=4", "model.attn_layer_offset=2")),
    "hybrid8_1to7_rope_d64": ("hybrid 1:7 + RoPE, 8 layers", 64, 16, "zoology_hybrid", None,
                              _L8 + ("model.attn_layer_period=8", "model.attn_layer_offset=4", "model.use_rope=true")),
}
DEFAULT_ARMS = list(ARMS)[:6]
LRS = (1e-3, 3.16e-3, 1e-2, 3.16e-2)  # np.logspace(-3, -1.5, 4), Zoology's sweep
BATCH = 256
TOY = ["model.vocab_size=256", "data.mqar_zoology.vocab=256", "data.mqar_zoology.train=[[16,2,64],[32,4,32]]",
       "data.mqar_zoology.test=[[16,2,32],[64,8,16]]", "data.seq_len=32", "parallel.micro_batch_size=16",
       "parallel.device=cpu", "eval.batch_size=16", "model.mamba_d_state=4"]


def data_config(toy: bool, cache: str):
    from jambatrain.data.mqar import MqarZoologyConfig

    if toy:
        return MqarZoologyConfig(vocab=256, train=[[16, 2, 64], [32, 4, 32]], test=[[16, 2, 32], [64, 8, 16]],
                                 cache_dir=cache)
    return MqarZoologyConfig(cache_dir=cache)


def _gen(args):
    from jambatrain.data.mqar import zoology_segment_cached

    cfg, split, i = args
    t = time.time()
    zoology_segment_cached(cfg, split, i)
    return split, i, time.time() - t


def pregenerate(cfg, log) -> float:
    t0 = time.time()
    jobs = [(cfg, "train", i) for i in range(len(cfg.train))] + [(cfg, "test", i) for i in range(len(cfg.test))]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as ex:
        for split, i, dt in ex.map(_gen, jobs):
            log(f"segment {split} {i}: {dt:.1f}s")
    return time.time() - t0


def steps_per_epoch(cfg, batch: int) -> int:
    return sum(math.ceil(n / batch) for _, _, n in cfg.train)


def arm_overrides(name: str, toy: bool) -> list[str]:
    _, d, n, exp, _, *more = ARMS[name]
    out = [f"experiment={exp}", f"model.hidden_size={16 if toy else d}"]
    if n is not None and not toy:
        out.append(f"model.mamba_d_state={n}")
    return out + list(more[0] if more else ())


class Procs:
    """Start command lines, at most ``limit`` at once; SIGTERM them all past a deadline (the trainers checkpoint and
    stop at the next step: the preemption path)."""

    def __init__(self, limit: int, log):
        self.limit, self.log = limit, log

    def run(self, jobs: list[tuple[str, list[str], str]], deadline: float | None = None) -> dict[str, int]:
        pending, running, codes, termed = list(jobs), {}, {}, {}
        while pending or running:
            while pending and len(running) < self.limit:
                key, cmd, logfile = pending.pop(0)
                # no MASTER_PORT: each trainer binds a free one itself (parallel/distributed.py); a numbered range
                # collided with a second driver's on the same machine
                env = {"OMP_NUM_THREADS": "1", **{k: v for k, v in os.environ.items() if k != "MASTER_PORT"},
                       "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
                f = open(logfile, "w")
                running[key] = (subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True), f)
            time.sleep(0.5)
            for key, (p, f) in list(running.items()):
                if p.poll() is not None:
                    codes[key] = p.returncode
                    f.close()
                    del running[key]
                    if p.returncode:
                        self.log(f"{key}: exit {p.returncode} (log {f.name})")
                elif deadline is not None and time.time() > deadline and time.time() > termed.get(key, 0) + 15:
                    self.log(f"{key}: past the deadline, SIGTERM (checkpoint and stop)")
                    os.killpg(p.pid, signal.SIGTERM)  # again later: a multirun goes on to its next job
                    termed[key] = time.time()
        return codes


def _rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def probe(args, points, base, out, procs, log) -> float:
    """Seconds per step of the slowest of ``points`` run at once, on shuffled batches (the epoch's mix of lengths)."""
    jobs = []
    for name, lr in points:
        d = os.path.join(out, "probe", f"{name}_lr{lr:g}")
        cmd = [sys.executable, "-m", "jambatrain.train", *arm_overrides(name, args.toy), *base, f"optim.lr={lr}",
               f"trainer.max_steps={args.probe_steps}", "trainer.save_every=0", "trainer.eval_every=0",
               f"trainer.log_every={max(1, args.probe_steps // 3)}", "data.shuffle=true", f"hydra.run.dir={d}"]
        jobs.append((f"probe {name} lr {lr:g}", cmd, d + ".log"))
        os.makedirs(os.path.dirname(d), exist_ok=True)
    t0 = time.time()
    codes = procs.run(jobs)
    if any(codes.values()):
        raise SystemExit("probe failed: see the logs above")
    times = []
    for name, lr in points:
        rows = [r for r in _rows(os.path.join(out, "probe", f"{name}_lr{lr:g}", "metrics.jsonl"))
                if "tokens_per_s" in r]
        tokens_per_step = rows[-1]["tokens"] / rows[-1]["step"]
        times.append((tokens_per_step / rows[-1]["tokens_per_s"], name))  # the last window: past the warm-up
    slowest = max(times)
    log(f"probe: {len(points)} runs at once, {time.time() - t0:.0f}s; s/step: "
        + ", ".join(f"{n} {t * 1e3:.1f}ms" for t, n in sorted(times)) + f"; slowest {slowest[0] * 1e3:.1f}ms")
    return slowest[0]


def run(args) -> dict:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    logf = open(os.path.join(out, "mqar_zoology.log"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t_start = time.time()
    arms = args.arms.split(",") if args.arms else (["attention_d64", "mamba_d64_N16", "hybrid_d64"] if args.toy
                                                    else DEFAULT_ARMS)
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else ([1e-2] if args.toy else list(LRS))
    batch = 16 if args.toy else BATCH
    cache = os.path.join(out, "cache")
    dcfg = data_config(args.toy, cache)
    log(f"generating the segments into {cache}")
    gen_s = pregenerate(dcfg, log)
    spe = steps_per_epoch(dcfg, batch)
    base = [*(TOY if args.toy else []), f"data.mqar_zoology.cache_dir={cache}",
            f"trainer.eval_every={spe * args.eval_every_epochs}"]
    if args.extra:
        base += args.extra.split()
    points = [(a, lr) for a in arms for lr in lrs]
    if args.points:  # explicit (arm, lr) pairs instead of the full arms x lrs grid
        points = [(p.split(":")[0], float(p.split(":")[1])) for p in args.points.split(",")]
        arms = list(dict.fromkeys(a for a, _ in points))
        lrs = sorted({lr for _, lr in points})
    procs = Procs(min(args.procs or len(points), len(points)), log)
    per_proc = max(1, math.ceil(len(points) / procs.limit))  # runs one after another in each process
    epochs, step_s = args.epochs, None
    if args.budget_s:  # probe at the grid's concurrency: one point of each arm, as many as processes
        firsts = [next(p for p in points if p[0] == a) for a in arms]
        step_s = probe(args, (firsts + [p for p in points if p not in firsts])[:procs.limit], base, out, procs, log)
        epochs = max(1, min(args.epochs, int(args.budget_s / (per_proc * spe * step_s * 1.15))))
        log(f"budget {args.budget_s}s: {epochs} epochs of {spe} steps per run (of {args.epochs})")
    max_steps = epochs * spe

    # the grid: Hydra multiruns through the trainer, the points of one arm shared out among the processes
    jobs, run_dirs = [], {}
    for a in arms:
        arm_lrs = [lr for b, lr in points if b == a]
        for g in range(0, len(arm_lrs), per_proc):
            chunk = arm_lrs[g:g + per_proc]
            sweep = os.path.join(out, "runs", f"{a}_g{g // per_proc}")
            cmd = [sys.executable, "-m", "jambatrain.train", "-m", *arm_overrides(a, args.toy), *base,
                   f"optim.lr={','.join(f'{lr:g}' for lr in chunk)}", f"trainer.max_steps={max_steps}",
                   f"hydra.sweep.dir={sweep}"]
            for j, lr in enumerate(chunk):
                run_dirs[(a, lr)] = os.path.join(sweep, str(j))
            os.makedirs(os.path.dirname(sweep), exist_ok=True)
            jobs.append((f"{a} lr {','.join(f'{lr:g}' for lr in chunk)}", cmd, sweep + ".log"))
    log(f"grid: {len(points)} runs in {len(jobs)} trainer processes ({procs.limit} at once), {max_steps} steps max")
    t_grid = time.time()
    deadline = t_grid + 1.15 * args.budget_s + 40 if args.budget_s else None  # + start-up
    if args.deadline_s:
        deadline = t_grid + args.deadline_s
    codes = procs.run(jobs, deadline)
    grid_s = time.time() - t_grid
    log(f"grid done in {grid_s:.0f}s")

    # evaluation with jambatrain.eval of the last checkpoint of each arm's best run by the trainer's last test
    # accuracy (--eval-all: of every run); the others keep the trainer's own last eval (the same function)
    last = {k: ([r["mqar_zoology_acc"] for r in _rows(os.path.join(d, "metrics.jsonl")) if "mqar_zoology_acc" in r]
                or [-1.0])[-1] for k, d in run_dirs.items()}
    chosen = set(run_dirs) if args.eval_all else {max((k for k in run_dirs if k[0] == a), key=lambda k: last[k])
                                                   for a in arms}
    ev_jobs = []
    if args.total_s and time.time() > t_start + args.total_s - 40:
        log("no time left for jambatrain.eval: the trainer's last eval stands (the same function, eval.py)")
        chosen = set()
    for (a, lr), d in run_dirs.items():
        if (a, lr) in chosen and os.path.isdir(os.path.join(d, "checkpoints")):
            o = os.path.join(out, "eval", f"{a}_lr{lr:g}.json")
            os.makedirs(os.path.dirname(o), exist_ok=True)
            ev_jobs.append((f"eval {a} lr {lr:g}", [sys.executable, "-m", "jambatrain.eval", d, f"eval.out={o}",
                                                    "trainer.progress_bar=false"], o + ".log"))
    t_eval = time.time()
    procs.run(ev_jobs)
    log(f"eval done in {time.time() - t_eval:.0f}s")

    runs = []
    for (a, lr), d in run_dirs.items():
        rows = _rows(os.path.join(d, "metrics.jsonl"))
        accs = [r["mqar_zoology_acc"] for r in rows if "mqar_zoology_acc" in r]
        train = [r for r in rows if "loss" in r]
        ev_path = os.path.join(out, "eval", f"{a}_lr{lr:g}.json")
        ev = json.load(open(ev_path)) if os.path.isfile(ev_path) else {}
        fam, dm, n, exp, pub, *_ = ARMS[a]
        steps = ev.get("step", train[-1]["step"] if train else 0)
        runs.append({"arm": a, "family": fam, "d_model": 16 if args.toy else dm, "d_state": n, "experiment": exp,
                     "lr": lr, "max_steps": max_steps, "steps": steps, "epochs_done": round(steps / spe, 2),
                     "stopped_early": bool(accs) and accs[-1] > 0.99 and steps < max_steps,
                     "cut_by_deadline": steps < max_steps and not (bool(accs) and accs[-1] > 0.99),
                     "acc": ev.get("mqar_zoology_acc", accs[-1] if accs else None),
                     "acc_source": "jambatrain.eval" if ev else "trainer's last eval",
                     "acc_by_segment": ev.get("mqar_zoology", _last_segments(rows)),
                     "acc_during_training": accs, "final_train_loss": train[-1]["loss"] if train else None,
                     "num_params": ev.get("num_params"), "run_dir": os.path.relpath(d, out)})
    result = {"command": "python bench/mqar_zoology.py " + " ".join(sys.argv[2:]),
              "reference": "HazyResearch/zoology@dbcb60d2bd10a3cc7a89ee60c446c44900a4687f "
                           "experiments/paper_configs/arxiv24_based_figure2",
              "toy": args.toy, "epochs": epochs, "eval_every_epochs": args.eval_every_epochs, "epochs_recipe": 32, "steps_per_epoch": spe, "batch": batch,
              "lrs": lrs, "probe_step_s": step_s, "seconds": {"generate": gen_s, "grid": grid_s,
                                                            "total": time.time() - t_start},
              "exit_codes": {f"{k}": v for k, v in codes.items()}, "runs": runs, "device": _device()}
    result["arms"] = summarise(runs)
    path = os.path.join(out, "mqar_zoology.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    write_outputs(result, os.path.join(out, "mqar_zoology.md"), os.path.join(out, "mqar_zoology.png"))
    log(f"wrote {path}")
    return result


def _last_segments(rows: list[dict]) -> dict | None:
    ev = [r for r in rows if "mqar_zoology_acc" in r]
    if not ev:
        return None
    return {k.split("/", 1)[1]: v for k, v in ev[-1].items() if k.startswith("mqar_zoology/")}


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def summarise(runs: list[dict]) -> list[dict]:
    """Per arm: the lr with the best final test accuracy (Zoology's plot takes the max over the lr sweep)."""
    out = []
    for a in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == a and r["acc"] is not None]
        best = max(rs, key=lambda r: r["acc"]) if rs else None
        fam, dm, n, exp, pub, *_ = ARMS[a]
        out.append({"arm": a, "family": fam, "d_model": rs[0]["d_model"] if rs else dm, "d_state": n,
                    "published": pub, "acc": best["acc"] if best else None, "best_lr": best["lr"] if best else None,
                    "epochs_done": best["epochs_done"] if best else None,
                    "acc_by_lr": {f"{r['lr']:g}": r["acc"] for r in rs}})
    return out


def table(result: dict) -> str:
    lines = ["| arm | d_model | d_state | published | ours (best lr) | best lr | epochs run | accuracy per lr |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in result["arms"]:
        pub = f"{s['published']:.2f}" if s["published"] is not None else "-"
        acc = f"{s['acc']:.3f}" if s["acc"] is not None else "n/a"
        per = ", ".join(f"{lr}: {v:.3f}" for lr, v in s["acc_by_lr"].items())
        lines.append(f"| {s['family']} | {s['d_model']} | {s['d_state'] or '-'} | {pub} | **{acc}** | "
                     f"{s['best_lr'] if s['best_lr'] is not None else '-'} | {s['epochs_done']} | {per} |")
    return "\n".join(lines)


def write_outputs(result: dict, md: str | None, png: str | None) -> None:
    if md:
        with open(md, "w") as f:
            f.write(table(result) + "\n")
    if png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib missing: no plot", file=sys.stderr)
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        fams = dict.fromkeys(s["family"] for s in result["arms"])
        drawn = set()  # published points already drawn (variants of one arm share them)
        for i, fam in enumerate(fams):
            ss = sorted((s for s in result["arms"] if s["family"] == fam), key=lambda s: s["d_model"])
            color = f"C{i}"
            xs = [s["d_model"] for s in ss if s["acc"] is not None]
            ax.plot(xs, [s["acc"] for s in ss if s["acc"] is not None], "o-", color=color, label=f"{fam} (ours)")
            pub = [(s["d_model"], s["published"]) for s in ss if s["published"] is not None
                   and (s["d_model"], s["published"]) not in drawn]
            drawn.update(pub)
            if pub:
                ax.plot(*zip(*pub), "x--", color=color, alpha=0.6, label=f"{fam} (published)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylabel("MQAR test accuracy (7 segments, best lr)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Zoology/Based MQAR through jambatrain ({result['epochs']} of 32 epochs)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=120)


BEGIN, END = "<!-- mqar_zoology:table -->", "<!-- /mqar_zoology:table -->"


def merge(results: list[dict]) -> dict:
    """One table from several calls' results: the runs of every call pooled, an (arm, lr) run by the last call that
    finished it (a run with no accuracy, e.g. one that crashed, does not replace an earlier one), then each arm's
    best lr over the pool."""
    runs = {}
    for r in results:
        for run in r["runs"]:
            if run["acc"] is not None or (run["arm"], run["lr"]) not in runs:
                runs[(run["arm"], run["lr"])] = run
    pooled = sorted(runs.values(), key=lambda run: (list(ARMS).index(run["arm"]), run["lr"]))
    return {"arms": summarise(pooled), "epochs": "/".join(str(r["epochs"]) for r in results)}


def report(args) -> None:
    result = merge([json.load(open(p)) for p in args.json])
    write_outputs(result, None, args.png)
    if args.docs:
        text = open(args.docs).read()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{args.docs} has no {BEGIN} ... {END} block to fill")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(args.docs, "w") as f:
            f.write(head + BEGIN + "\n" + table(result) + "\n" + END + tail)
    print(table(result))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--arms", default="", help=f"comma-separated, of {list(ARMS)}")
    r.add_argument("--lrs", default="")
    r.add_argument("--epochs", type=int, default=32)
    r.add_argument("--budget-s", type=float, default=0, help="wall seconds for the grid: probe, then cut epochs")
    r.add_argument("--probe-steps", type=int, default=150)
    r.add_argument("--points", default="", help="explicit arm:lr pairs, comma-separated (instead of arms x lrs)")
    r.add_argument("--deadline-s", type=float, default=0, help="SIGTERM the trainers this long after the grid starts")
    r.add_argument("--total-s", type=float, default=0, help="skip jambatrain.eval when this wall budget is near")
    r.add_argument("--eval-every-epochs", type=int, default=1)
    r.add_argument("--procs", type=int, default=6,
                   help="trainer processes at once, the points shared out as multiruns (0: one per point). 24 at once "
                        "on one H100 stepped at 80-200 ms, 6 at ~30 ms (docs/results.md)")
    r.add_argument("--toy", action="store_true", help="CPU toy: tiny vocab, segments and widths")
    r.add_argument("--eval-all", action="store_true", help="jambatrain.eval every run, not only each arm's best")
    r.add_argument("--extra", default="", help="more Hydra overrides for every run, space-separated")
    p = sub.add_parser("report")
    p.add_argument("json", nargs="+",
                   help="one or more run results, pooled: an (arm, lr) run in several: the last one's")
    p.add_argument("--docs", default="")
    p.add_argument("--png", default="")
    args = ap.parse_args(argv)
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
