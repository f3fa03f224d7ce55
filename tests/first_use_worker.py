"""Run under torchrun by tests/test_first_use.py: the trainer's own ``prepare_data`` builds the embedded corpus on
local rank 0 after the gloo process group is up, ``REPEAT`` times into fresh directories.

A thread holds a lock for the whole run and the tokenizer loader is wrapped to take it: the hazard of forking while
another thread holds a lock (gloo's, OpenMP's, the allocator's) made deterministic. A forked pool worker inherits the
held lock with no thread to release it and hangs; a spawned one starts clean. ``os.fork`` calls are counted too."""
import json
import os
import sys
import threading

import torch
import torch.distributed as dist

from jambatrain.config import TrainConfig
from jambatrain.data import corpus, shards
from jambatrain.parallel import init_distributed
from jambatrain.train import prepare_data


def main(root: str, repeat: int) -> None:
    held, release, parent = threading.Lock(), threading.Event(), os.getpid()

    def holder():
        with held:
            release.wait()

    threading.Thread(target=holder, daemon=True).start()
    while not held.locked():
        pass
    real_load = shards.load_tokenizer

    def trapped_load(path):
        if os.getpid() != parent:  # a forked child: the lock stays held, by a thread it does not have
            held.acquire()
        return real_load(path)

    shards.load_tokenizer = trapped_load
    forks, real_fork = [], os.fork
    os.fork = lambda: forks.append(1) or real_fork()
    real_docs = corpus.stdlib_documents
    corpus.stdlib_documents = lambda max_files=None: real_docs(40)  # a small corpus: the test is about processes

    cfg = TrainConfig()
    cfg.data.prepare, cfg.data.vocab_size, cfg.data.seq_len = "stdlib", 500, 32
    dist_info = init_distributed(cfg.parallel)
    results = []
    for i in range(repeat):
        torch.manual_seed(i)
        x = torch.randn(64, 64)
        dist.all_reduce(x)  # gloo busy right before the build
        cfg.data.dir = os.path.join(root, f"cache{i}")
        data_dir = prepare_data(cfg, dist_info)
        with open(os.path.join(data_dir, "manifest.json")) as f:
            results.append(json.load(f)["splits"]["train"]["num_samples"])
    # both ranks report on the one stdout pipe: the line goes out in one write (atomic under PIPE_BUF), so the two
    # ranks' lines cannot interleave (print writes the text and its newline apart when stdout is unbuffered)
    sys.stdout.flush()
    os.write(1, ("RESULT " + json.dumps({"rank": dist_info.rank, "samples": results, "forks": len(forks)}) + "\n")
             .encode())
    release.set()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
