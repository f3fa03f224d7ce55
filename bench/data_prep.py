"""Data-prep throughput: tokens/s per tokenizer process (one core) of write_shards.

    python bench/data_prep.py --max-files 300 --workers 1

Corpus: this Python's standard library sources (no download); the tokenizer (BPE, 4096) is trained once into a
temp dir and reused. Prints ``data prep tokens/s per core: X`` last (tokenize + pack + write + checksums).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jambatrain.data.corpus import stdlib_documents  # noqa: E402
from jambatrain.data.shards import write_shards  # noqa: E402
from jambatrain.data.tokenizer import train_tokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-files", type=int, default=300)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    files = stdlib_documents(args.max_files)
    root = os.path.join(tempfile.gettempdir(), "jambatrain-bench-prep")
    tok = os.path.join(root, "spm.model")
    if not os.path.isfile(tok):
        os.makedirs(root, exist_ok=True)
        train_tokenizer(files, tok[: -len(".model")], 4096, max_chars=3_000_000)
    out = os.path.join(root, "shards")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = write_shards(files, tok, out, args.seq_len, num_workers=args.workers, samples_per_shard=256)
    elapsed = time.perf_counter() - t0
    tokens = sum(info["num_tokens"] + info["dropped_tail_tokens"] for info in manifest["splits"].values())
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"{len(files)} files, {mb:.1f} MB, {tokens:,} tokens in {elapsed:.2f} s with {args.workers} tokenizer "
          f"process(es)")
    print(f"data prep tokens/s per core: {tokens / elapsed / args.workers:.3g}")


if __name__ == "__main__":
    main()
