"""Build the built-in default corpus (this Python's standard library sources).

    python -m data_prep.default_corpus --out data/stdlib --vocab-size 4096 --seq-len 256
"""

import argparse

from jambatrain.data.corpus import prepare_default_corpus
from jambatrain.data.shards import manifest_summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-files", type=int, default=None, help="evenly spaced subset of the stdlib files")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args(argv)
    manifest = prepare_default_corpus(args.out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                      max_files=args.max_files, val_fraction=args.val_fraction,
                                      samples_per_shard=args.samples_per_shard, num_workers=args.num_workers)
    print(manifest_summary(manifest))


if __name__ == "__main__":
    main()
