"""Tokenize documents and write packed webdataset shards plus manifest.json.

    python -m data_prep.write_shards --inputs 'corpus/*.jsonl' --tokenizer tok/spm.model --out data/c4 --seq-len 4096

Inputs: text files, .jsonl / .jsonl.gz / .jsonl.zst (field "text"; .zst needs zstandard) and .parquet (column
"text"; needs pyarrow): pip install 'jambatrain[prep]'. Re-running the same command resumes an interrupted build
(finished shards are kept) and re-verifies a finished one.

Split over N tasks (e.g. a SLURM array; the tasks share --out on one filesystem), the result byte-identical to one
process:

    sbatch --array=0-31 --wrap 'python -m data_prep.write_shards ... --num-tasks 32 --task-index $SLURM_ARRAY_TASK_ID'

Each task tokenizes its share of the input files, waits for the others, writes its share of the shards; task 0
then writes manifest.json. A task that died is re-run with the same arguments (it resumes). If the array cannot run
all at once, run it twice: --stage tokenize, then (after it) --stage all.
"""

import argparse
import sys

from jambatrain.data.shards import ShardDataError, manifest_summary, write_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="globs; a document is a file or a jsonl/parquet record")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, required=True, help="samples hold seq_len + 1 tokens")
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--target-shard-mb", type=float, default=64.0, help="used when --samples-per-shard is unset")
    p.add_argument("--num-workers", type=int, default=2, help="tokenizer processes (per task)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for the val split")
    p.add_argument("--vocab-size", type=int, default=None, help="fail if the tokenizer is larger than this")
    p.add_argument("--overwrite", action="store_true", help="delete shards built with other settings")
    p.add_argument("--num-tasks", type=int, default=None, help="split the build over this many tasks")
    p.add_argument("--task-index", type=int, default=None, help="this task (0 .. num-tasks - 1)")
    p.add_argument("--stage", choices=["all", "tokenize"], default="all", help="with --num-tasks")
    args = p.parse_args(argv)
    try:
        if args.num_tasks is None:
            manifest = write_shards(args.inputs, args.tokenizer, args.out, args.seq_len,
                                    samples_per_shard=args.samples_per_shard, target_shard_mb=args.target_shard_mb,
                                    num_workers=args.num_workers, val_fraction=args.val_fraction,
                                    vocab_size=args.vocab_size, overwrite=args.overwrite)
        else:
            from jambatrain.data.prep_tasks import write_shards_task

            if args.task_index is None:
                p.error("--num-tasks needs --task-index (e.g. $SLURM_ARRAY_TASK_ID)")
            manifest = write_shards_task(args.inputs, args.tokenizer, args.out, args.seq_len, args.task_index,
                                         args.num_tasks, samples_per_shard=args.samples_per_shard,
                                         target_shard_mb=args.target_shard_mb, num_workers=args.num_workers,
                                         val_fraction=args.val_fraction, stage=args.stage,
                                         vocab_size=args.vocab_size)
    except (ShardDataError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"write_shards: {exc}", file=sys.stderr)
        return 1
    if manifest is not None:
        print(manifest_summary(manifest))
    else:
        print(f"write_shards: task {args.task_index} of {args.num_tasks} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
