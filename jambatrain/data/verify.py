"""Check a shard directory (or URL) up front: every problem the loader would meet mid-run, found before training.

Per shard: listed file present with its size and sha256, a readable tar holding the listed samples in order,
each sample an int32 array of ``seq_len + 1`` token ids in ``[0, vocab_size)``; and the tokenizer copy with the
manifest's sha256. ``python -m data_prep.verify DIR`` prints one line per problem and a summary.
"""
from __future__ import annotations

import os

import hashlib

from jambatrain.data.loader import read_shard, sample_key
from jambatrain.data.remote import StoreError, is_url, open_store
from jambatrain.data.shards import ShardDataError, read_manifest, shard_file_problem, tokenizer_problem


def verify_data_dir(data_dir: str, vocab_size: int | None = None) -> tuple[list[str], dict]:
    """``(problems, counts)``: one message per problem (a whole-shard problem once, not per sample) and the
    numbers of shards and samples checked. ``vocab_size`` (default the manifest's) bounds the token ids."""
    try:
        manifest = read_manifest(data_dir, check_files=False, check_tokenizer=False)
    except ShardDataError as exc:
        return [str(exc)], {"shards": 0, "samples": 0}
    vocab = vocab_size or manifest["vocab_size"]
    remote = is_url(data_dir)
    store = open_store(data_dir)
    problems = [p for p in [None if remote else tokenizer_problem(data_dir, manifest)] if p]
    shards = samples = 0
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            shards += 1
            samples += int(entry["num_samples"])
            path = store.url(entry["name"])
            data = None
            if remote:
                data, problem = _remote_problems(store, entry)
                problems.extend(problem)
                if data is None:
                    continue
            else:
                problem = shard_file_problem(data_dir, entry, checksum=True)
                if problem:
                    problems.append(problem)
                if not os.path.isfile(path):
                    continue
            try:  # decoded even when the checksum differs: name the samples that are unusable
                _, bad, whole, first_bad = read_shard(path, entry, manifest["seq_len"], vocab, verify_checksum=False,
                                                      data=data)
            except ShardDataError as exc:
                problems.append(str(exc))
                continue
            problems.extend(bad[i] for i in sorted(bad))
            if whole:
                problems.append(whole.replace("{key}", sample_key(entry, first_bad)))
    train = manifest["splits"].get("train", {}).get("num_samples", 0)
    if not train:
        problems.append(f"{data_dir}: the train split holds 0 samples: the build had too little text for one "
                        "sample of seq_len + 1 tokens; rebuild with more inputs or a smaller --seq-len")
    return problems, {"shards": shards, "samples": samples}


def _remote_problems(store, entry: dict) -> tuple[bytes | None, list[str]]:
    """A shard behind a URL: ``(its bytes or None, problems)`` (missing, size, sha256, record index)."""
    url = store.url(entry["name"])
    try:
        data = store.read(entry["name"])
    except FileNotFoundError:
        return None, [f"shard {url} listed in the manifest is missing"]
    except (StoreError, OSError) as exc:
        return None, [str(exc)]
    problems = []
    if "bytes" in entry and len(data) != entry["bytes"]:
        problems.append(f"shard {url} has {len(data)} bytes, the manifest says {entry['bytes']}: it is truncated or "
                        "was replaced")
    elif "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append(f"shard {url}: sha256 differs from the manifest (file corrupt or replaced)")
    if isinstance(entry.get("index"), dict):
        try:
            index = store.read(entry["index"]["name"])
        except (StoreError, OSError) as exc:
            index, problems = None, problems + [f"record index of {url}: {exc}"]
        if index is not None and hashlib.sha256(index).hexdigest() != entry["index"]["sha256"]:
            problems.append(f"record index {store.url(entry['index']['name'])} differs from the manifest's sha256")
    return data, problems
