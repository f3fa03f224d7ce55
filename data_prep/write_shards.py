"""Tokenize documents and write packed webdataset shards plus manifest.json.

    python -m data_prep.write_shards --inputs 'corpus/*.jsonl' --tokenizer tok/spm.model --out data/c4 --seq-len 4096

Re-running the same command resumes an interrupted build (finished shards are kept).
"""

import argparse

from jambatrain.data.shards import manifest_summary, write_shards


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="globs; a document is a file or a jsonl record")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, required=True, help="samples hold seq_len + 1 tokens")
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--target-shard-mb", type=float, default=64.0, help="used when --samples-per-shard is unset")
    p.add_argument("--num-workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for the val split")
    p.add_argument("--vocab-size", type=int, default=None, help="fail if the tokenizer is larger than this")
    p.add_argument("--overwrite", action="store_true", help="delete shards built with other settings")
    args = p.parse_args(argv)
    manifest = write_shards(args.inputs, args.tokenizer, args.out, args.seq_len,
                            samples_per_shard=args.samples_per_shard, target_shard_mb=args.target_shard_mb,
                            num_workers=args.num_workers, val_fraction=args.val_fraction,
                            vocab_size=args.vocab_size, overwrite=args.overwrite)
    print(manifest_summary(manifest))


if __name__ == "__main__":
    main()
