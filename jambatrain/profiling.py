"""Where the time of a step goes: torch profiler runs summarised by op class (scan, GEMMs, attention, MoE, ...).

Used by the trainer (``trainer.profile_at=N``: profile steps N..N+profile_steps-1, write a Chrome trace per rank
and print the table on rank 0) and by ``bench/throughput.py --profile``. On CUDA the table is device-kernel time;
on CPU it is the ops' self CPU time.
"""
from __future__ import annotations

import os
import time

CLASSES = [  # first match wins; matched against the lower-cased kernel / op name
    # expert parallelism's token exchange (NCCL runs all-to-all as grouped send/recv kernels)
    ("all-to-all", ("alltoall", "all_to_all", "sendrecv")),
    ("collectives", ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "gloo:")),
    ("scan", ("selective_scan", "linear_scan")),
    ("conv", ("causal_conv1d", "conv_depthwise", "conv1d", "convolution")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("moe_grouped_gemm", ("grouped", "groupproblemshape", "ptrarray", "_padded_copy")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "wgmma", "hgmma", "aten::mm", "aten::addmm",
              "aten::bmm")),
    ("index/sort/scatter", ("index", "scatter", "gather", "sort", "radix", "histc", "cumsum", "bincount", "embedding")),
    ("loss/softmax", ("softmax", "cross_entropy", "nll", "logsumexp")),
    ("norm/reduce", ("reduce", "norm", "rsqrt", "welford", "aten::sum", "aten::mean")),
    ("elementwise/copy", ("elementwise", "vectorized", "copy", "cat", "fill", "unrolled", "triton", "aten::mul",
                          "aten::add", "aten::sub", "aten::div", "aten::exp", "aten::silu", "aten::pow", "aten::flip",
                          "aten::where", "aten::neg")),
]


def classify(name: str) -> str:
    n = name.lower()
    for cls, keys in CLASSES:
        if any(k in n for k in keys):
            return cls
    return "other"


def op_times(prof, cuda: bool) -> dict[str, float]:
    """Self time in microseconds per kernel (CUDA) or per op (CPU), user annotations left out."""
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):
            continue
        on_device = "cuda" in str(getattr(e, "device_type", "")).lower()
        if cuda:
            if not on_device:
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
        else:
            if on_device:
                continue
            t = e.self_cpu_time_total
        if t > 0:
            times[e.key] = times.get(e.key, 0) + t
    return times


def summarize(times: dict[str, float], steps: int, wall_us: float, label: str, top: int = 18) -> dict:
    """Print the by-class table and the top entries; return them per step in milliseconds."""
    total = sum(times.values()) or 1.0
    by_class: dict[str, float] = {}
    for k, t in times.items():
        by_class[classify(k)] = by_class.get(classify(k), 0) + t
    print(f"\n[{label}] time by class over {steps} steps (busy {total / wall_us:.0%} of wall):", flush=True)
    for c, t in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"  {c:22s} {t / 1e3 / steps:9.1f} ms/step  {t / total:6.1%}")
    print(f"[{label}] top:")
    ranked = sorted(times.items(), key=lambda kv: -kv[1])
    for k, t in ranked[:top]:
        print(f"  {t / 1e3 / steps:8.2f} ms/step {t / total:6.1%}  [{classify(k)}] {k[:110]}")
    return {"by_class_ms_per_step": {c: t / 1e3 / steps for c, t in by_class.items()}, "busy_frac": total / wall_us,
            "top": [(k[:160], t / 1e3 / steps) for k, t in ranked[:25]]}


def start(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    prof.start()
    return prof


def stop(prof, cuda: bool, steps: int, wall_us: float, trace_path: str | None, label: str,
         print_table: bool) -> dict | None:
    """Finish a profile started by ``start``: write the Chrome trace (``chrome://tracing`` / Perfetto) and, where
    ``print_table``, print the summary."""
    prof.stop()
    if trace_path:
        os.makedirs(os.path.dirname(trace_path), exist_ok=True)
        prof.export_chrome_trace(trace_path)
    if not print_table:
        return None
    return summarize(op_times(prof, cuda), steps, wall_us, label)


class StepProfiler:
    """torch.profiler over ``steps`` training steps from ``first``: a Chrome trace per rank in RUN/profile/ and the
    time-by-op-class table on rank 0 (``summarize`` below)."""

    def __init__(self, dist, run_dir: str, first: int, steps: int):
        self.dist, self.first, self.steps = dist, first, steps
        self.last_step = first + steps - 1
        self.trace = os.path.join(run_dir, "profile", f"steps{first}-{self.last_step}_rank{dist.rank}.json")
        self.cuda = dist.device.type == "cuda"
        self.wall = 0.0  # seconds inside the profiled steps
        self.prof = start(cuda=self.cuda)

    def _now(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.dist.device)
        return time.perf_counter()

    def step_start(self) -> None:
        self.t0 = self._now()

    def step_end(self, step: int) -> float:
        """Seconds this step took; after the last one, also stops, writes the trace and prints the table (that
        time included)."""
        seconds = self._now() - self.t0
        self.wall += seconds
        if step == self.last_step:
            kind = "CUDA kernels" if self.cuda else "CPU ops"
            stop(self.prof, self.cuda, self.steps, self.wall * 1e6, self.trace,
                           f"steps {self.first}-{self.last_step}, rank 0, {kind}", self.dist.is_main)
            if self.dist.is_main:
                print(f"jambatrain: profiler traces in {os.path.dirname(self.trace)}", flush=True)
            seconds = self._now() - self.t0
        return seconds
