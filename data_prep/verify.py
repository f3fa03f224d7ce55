"""Check every shard of a data directory before training on it.

    python -m data_prep.verify data/c4 [--vocab-size 65536]

Reads every shard: sha256 against manifest.json, a readable tar, each sample's dtype and shape, token ids
below the vocabulary (the manifest's, or --vocab-size: the model's); and the tokenizer copy's sha256.
Prints one line per problem and a summary; exits 1 if there is any problem (re-running the write_shards
command that built the directory rewrites damaged shards).
"""

import argparse
import sys

from jambatrain.data.shards import REPAIR_HINT
from jambatrain.data.verify import verify_data_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="directory holding manifest.json and the shards")
    p.add_argument("--vocab-size", type=int, default=None, help="token ids must be below this (default: manifest)")
    args = p.parse_args(argv)
    problems, counts = verify_data_dir(args.dir, args.vocab_size)
    for problem in problems:
        print(problem)
    checked = f"{counts['shards']} shards, {counts['samples']} samples in {args.dir}"
    if problems:
        print(f"verify: {len(problems)} problems in {checked}; {REPAIR_HINT}", file=sys.stderr)
        return 1
    print(f"verify: OK: {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
