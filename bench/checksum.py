"""What checkpoint checksums cost: a ~1 GB portable params file written with and without hashing (the hash runs on
the bytes as they stream to disk), then verified (read back and hashed) cold and warm.

    python bench/checksum.py [--gb 1.0] [--dir /path/on/the/checkpoint/disk] [--repeat 3]

Prints seconds and seconds per GB for each; docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import torch

from jambatrain import checkpoint


def drop_cache(path: str) -> bool:
    """Evict ``path`` from the page cache (posix_fadvise DONTNEED after fsync), so a read is a cold read."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = int(args.gb * 1e9) // 12  # fp32 master + 2 Adam moments per parameter, as the portable format stores them
    state = {"w@None": {"fp32": torch.randn(n), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}}
    d = tempfile.mkdtemp(dir=args.dir)
    try:
        path = os.path.join(d, "params_r00000_000.pt")
        best = {}
        for _ in range(args.repeat):  # alternating, best of each: the box is shared
            for label, sums in (("write, no checksum", None), ("write + xxh3_128 while writing", {})):
                t = time.perf_counter()
                checkpoint._fsync_write(path, lambda f: torch.save(state, f), sums)
                best[label] = min(best.get(label, 1e9), time.perf_counter() - t)
        rows = list(best.items())
        gb = os.path.getsize(path) / 1e9
        cold = drop_cache(path)
        t = time.perf_counter()
        digest = checkpoint.file_checksum(path)
        rows.append((f"verify (read + hash){', cold cache' if cold else ''}", time.perf_counter() - t))
        t = time.perf_counter()
        assert checkpoint.file_checksum(path) == digest == sums["params_r00000_000.pt"]
        rows.append(("verify, warm page cache (hash speed)", time.perf_counter() - t))
        fs = subprocess.run(["df", "-T", d], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
        print(f"file {gb:.3f} GB on {fs} ({d}); {os.cpu_count()} CPUs")
        for label, s in rows:
            print(f"  {label:40s} {s:7.2f} s   {s / gb:6.2f} s/GB")
        print(f"  checksum overhead on the write: {(rows[1][1] - rows[0][1]) / gb:+.2f} s/GB")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
