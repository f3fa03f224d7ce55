"""The KV-cache / Mamba-state formula (jambatrain/memory.py) against what a model on this machine holds.

    python bench/memory_check.py [hydra overrides, default model=1.3b] [--contexts 4096,32768,262144] [--out FILE]

Builds the model on the GPU (bf16; CPU fp32 if there is none), runs a no-grad forward of one sequence per context
and records the bytes of the K and V tensors its attention layers produce (captured from k_proj / v_proj), the
allocator's growth when the Mamba conv + SSM state tensors are allocated, and the forward's peak memory; next to
them the formula's numbers and their ratio. JSON to --out (and stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jambatrain.memory import layout_of, measure, report  # noqa: E402
from jambatrain.runs import compose_model_config  # noqa: E402
from jambatrain.models import JambaLM  # noqa: E402


def main() -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="4096,32768,262144")
    p.add_argument("--out", default="")
    args, overrides = p.parse_known_args()
    mcfg = compose_model_config(overrides or ["model=1.3b"])
    mcfg.init_from = None
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    name = "bfloat16" if cuda else "float32"
    with torch.device("meta"):
        model = JambaLM(mcfg)
    model.to_empty(device=device)
    model.init_weights()
    model = model.to(dtype).eval()
    lay = layout_of(mcfg)
    rows = []
    for n in [int(c) for c in args.contexts.split(",")]:
        t0 = time.perf_counter()
        try:
            m = measure(model, n, device, dtype)
        except torch.cuda.OutOfMemoryError as exc:  # report and go on to the next context
            rows.append({"context": n, "error": f"OOM: {exc}"[:300]})
            torch.cuda.empty_cache()
            continue
        f = report(lay, n, name)
        row = {**f, **m, "seconds": time.perf_counter() - t0,
               "kv_ratio_measured_over_formula": m["kv_cache_bytes_measured"] / max(1, f["kv_cache_bytes"]),
               "state_ratio_measured_over_formula": m["mamba_state_bytes_measured"] / max(1, f["mamba_state_bytes"])}
        rows.append(row)
        print(f"memory_check: {mcfg.name} {n:>7} tokens: kv formula {f['kv_cache_gib']:.4f} GiB, measured "
              f"{m['kv_cache_bytes_measured'] / 2**30:.4f} GiB; mamba state formula {f['mamba_state_bytes']:,} B, "
              f"measured {m['mamba_state_bytes_measured']:,} B; forward peak "
              f"{(m['forward_peak_bytes'] or 0) / 2**30:.1f} GiB", flush=True)
    result = {"model": mcfg.name, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": name,
              "num_params": model.num_params(), "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
