"""The built-in default corpus: the running Python's standard library sources.

It needs no download, so smoke runs and tests always have real text. The
corpus depends on the Python version; the build is deterministic for a given
interpreter (its size and build time: docs/benchmarks.md, "CPU figures").
"""

from __future__ import annotations

import fcntl
import os
import sys
import sysconfig

from jambatrain.data.shards import (MANIFEST, ShardDataError, damaged_shards, read_manifest, tokenizer_problem,
                                    write_shards)
from jambatrain.data.tokenizer import train_tokenizer

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_documents(max_files: int | None = None) -> list[str]:
    """Sorted ``.py`` files of the standard library (no tests, idlelib or site-packages).

    ``max_files`` keeps an evenly spaced, deterministic subset.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort()
    if max_files is not None and max_files < len(files):
        step = len(files) / max_files
        files = [files[int(i * step)] for i in range(max_files)]
    return files


def prepare_default_corpus(out_dir: str, vocab_size: int = 4096, seq_len: int = 256,
                           max_files: int | None = None, val_fraction: float = 0.02,
                           samples_per_shard: int = 1024, num_workers: int = 2,
                           tokenizer_max_chars: int = 6_000_000, model_type: str = "bpe") -> dict:
    """Train a tokenizer on the stdlib and write its shards to ``out_dir``; return the manifest.

    Idempotent (returns the manifest at once when the build is complete and every shard and the tokenizer
    match their sha256; damaged ones are rebuilt) and safe when several processes call it: they serialize
    on ``out_dir/.prepare.lock``.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".prepare.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            tokenizer = os.path.join(out_dir, "tokenizer.model")
            if os.path.isfile(os.path.join(out_dir, MANIFEST)):
                manifest = read_manifest(out_dir, check_files=False, check_tokenizer=False)
                if manifest["seq_len"] != seq_len or manifest["vocab_size"] != vocab_size:
                    raise ShardDataError(
                        f"{out_dir} holds a default corpus with seq_len={manifest['seq_len']}, vocab_size="
                        f"{manifest['vocab_size']}; requested seq_len={seq_len}, vocab_size={vocab_size}: "
                        "use another directory or delete this one")
                if problem := tokenizer_problem(out_dir, manifest):  # retrained below: the training is deterministic
                    print(f"prepare_default_corpus: {problem}; retraining it", file=sys.stderr)
                    if os.path.isfile(tokenizer):
                        os.remove(tokenizer)
                elif not damaged_shards(out_dir, manifest):
                    return manifest
                # else write_shards re-verifies every shard and rewrites the damaged ones
            files = stdlib_documents(max_files)
            if not os.path.isfile(tokenizer):
                train_tokenizer(files, tokenizer[: -len(".model")], vocab_size, model_type=model_type,
                                num_threads=num_workers, max_chars=tokenizer_max_chars)
            return write_shards(files, tokenizer, out_dir, seq_len, samples_per_shard=samples_per_shard,
                                num_workers=num_workers, val_fraction=val_fraction, vocab_size=vocab_size)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
