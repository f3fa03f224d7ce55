"""Summary and plots of bench/ablation_sweep.sh's output directory.

    python bench/ablation_report.py OUT_DIR

Reads OUT_DIR/sweep/<n>/ (config.yaml, metrics.jsonl, eval/eval_step*.json), OUT_DIR/eval/<variant>.json (the
jambatrain.eval CLI's results, preferred over the trainer's last eval), OUT_DIR/memory_check.json and
OUT_DIR/longctx/metrics.jsonl, and writes
  OUT_DIR/ablation_summary.json   everything below, machine-readable
  OUT_DIR/ablation_table.md       the table for docs/results.md (val loss, recall by length, passkey, tokens/s)
  OUT_DIR/loss_curves.png         training loss per variant (when matplotlib imports)
  OUT_DIR/recall_vs_context.png   MQAR accuracy vs context length per variant
  OUT_DIR/recall_vs_pairs.png     MQAR accuracy vs number of key-value pairs per variant, at the longest length
  OUT_DIR/recall_during_training.png  MQAR accuracy at each of the trainer's evals
Uses only the standard library, yaml (with hydra) and, for the PNGs, matplotlib.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys

LABELS = {"h200_1b": "hybrid 1:7", "ablate_attn_1to3": "hybrid 1:3", "ablate_mamba_only": "pure Mamba",
          "ablate_attention_only": "pure attention", "ablate_rope": "hybrid 1:7 + RoPE"}


def _rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _name(run: str) -> str:
    import yaml

    cfg_path = os.path.join(run, "config.yaml")
    if not os.path.isfile(cfg_path):
        return os.path.basename(run)
    with open(cfg_path) as f:
        return yaml.safe_load(f).get("name", os.path.basename(run))


def variant(out: str, run: str) -> dict:
    name = _name(run)
    metrics = _rows(os.path.join(run, "metrics.jsonl"))
    train = [r for r in metrics if "loss" in r]
    evals = sorted(glob.glob(os.path.join(run, "eval", "eval_step*.json")))
    result = _json(os.path.join(out, "eval", f"{name}.json")) or (_json(evals[-1]) if evals else None) or {}
    tps = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]  # the first window holds start-up
    params = None
    log = os.path.join(out, "sweep.log")
    return {"name": name, "label": LABELS.get(name, name), "run": run,
            "steps": train[-1]["step"] if train else 0, "final_train_loss": train[-1]["loss"] if train else None,
            "loss_curve": [(r["step"], r["loss"]) for r in train],
            "recall_curve": [(r["step"], r["mqar_acc"]) for r in metrics if "mqar_acc" in r],
            "tokens_per_s": statistics.median(tps) if tps else None,
            "peak_memory_gib": max((r.get("max_memory_allocated_gb") or 0) for r in train) if train else None,
            "num_params": result.get("num_params", params), "eval_source": "cli" if result.get("checkpoint") else
            ("trainer" if result else None), "log": log if os.path.isfile(log) else None,
            **{k: result.get(k) for k in ("val_loss", "val_ppl", "mqar_acc", "mqar", "mqar_by_length", "passkey_acc",
                                          "passkey_first_token_acc", "passkey")}}


def _cells(v: dict) -> dict[tuple[int, int], float]:
    return {(int(k[1:].split("_N")[0]), int(k.split("_N")[1])): a for k, a in (v.get("mqar") or {}).items()}


def common_pairs(vs: list[dict]) -> int | None:
    """The largest number of pairs evaluated at every context length (4 x pairs <= length): recall vs length is
    read at that fixed difficulty."""
    cells = [c for v in vs for c in _cells(v)]
    lengths = {n for n, _ in cells}
    shared = [p for p in {p for _, p in cells} if all((n, p) in cells for n in lengths)]
    return max(shared) if shared else None


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(vs: list[dict]) -> str:
    lengths = sorted({n for v in vs for n, _ in _cells(v)})
    fixed = common_pairs(vs)
    head = ["variant", "params", "steps", "val loss", *[f"MQAR @{n} ({fixed} pairs)" for n in lengths], "MQAR all",
            "passkey", "passkey 1st tok", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in vs:
        c = _cells(v)
        cells = [v["label"], _fmt(v["num_params"] and v["num_params"] / 1e6, ".1f") + "M", str(v["steps"]),
                 _fmt(v["val_loss"]), *[_fmt(c.get((n, fixed))) for n in lengths], _fmt(v["mqar_acc"]),
                 _fmt(v["passkey_acc"]), _fmt(v["passkey_first_token_acc"]), _fmt(v["tokens_per_s"], ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = sorted({int(k.split("_N")[1]) for v in vs for k in (v.get("mqar") or {})})
    if pairs:
        longest = max(lengths)
        lines += ["", f"MQAR accuracy at {longest} tokens by number of key-value pairs:", "",
                  "| variant | " + " | ".join(f"{p} pairs" for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
        for v in vs:
            m = v.get("mqar") or {}
            lines.append(f"| {v['label']} | " + " | ".join(_fmt(m.get(f"L{longest}_N{p}")) for p in pairs) + " |")
    return "\n".join(lines) + "\n"


def plots(out: str, vs: list[dict]) -> list[str]:
    """One PNG per figure: x/y series per variant, from ``series(v)`` -> [(x, y), ...]."""
    if not vs:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("ablation_report: matplotlib not importable: no PNGs (rerun this script where it is)", file=sys.stderr)
        return []
    fixed = common_pairs(vs)
    lengths = [n for v in vs for n, _ in _cells(v)]
    longest = max(lengths) if lengths else None
    figures = [
        ("loss_curves.png", lambda v: v["loss_curve"], {}, dict(xlabel="step", ylabel="training loss (MQAR values)",
                                                                title="Loss per variant", yscale="log")),
        ("recall_vs_context.png", lambda v: sorted((n, a) for (n, p), a in _cells(v).items() if p == fixed),
         {"marker": "o"}, dict(xlabel="context length (tokens)", ylabel=f"MQAR accuracy ({fixed} pairs)",
                               xscale="log", title="Associative recall vs context length", ylim=(0, 1.02))),
        ("recall_vs_pairs.png", lambda v: sorted((p, a) for (n, p), a in _cells(v).items() if n == longest),
         {"marker": "o"}, dict(xlabel="key-value pairs", ylabel=f"MQAR accuracy at {longest} tokens", xscale="log",
                               title="Recall vs number of pairs", ylim=(0, 1.02))),
        ("recall_during_training.png", lambda v: v["recall_curve"], {"marker": "o"},
         dict(xlabel="step", ylabel="MQAR accuracy (all cells)", title="Recall during training", ylim=(0, 1.02))),
    ]
    written = []
    for name, series, style, axes in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v in vs:
            pts = series(v)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=v["label"], **style)
        ax.set(**axes)
        if axes.get("xscale") == "log":
            ax.set_xscale("log", base=2)
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out, name))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(out: str) -> dict:
    runs = sorted(glob.glob(os.path.join(out, "sweep", "[0-9]*")), key=lambda p: int(os.path.basename(p)))
    vs = [variant(out, r) for r in runs]
    longctx = _rows(os.path.join(out, "longctx", "metrics.jsonl"))
    summary = {"variants": vs, "memory_check": _json(os.path.join(out, "memory_check.json")),
               "longctx": {"rows": longctx, "ok": bool(longctx) and all(
                   isinstance(r.get("loss"), float) for r in longctx)}}
    md = table(vs)
    mem = summary["memory_check"]
    if mem:
        md += f"\nKV cache / Mamba state, {mem['model']} on {mem['device']} ({mem['dtype']}), formula vs measured:\n\n"
        md += "| context | KV formula GiB | KV measured GiB | state formula B | state measured B | forward peak GiB |\n"
        md += "|---:|---:|---:|---:|---:|---:|\n"
        for r in mem["rows"]:
            if "error" in r:
                md += f"| {r['context']} | {r['error']} |||||\n"
                continue
            md += (f"| {r['context']:,} | {r['kv_cache_gib']:.4f} | {r['kv_cache_bytes_measured'] / 2**30:.4f} | "
                   f"{r['mamba_state_bytes']:,} | {r['mamba_state_bytes_measured']:,} | "
                   f"{(r['forward_peak_bytes'] or 0) / 2**30:.1f} |\n")
    if longctx:
        last = longctx[-1]
        md += (f"\nLong context (1.3b, 262,144 tokens): {len(longctx)} steps, loss {longctx[0]['loss']:.3f} -> "
               f"{last['loss']:.3f}, {_fmt(last.get('tokens_per_s'), ',.0f')} tokens/s, peak "
               f"{_fmt(last.get('max_memory_allocated_gb'), '.1f')} GiB\n")
    summary["plots"] = plots(out, vs)
    with open(os.path.join(out, "ablation_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "ablation_table.md"), "w") as f:
        f.write(md)
    print(md)
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/ablation_report.py OUT_DIR (the directory bench/ablation_sweep.sh wrote)")
    main(sys.argv[1])
