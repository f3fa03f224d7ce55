"""The built-in default corpus: the running Python's standard library sources.

It needs no download, so smoke runs and tests always have real text. The
corpus depends on the Python version; the build is deterministic for a given
interpreter (its size and build time: docs/benchmarks.md, "CPU figures").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import sysconfig
import time

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
                           tokenizer_max_chars: int = 6_000_000, model_type: str = "bpe",
                           lock_timeout_s: float | None = None) -> dict:
    """Train a tokenizer on the stdlib and write its shards to ``out_dir``; return the manifest.

    Idempotent (returns the manifest at once when the build is complete and every shard and the tokenizer
    match their sha256; damaged ones are rebuilt) and safe when several processes call it: they serialize
    on ``out_dir/.prepare.lock`` (``build_lock``: a dead or stuck holder is reported, never waited on forever).
    """
    with build_lock(out_dir, lock_timeout_s):
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
        t0 = time.perf_counter()
        files = stdlib_documents(max_files)
        print(f"jambatrain: building the embedded corpus ({len(files)} .py files of this Python's standard library, "
              f"vocab {vocab_size}, seq_len {seq_len}) in {out_dir} (first use only)", flush=True)
        if not os.path.isfile(tokenizer):
            train_tokenizer(files, tokenizer[: -len(".model")], vocab_size, model_type=model_type,
                            num_threads=num_workers, max_chars=tokenizer_max_chars)
        manifest = write_shards(files, tokenizer, out_dir, seq_len, samples_per_shard=samples_per_shard,
                                num_workers=num_workers, val_fraction=val_fraction, vocab_size=vocab_size)
        split = {k: v["num_samples"] for k, v in manifest["splits"].items()}
        print(f"jambatrain: embedded corpus built in {time.perf_counter() - t0:.1f} s: {split.get('train', 0)} train "
              f"and {split.get('val', 0)} val samples", flush=True)
        return manifest


LOCK = ".prepare.lock"
LOCK_TIMEOUT_ENV = "JAMBATRAIN_PREPARE_LOCK_TIMEOUT"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _last_change(out_dir: str) -> float:
    """Newest mtime in ``out_dir``: a build that writes anything (tokenizer, shards, progress) is alive. The build
    renames its temporary files while a waiter looks, so a file listed here may be gone when it is stat'ed: skipped
    (the rename itself changed the directory's mtime)."""
    times = [os.path.getmtime(out_dir)]
    with os.scandir(out_dir) as it:
        for e in it:
            try:
                if e.is_file():
                    times.append(e.stat().st_mtime)
            except FileNotFoundError:
                pass
    return max(times)


@contextlib.contextmanager
def build_lock(out_dir: str, timeout_s: float | None = None, poll_s: float = 0.5):
    """Exclusive lock on ``out_dir/.prepare.lock`` for a corpus build, recording its holder (pid, host, start time)
    in the file. A waiter says once whom it waits for; when the recorded holder is a dead process of this host while
    the lock is still held (a child that inherited the descriptor outlived it), the lock file is replaced; when the
    build shows no sign of life (no file in ``out_dir`` changed) for ``timeout_s`` (default
    ``$JAMBATRAIN_PREPARE_LOCK_TIMEOUT`` or 1200 s), the waiter stops with an error naming the holder."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    if timeout_s is None:
        timeout_s = float(os.environ.get(LOCK_TIMEOUT_ENV, 1200))
    host, announced = socket.gethostname(), False
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path)
            since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, building since {since}" if holder
                   else "another process")
            if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                print(f"jambatrain: {path} is held but its builder ({who}) is gone (a child process it left behind "
                      "holds the lock); replacing the lock file and building here", file=sys.stderr, flush=True)
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                        os.unlink(path)
                f.close()
                continue
            if not announced:
                print(f"jambatrain: waiting for the corpus build in {out_dir} ({who})", file=sys.stderr, flush=True)
                announced = True
            idle = time.time() - _last_change(out_dir)
            f.close()
            if idle > timeout_s:
                raise ShardDataError(
                    f"the corpus build in {out_dir} ({who}) has written nothing for {idle:.0f} s: it looks stuck. "
                    f"Stop that process (or delete {path} if it is gone), then start again; {LOCK_TIMEOUT_ENV} sets "
                    "how long to wait")
            time.sleep(poll_s)
            continue
        try:
            if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:  # replaced while we waited: lock the new one
                raise FileNotFoundError
        except FileNotFoundError:
            f.close()
            continue
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": host, "since": time.time()}))
            f.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        return
