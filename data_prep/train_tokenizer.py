"""Train a SentencePiece tokenizer.

    python -m data_prep.train_tokenizer --inputs 'corpus/**/*.jsonl' --out tok/spm --vocab-size 32000
"""

import argparse

from jambatrain.data.tokenizer import file_sha256, train_tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True,
                   help="globs of .txt/.py/.md/.jsonl (field 'text')/.parquet (needs pyarrow) files")
    p.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--user-defined-symbols", nargs="*", default=[])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--max-chars", type=int, default=None, help="stop reading inputs after this many characters")
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--num-threads", type=int, default=2)
    args = p.parse_args(argv)
    path = train_tokenizer(args.inputs, args.out, args.vocab_size, model_type=args.model_type,
                           byte_fallback=not args.no_byte_fallback, user_defined_symbols=args.user_defined_symbols,
                           max_sentences=args.max_sentences, num_threads=args.num_threads, max_chars=args.max_chars,
                           character_coverage=args.character_coverage)
    print(f"wrote {path} (sha256 {file_sha256(path)})")


if __name__ == "__main__":
    main()
