"""Loss parity of training runs from the same seed (e.g. bf16 vs model.fp8): table, verdict and plot.

    python bench/loss_parity.py BASE/metrics.jsonl OTHER/metrics.jsonl [--out docs/fp8_loss_parity.png]
                                [--window 20] [--tol 0.015]
    python bench/loss_parity.py --arm bf16=A/metrics.jsonl,B/metrics.jsonl --arm fp8=C/metrics.jsonl,D/... [--out ...]

Compares the training loss ("loss" rows of metrics.jsonl) step by step over the steps both runs logged. The
verdict uses the mean over the last ``--window`` logged steps of each run (one step's loss is noisy) and
``|other - base| / base <= tol``; "never diverging" is checked as the largest windowed relative gap after the first
10% of the steps. Writes the PNG when matplotlib imports.

With ``--arm`` (the first arm is the base), each arm may hold replicates: runs of the same command and seed, which
still differ through the GPU's non-deterministic kernels (atomics in the scan backward, the GEMMs' split-K). An arm's
curve is the mean of its replicates; each arm is compared with the base arm's mean, and the largest gap between two
replicates of one arm is printed beside it as the noise floor: a gap inside it is not resolved by these runs.
"""
from __future__ import annotations

import argparse
import json


def read_losses(path: str) -> dict[int, float]:
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("loss") is not None:
                out[int(row["step"])] = float(row["loss"])
    return out


def windowed(values: list[float], w: int) -> list[float]:
    return [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]


def compare(base: dict[int, float], other: dict[int, float], window: int = 20) -> dict:
    steps = sorted(set(base) & set(other))
    if not steps:
        raise SystemExit("the two runs share no logged step")
    b = windowed([base[s] for s in steps], window)
    o = windowed([other[s] for s in steps], window)
    gaps = [(y - x) / x for x, y in zip(b, o)]
    skip = len(steps) // 10
    return {"steps": len(steps), "last_step": steps[-1], "base_final": b[-1], "other_final": o[-1],
            "final_rel_gap": gaps[-1], "max_rel_gap_after_10pct": max(gaps[skip:], key=abs),
            "series": {"step": steps, "base": [base[s] for s in steps], "other": [other[s] for s in steps]}}


def mean_curve(runs: list[dict[int, float]]) -> dict[int, float]:
    """The step-wise mean of replicate runs over the steps all of them logged."""
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    return {s: sum(r[s] for r in runs) / len(runs) for s in steps}


def compare_arms(arms: dict[str, list[dict[int, float]]], window: int = 20) -> dict:
    """Each arm's replicate-mean curve against the first arm's, and the replicate spread (noise floor): the largest
    |final windowed gap| between two runs of one arm."""
    names = list(arms)
    means = {n: mean_curve(runs) for n, runs in arms.items()}
    noise = {}
    for n, runs in arms.items():
        gaps = [abs(compare(a, b, window)["final_rel_gap"]) for i, a in enumerate(runs) for b in runs[i + 1:]]
        noise[n] = max(gaps) if gaps else None
    floor = max((v for v in noise.values() if v is not None), default=None)
    out = {"base": names[0], "noise": noise, "noise_floor": floor, "arms": {}}
    for n in names[1:]:
        r = compare(means[names[0]], means[n], window)
        r["resolved"] = floor is not None and abs(r["final_rel_gap"]) > floor
        out["arms"][n] = r
    return out


def _arms_main(args) -> None:
    arms = {}
    for spec in args.arm:
        name, _, paths = spec.partition("=")
        if not paths:
            raise SystemExit(f"--arm {spec!r}: expected NAME=metrics.jsonl[,metrics.jsonl...]")
        arms[name] = [read_losses(p) for p in paths.split(",")]
    if len(arms) < 2:
        raise SystemExit("--arm: give at least two arms (the first is the base)")
    r = compare_arms(arms, args.window)
    base = r["base"]
    for n, k in arms.items():
        spread = r["noise"][n]
        print(f"{n}: {len(k)} run(s); replicate spread {'n/a' if spread is None else f'{spread:.2%}'}")
    for n, a in r["arms"].items():
        ok = abs(a["final_rel_gap"]) <= args.tol
        floor = r["noise_floor"]
        noise = "no replicates: no noise floor" if floor is None else \
            f"{'above' if a['resolved'] else 'inside'} the noise floor {floor:.2%}"
        print(f"{n} vs {base} (replicate means), {a['steps']} common logged steps, last {a['last_step']}: "
              f"{a['base_final']:.4f} vs {a['other_final']:.4f}; relative gap {a['final_rel_gap']:+.2%} "
              f"({'within' if ok else 'OUTSIDE'} {args.tol:.1%}; {noise}); largest windowed gap after the first "
              f"10% {a['max_rel_gap_after_10pct']:+.2%}")
    if args.out:
        plt = _pyplot()
        if plt is None:
            return
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        for i, (n, runs) in enumerate(arms.items()):
            for j, run in enumerate(runs):
                st = sorted(run)
                a1.plot(st, [run[s] for s in st], color=f"C{i}", lw=0.8, alpha=0.8, label=n if j == 0 else None)
        a1.set_ylabel("training loss")
        a1.legend()
        for i, (n, a) in enumerate(r["arms"].items(), start=1):
            s = a["series"]
            wb, wo = windowed(s["base"], args.window), windowed(s["other"], args.window)
            a2.plot(s["step"], [100 * (y - x) / x for x, y in zip(wb, wo)], color=f"C{i}", lw=1, label=n)
        if r["noise_floor"] is not None:
            a2.axhspan(-100 * r["noise_floor"], 100 * r["noise_floor"], color="grey", alpha=0.2,
                       label="replicate spread")
        a2.axhline(0, color="grey", lw=0.5)
        a2.set_ylabel(f"vs {base}, %\n(windowed)")
        a2.set_xlabel("step")
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib does not import: no plot (pip install 'jambatrain[bench]')")
        return None
    return plt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", nargs="?")
    ap.add_argument("other", nargs="?")
    ap.add_argument("--arm", action="append", default=[], help="NAME=run.jsonl[,run.jsonl...]; the first is the base")
    ap.add_argument("--labels", default="bf16,fp8")
    ap.add_argument("--window", type=int, default=20, help="logged rows averaged for the verdict")
    ap.add_argument("--tol", type=float, default=0.015)
    ap.add_argument("--out", default=None, help="PNG path")
    args = ap.parse_args()
    if args.arm:
        return _arms_main(args)
    if not (args.base and args.other):
        ap.error("give BASE and OTHER metrics files, or --arm twice")
    lb, lo = args.labels.split(",")
    r = compare(read_losses(args.base), read_losses(args.other), args.window)
    ok = abs(r["final_rel_gap"]) <= args.tol
    print(f"{r['steps']} common logged steps, last {r['last_step']}: {lb} {r['base_final']:.4f}, {lo} "
          f"{r['other_final']:.4f} (mean of the last {args.window} logged rows); relative gap "
          f"{r['final_rel_gap']:+.2%} ({'within' if ok else 'OUTSIDE'} {args.tol:.1%}); largest windowed gap after "
          f"the first 10% of steps {r['max_rel_gap_after_10pct']:+.2%}")
    if args.out:
        plt = _pyplot()
        if plt is None:
            return
        s = r["series"]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        a1.plot(s["step"], s["base"], label=lb, lw=1)
        a1.plot(s["step"], s["other"], label=lo, lw=1)
        a1.set_ylabel("training loss")
        a1.legend()
        wb, wo = windowed(s["base"], args.window), windowed(s["other"], args.window)
        a2.plot(s["step"], [100 * (y - x) / x for x, y in zip(wb, wo)], color="k", lw=1)
        a2.axhline(0, color="grey", lw=0.5)
        a2.set_ylabel(f"{lo} vs {lb}, %\n(windowed)")
        a2.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
