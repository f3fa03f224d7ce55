"""Loss parity of two training runs from the same seed (e.g. bf16 vs model.fp8): table, verdict and plot.

    python bench/loss_parity.py BASE/metrics.jsonl OTHER/metrics.jsonl [--out docs/fp8_loss_parity.png]
                                [--window 20] [--tol 0.015]

Compares the training loss ("loss" rows of metrics.jsonl) step by step over the steps both runs logged. The
verdict uses the mean over the last ``--window`` logged steps of each run (one step's loss is noisy) and
``|other - base| / base <= tol``; "never diverging" is checked as the largest windowed relative gap after the first
10% of the steps. Writes the PNG when matplotlib imports.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--labels", default="bf16,fp8")
    ap.add_argument("--window", type=int, default=20, help="logged rows averaged for the verdict")
    ap.add_argument("--tol", type=float, default=0.015)
    ap.add_argument("--out", default=None, help="PNG path")
    args = ap.parse_args()
    lb, lo = args.labels.split(",")
    r = compare(read_losses(args.base), read_losses(args.other), args.window)
    ok = abs(r["final_rel_gap"]) <= args.tol
    print(f"{r['steps']} common logged steps, last {r['last_step']}: {lb} {r['base_final']:.4f}, {lo} "
          f"{r['other_final']:.4f} (mean of the last {args.window} logged rows); relative gap "
          f"{r['final_rel_gap']:+.2%} ({'within' if ok else 'OUTSIDE'} {args.tol:.1%}); largest windowed gap after "
          f"the first 10% of steps {r['max_rel_gap_after_10pct']:+.2%}")
    if args.out:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib does not import: no plot (pip install 'jambatrain[bench]')")
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
