"""Command-line data preparation: tokenizer training, shard writing, the default corpus."""
