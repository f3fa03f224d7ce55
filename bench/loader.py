"""Throughput of TokenShardLoader for one DP rank.

    python bench/loader.py --workers 2 --batches 2000 --seq-len 4096 --micro-batch-size 8
    python bench/loader.py --http ...       # the same shards through a loopback HTTP server (Range requests)

Builds synthetic shards in a temp dir (reused on later runs) unless --data-dir
is given; the last line printed is ``loader tokens/s per process: X``. The
clock starts after the first batch (worker start-up excluded).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jambatrain.data.loader import TokenShardLoader  # noqa: E402
from jambatrain.data.shards import MANIFEST, write_synthetic_shards  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=8192, help="synthetic train samples")
    p.add_argument("--samples-per-shard", type=int, default=512)
    p.add_argument("--dp-size", type=int, default=1, help="simulate rank 0 of this many ranks")
    p.add_argument("--data-dir", default=None, help="existing shard directory (skips building)")
    p.add_argument("--http", action="store_true", help="read through a loopback HTTP server of the directory")
    p.add_argument("--http-delay-ms", type=float, default=0.0, help="latency the loopback server adds per request")
    p.add_argument("--prefetch", type=int, default=None, help="batches read ahead by threads (default: 4 for URLs)")
    args = p.parse_args(argv)

    data_dir = args.data_dir
    if data_dir is None:
        data_dir = os.path.join(tempfile.gettempdir(), f"jambatrain-bench-{args.seq_len}-{args.samples}"
                                f"-{args.samples_per_shard}-v2")  # v2: with record indexes
        if not os.path.isfile(os.path.join(data_dir, MANIFEST)):
            t0 = time.perf_counter()
            write_synthetic_shards(data_dir, {"train": args.samples}, args.seq_len, 32000, args.samples_per_shard)
            print(f"built {args.samples} samples in {data_dir} ({time.perf_counter() - t0:.1f} s)")
    location, server = data_dir, None
    if args.http:
        from jambatrain.data.remote import serve_directory

        server, location = serve_directory(data_dir, delay_s=args.http_delay_ms / 1000)
    kw = {} if args.prefetch is None else {"prefetch": args.prefetch}
    loader = TokenShardLoader(location, "train", args.micro_batch_size, 0, args.dp_size, num_workers=args.workers,
                              **kw)
    it = iter(loader)
    batch = next(it)
    tokens_per_batch = batch["input_ids"].numel()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    elapsed = time.perf_counter() - t0
    print(f"{args.batches} batches of {tuple(batch['input_ids'].shape)} from {location}, workers={args.workers}, "
          f"{elapsed:.2f} s, {loader.batches_per_epoch} batches/epoch, epoch now {loader.epoch}")
    if server is not None:
        server.shutdown()
    print(f"loader tokens/s per process: {args.batches * tokens_per_batch / elapsed:.3g}")


if __name__ == "__main__":
    main()
