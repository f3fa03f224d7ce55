"""TokenShardLoader: DP/worker partition, determinism, resume, validation (synthetic shards)."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when pytest does not add it

from jambatrain.data import loader as loader_mod  # noqa: E402
from jambatrain.data import remote  # noqa: E402
from jambatrain.data.loader import TokenShardLoader, decode_shard, make_val_loader  # noqa: E402
from jambatrain.data.shards import (ShardDataError, record_digests, record_layout,  # noqa: E402
                                    write_synthetic_shards)
from jambatrain.data.tokenizer import file_sha256  # noqa: E402

SEQ, VOCAB, PER_SHARD = 16, 1000, 8
N_TRAIN = 36  # 5 shards: 8, 8, 8, 8, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(d), {"train": N_TRAIN, "val": 10}, SEQ, VOCAB, PER_SHARD, seed=1)
    return str(d)


def all_rows(data_dir, split="train"):
    """Samples read straight from the tars (independent of the loader), in manifest order."""
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    rows = []
    for entry in manifest["splits"][split]["shards"]:
        tokens, bad = decode_shard(os.path.join(data_dir, entry["name"]), entry, SEQ, VOCAB)
        assert not bad
        rows.extend(tuple(r) for r in tokens.tolist())
    return rows


def rows_of(batch):
    """The batch's samples as tuples; None for a row left out of the loss (a skipped bad sample)."""
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    rows = []
    for ids, labels, row in zip(batch["input_ids"], batch["labels"], full.tolist()):
        if (labels == -100).all():
            rows.append(None)
        else:
            assert torch.equal(ids[1:], labels[:-1])
            rows.append(tuple(row))
    return rows


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_manifest_layout(data_dir):
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    shards = manifest["splits"]["train"]["shards"]
    assert [s["num_samples"] for s in shards] == [8, 8, 8, 8, 4]
    assert [s["name"] for s in shards][:2] == ["train-000000.tar", "train-000001.tar"]
    assert all(file_sha256(os.path.join(data_dir, s["name"])) == s["sha256"] for s in shards)
    assert len(set(all_rows(data_dir))) == N_TRAIN


@pytest.mark.parametrize("dp_size,workers,batch", [(2, 2, 2), (3, 1, 2), (1, 0, 4), (5, 0, 2)])
def test_ranks_and_workers_partition_one_epoch(data_dir, dp_size, workers, batch):
    expected = set(all_rows(data_dir))
    seen, counts = [], []
    for rank in range(dp_size):
        loader = TokenShardLoader(data_dir, "train", batch, rank, dp_size, num_workers=workers, seed=3)
        batches = take(loader, loader.batches_per_epoch)
        counts.append(len(batches))
        assert all(b["input_ids"].shape == (batch, SEQ) for b in batches)
        seen.extend(r for b in batches for r in rows_of(b))
        assert loader.consumed_samples == len(batches) * dp_size * batch
    assert len(set(counts)) == 1 and counts[0] == N_TRAIN // (dp_size * batch)
    assert len(seen) == len(set(seen)), "a sample was seen twice within the epoch"
    assert set(seen) <= expected
    assert loader.dropped_per_epoch == N_TRAIN - len(seen) == N_TRAIN % (dp_size * batch)


def test_shuffle_is_deterministic_and_changes_per_epoch(data_dir):
    def epochs(seed):
        loader = TokenShardLoader(data_dir, "train", 4, 0, 1, seed=seed)
        rows = [r for b in take(loader, 2 * loader.batches_per_epoch) for r in rows_of(b)]
        return rows[:N_TRAIN], rows[N_TRAIN:]

    e0, e1 = epochs(0)
    assert (e0, e1) == epochs(0)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(all_rows(data_dir))
    assert epochs(1)[0] != e0
    plain = TokenShardLoader(data_dir, "train", 4, 0, 1, shuffle=False)
    assert [r for b in take(plain, 9) for r in rows_of(b)] == all_rows(data_dir)


def global_batches(data_dir, dp, micro, accum, steps, state=None, **kw):
    """Each optimizer step's samples as one list: micro step by micro step, rank by rank (what the trainer's
    gradient averages over); the final loader state."""
    loaders = [TokenShardLoader(data_dir, "train", micro, r, dp, seed=11, **kw) for r in range(dp)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
    its = [iter(lo) for lo in loaders]
    out = []
    for _ in range(steps):
        out.append([row for _ in range(accum) for it in its for row in rows_of(next(it))])
    states = [lo.state_dict() for lo in loaders]
    assert all(st == states[0] for st in states)  # every rank saves the same loader state
    return out, states[0]


@pytest.mark.parametrize("dp,micro,accum", [(1, 4, 2), (2, 4, 1), (2, 2, 2), (4, 1, 2), (8, 1, 1)])
def test_global_batches_do_not_depend_on_the_split(data_dir, dp, micro, accum):
    """Global batch i (8 samples) holds the same samples in the same order whether 1, 2, 4 or 8 ranks with any
    micro batch / accumulation split it, across epoch ends (36 samples: steps 4 and 8 straddle them)."""
    reference, _ = global_batches(data_dir, 1, 8, 1, 10)
    got, state = global_batches(data_dir, dp, micro, accum, 10)
    assert got == reference and state["consumed_samples"] == 80
    assert sorted(r for step in reference[:4] for r in step) + sorted(reference[4][:4]) != []  # non-empty
    assert len(set(r for step in reference[:4] for r in step)) == 32  # no repeat inside an epoch


@pytest.mark.parametrize("before,after", [((2, 2, 2), (1, 4, 2)), ((1, 8, 1), (2, 2, 2)), ((4, 1, 2), (8, 1, 1))])
def test_elastic_resume_continues_the_same_global_batches(data_dir, before, after):
    """A job saved at step 3 on one geometry and resumed on another sees exactly the global batches the
    uninterrupted run sees (mid-epoch, then across the epoch end)."""
    reference, _ = global_batches(data_dir, *before, 9)
    first, state = global_batches(data_dir, *before, 3)
    assert state["consumed_samples"] == 24
    second, state = global_batches(data_dir, *after, 6, state=state)
    assert first + second == reference and state["consumed_samples"] == 72


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_batches_do_not_depend_on_num_workers(data_dir):
    seqs = []
    for workers in (0, 2, 3):
        loader = TokenShardLoader(data_dir, "train", 2, 1, 2, num_workers=workers, seed=5)
        seqs.append([rows_of(b) for b in take(loader, 2 * loader.batches_per_epoch + 3)])
    assert seqs[0] == seqs[1] == seqs[2]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 12])  # mid-epoch 0, and mid-epoch 1 (9 batches per epoch)
def test_resume_matches_uninterrupted_run(data_dir, workers, stop_at):
    total = 20
    reference = [rows_of(b) for b in take(TokenShardLoader(data_dir, "train", 2, 0, 2, workers, seed=7), total)]
    first = TokenShardLoader(data_dir, "train", 2, 0, 2, num_workers=workers, seed=7)
    got = []
    for step, batch in enumerate(first):
        got.append(rows_of(batch))
        if step + 1 == stop_at:
            state = first.state_dict()
            break
    assert state["consumed_samples"] == stop_at * 4
    state = json.loads(json.dumps(state))  # must survive a checkpoint round trip
    resumed = TokenShardLoader(data_dir, "train", 2, 0, 2, num_workers=workers, seed=7)
    resumed.load_state_dict(state)
    got += [rows_of(b) for b in take(resumed, total - stop_at)]
    assert got == reference


def reads(monkeypatch):
    """Record every (file, bytes) the loaders read from local stores."""
    log = []
    real_read, real_range = remote.LocalStore.read, remote.LocalStore.read_range

    def read(self, name):
        data = real_read(self, name)
        log.append((name, len(data)))
        return data

    def read_range(self, name, start, length):
        log.append((name, length))
        return real_range(self, name, start, length)

    monkeypatch.setattr(remote.LocalStore, "read", read)
    monkeypatch.setattr(remote.LocalStore, "read_range", read_range)
    return log


def test_resume_reads_only_the_needed_records(data_dir, monkeypatch):
    log = reads(monkeypatch)
    loader = TokenShardLoader(data_dir, "train", 4, 0, 1, shuffle=False)
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": 28})  # samples 28..31: the 4th shard
    batch = next(iter(loader))
    assert rows_of(batch) == all_rows(data_dir)[28:32]
    record = loader.manifest["splits"]["train"]["shards"][3]["record_bytes"]
    assert log == [("train-000003.idx", 8 * 16)] + [("train-000003.tar", record)] * 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_rank_reads_only_its_share(data_dir, monkeypatch, shuffle):
    """4 ranks over one epoch: each reads its own 8 records (and the small indexes), none reads a shard whole."""
    log = reads(monkeypatch)
    per_rank = []
    for rank in range(4):
        log.clear()
        loader = TokenShardLoader(data_dir, "train", 2, rank, 4, shuffle=shuffle)
        take(loader, loader.batches_per_epoch)
        per_rank.append(sum(n for name, n in log if name.endswith(".tar")))
    record = loader.manifest["splits"]["train"]["shards"][0]["record_bytes"]
    assert per_rank == [4 * 2 * record] * 4


def test_state_dict_checks_the_data_settings(data_dir):
    loader = TokenShardLoader(data_dir, "train", 2, 0, 2)
    take(loader, 4)
    with pytest.raises(ValueError, match="seed"):
        TokenShardLoader(data_dir, "train", 2, 0, 2, seed=9).load_state_dict(loader.state_dict())
    boundary = {**loader.state_dict(), "consumed_samples": 2 * N_TRAIN}
    other = TokenShardLoader(data_dir, "train", 2, 2, 3)
    other.load_state_dict(boundary)
    assert other.epoch == 2 and other.batch_in_epoch == 0


def test_val_loader_one_pass_per_iter(data_dir):
    val = make_val_loader(data_dir, 2, 0, 2)
    assert val.batches_per_epoch == 2 and val.dropped_per_epoch == 2
    first = [rows_of(b) for b in val]
    second = [rows_of(b) for b in val]
    assert len(first) == 2 and first == second
    val_rows = all_rows(data_dir, "val")
    assert [r for b in first for r in b] == val_rows[0:2] + val_rows[4:6]  # rank 0 of 2: positions 0, 1, 4, 5
    with_workers = make_val_loader(data_dir, 1, 1, 2, num_workers=2)
    assert [rows_of(b) for b in with_workers] == [[r] for r in val_rows[1:10:2]]


def test_construction_errors(data_dir, tmp_path):
    with pytest.raises(ShardDataError, match=r"manifest.json missing in .*data_prep.write_shards"):
        TokenShardLoader(str(tmp_path), "train", 2, 0, 1)
    with pytest.raises(ShardDataError, match=r"vocab_size=1000.*vocab_size=999"):
        TokenShardLoader(data_dir, "train", 2, 0, 1, vocab_size=999)
    with pytest.raises(ShardDataError, match=r"seq_len=16.*seq_len=32"):
        TokenShardLoader(data_dir, "train", 2, 0, 1, seq_len=32)
    with pytest.raises(ShardDataError, match="fewer than"):
        TokenShardLoader(data_dir, "val", 8, 0, 2)
    TokenShardLoader(data_dir, "train", 2, 0, 1, vocab_size=1024, seq_len=SEQ)


# ---------------------------------------------------------------- damaged shards


def damage(src, dst, shard_index, edit, fix_manifest=True):
    """Copy ``src`` to ``dst`` and rewrite shard ``shard_index`` through ``edit(samples) -> samples``."""
    shutil.copytree(src, dst)
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    entry = manifest["splits"]["train"]["shards"][shard_index]
    path = os.path.join(dst, entry["name"])
    tokens, _ = decode_shard(path, entry, SEQ, VOCAB)
    samples = [{"__key__": f"{entry['first_index'] + i:010d}", "tokens.npy": t} for i, t in enumerate(tokens)]
    result = edit(samples)
    data = result if isinstance(result, bytes) else tar_bytes(result)
    open(path, "wb").write(data)
    if fix_manifest:  # as a build that wrote these bytes would have: checksums and record index agree with them
        entry["sha256"], entry["bytes"] = file_sha256(path), len(data)
        record = record_layout(data, len(tokens))
        entry.pop("record_bytes", None)
        if record:
            index = record_digests(data, len(tokens), record)
            open(os.path.join(dst, entry["index"]["name"]), "wb").write(index)
            entry["record_bytes"], entry["index"]["sha256"] = record, hashlib.sha256(index).hexdigest()
        json.dump(manifest, open(os.path.join(dst, "manifest.json"), "w"))
    return dst


def tar_bytes(samples):
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, compress=False) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def set_sample(index, value):
    def edit(samples):
        samples = [dict(s) for s in samples]
        samples[index]["tokens.npy"] = value
        return samples
    return edit


def one_epoch(data_dir, **kw):
    loader = TokenShardLoader(data_dir, "train", kw.pop("batch", 4), 0, 1, shuffle=False, **kw)
    batches = take(loader, loader.batches_per_epoch)
    return loader, [r for b in batches for r in rows_of(b)]


@pytest.mark.parametrize("value,message", [
    (np.full(SEQ + 1, 7, dtype=np.int64), r"int64\[17\], expected int32\[17\]"),
    (np.full(SEQ, 7, dtype=np.int32), r"int32\[16\], expected int32\[17\]"),
    (np.full(SEQ + 1, VOCAB, dtype=np.int32), r"token id 1000 outside \[0, vocab_size=1000\)"),
    (b"not an npy file", r"not a valid .npy"),
])
def test_bad_sample_raises_naming_shard_and_key(data_dir, tmp_path, value, message):
    bad = damage(data_dir, str(tmp_path / "bad"), 2, set_sample(3, value))
    with pytest.raises(ShardDataError, match=rf"train-000002.tar: sample 0000000019: .*{message}"):
        one_epoch(bad)
    loader, rows = one_epoch(bad, on_error="skip")
    assert loader.skipped == 1
    good = all_rows(data_dir)
    assert rows == good[:19] + [None] + good[20:]  # its row is left out of the loss, nothing takes its place


def test_bad_sample_through_workers(data_dir, tmp_path):
    bad = damage(data_dir, str(tmp_path / "bad"), 1, set_sample(0, np.zeros(SEQ + 1, np.float32)))
    loader = TokenShardLoader(bad, "train", 2, 0, 1, num_workers=2, shuffle=False)
    with pytest.raises(ShardDataError, match=r"train-000001.tar: sample 0000000008"):
        take(loader, loader.batches_per_epoch)


def test_truncated_tar(data_dir, tmp_path):
    def truncate(samples):
        return tar_bytes(samples)[: 3 * 1024 + 700]  # three whole samples, then a cut inside the 4th

    bad = damage(data_dir, str(tmp_path / "trunc"), 0, truncate)
    with pytest.raises(ShardDataError, match=r"train-000000.tar: sample 0000000003: .*read 3 of 8"):
        one_epoch(bad)
    loader, rows = one_epoch(bad, on_error="skip")
    assert loader.skipped == 5 and rows == all_rows(data_dir)[:3] + [None] * 5 + all_rows(data_dir)[8:]
    # without fixing the manifest the size check names the shard at construction
    bad2 = damage(data_dir, str(tmp_path / "trunc2"), 0, truncate, fix_manifest=False)
    with pytest.raises(ShardDataError, match=r"train-000000.tar has \d+ bytes"):
        TokenShardLoader(bad2, "train", 2, 0, 1)


def test_checksum_mismatch_and_missing_shard(data_dir, tmp_path):
    flipped = damage(data_dir, str(tmp_path / "flip"), 4, lambda s: s, fix_manifest=False)
    path = os.path.join(flipped, "train-000004.tar")
    data = bytearray(open(path, "rb").read())
    data[700] ^= 1  # a token byte of sample 0: the tar still parses
    open(path, "wb").write(bytes(data))
    with pytest.raises(ShardDataError, match=r"train-000004.tar: sample 0000000032: checksum differs"):
        one_epoch(flipped)
    _, rows = one_epoch(flipped, verify_checksums=False)  # without the check the flip goes unnoticed
    assert rows != all_rows(data_dir)
    os.remove(path)
    with pytest.raises(ShardDataError, match=r"train-000004.tar listed in .* is missing"):
        TokenShardLoader(flipped, "train", 2, 0, 1)


def truncate_shard(samples):
    return tar_bytes(samples)[: 3 * 1024 + 700]  # three whole samples, then a cut inside the 4th


def test_truncated_or_missing_shard_is_skipped_under_skip(data_dir, tmp_path, capfd):
    """A shard cut short (manifest untouched, as in the field) is refused at construction with on_error=raise,
    and with on_error=skip every sample of it is skipped (a warning names the shard) instead of failing."""
    bad = damage(data_dir, str(tmp_path / "trunc"), 0, truncate_shard, fix_manifest=False)
    with pytest.raises(ShardDataError, match=r"train-000000.tar has \d+ bytes.*data.on_error=skip"):
        TokenShardLoader(bad, "train", 2, 0, 1)
    loader, rows = one_epoch(bad, on_error="skip")
    assert "train-000000.tar has" in capfd.readouterr().err
    good = all_rows(data_dir)
    # issue 21.3: the shard is left out, the batches stay full, and no sample is repeated in its place
    assert loader.skipped == 8 and sorted(rows) == sorted(good[8:])
    os.remove(os.path.join(bad, "train-000004.tar"))  # a missing shard: the same
    loader, rows = one_epoch(bad, on_error="skip")
    assert loader.skipped == 8 + 4 and sorted(rows) == sorted(good[8:32])


def test_skip_over_a_truncated_shard_repeats_no_sample_on_two_ranks(data_dir, tmp_path):
    """Issue 21.3 as found (2 ranks, shuffled, a shard cut short in the field): two epochs on each rank hold every
    other sample once per epoch, batches full, and the shard's samples counted as skipped once per epoch."""
    bad = damage(data_dir, str(tmp_path / "trunc"), 1, truncate_shard, fix_manifest=False)
    good = all_rows(data_dir)
    loaders = [TokenShardLoader(bad, "train", 2, rank, 2, seed=4, on_error="skip") for rank in (0, 1)]
    assert loaders[0].batches_per_epoch == 7  # 28 usable samples / (2 ranks x 2)
    epochs = [[], []]
    for loader in loaders:
        for i, batch in enumerate(take(loader, 2 * loader.batches_per_epoch)):
            assert batch["input_ids"].shape == (2, SEQ)
            epochs[i // loader.batches_per_epoch].extend(rows_of(batch))
    for rows in epochs:
        assert sorted(rows) == sorted(good[:8] + good[16:])
    total = sum(lo.uncounted_skips() for lo in loaders)
    assert [lo.count_skips(total) for lo in loaders] == [16, 16]


def test_skip_warnings_name_shard_and_sample_and_are_rate_limited(data_dir, tmp_path, capfd, monkeypatch):
    bad = damage(data_dir, str(tmp_path / "trunc"), 0, truncate_shard)  # samples 3..7 unreadable
    warnings = loader_mod._RateLimitedWarnings(burst=3, interval=3600)
    monkeypatch.setattr(loader_mod, "_SKIP_WARNINGS", warnings)
    loader, _ = one_epoch(bad, on_error="skip")
    lines = [line for line in capfd.readouterr().err.splitlines() if "skipped a bad sample" in line]
    assert loader.skipped == 5 and len(lines) == 3, lines
    for key, line in zip((3, 4, 5), lines):
        assert f"rank 0 skipped a bad sample (data.on_error=skip; its row is left out of the loss): shard " \
               f"{bad}/train-000000.tar: sample " \
               f"{key:010d}: " in line and "read 3 of 8" in line
    warnings.interval = 0  # the next warning says how many were held back
    one_epoch(bad, on_error="skip")
    lines = [line for line in capfd.readouterr().err.splitlines() if "skipped a bad sample" in line]
    assert "sample 0000000003" in lines[0] and "(2 more skipped since the last warning)" in lines[0]


def test_skip_count_is_summed_over_ranks_and_checkpointed(data_dir, tmp_path):
    """Rank 1 alone reads the damaged shard: once the ranks' uncounted skips are summed (train.py does it in
    the all-reduce of its logged metrics), every rank's state_dict holds the run's total, and a resume keeps it."""
    bad = damage(data_dir, str(tmp_path / "trunc"), 3, truncate_shard)  # samples 27..31 unreadable
    loaders = [TokenShardLoader(bad, "train", 2, rank, 2, shuffle=False, on_error="skip") for rank in (0, 1)]
    for loader in loaders:
        take(loader, loader.batches_per_epoch)
    assert [lo.skipped for lo in loaders] == [2, 3] and not loaders[0].skips_counted  # samples 27..31, interleaved
    total = sum(lo.uncounted_skips() for lo in loaders)
    assert [lo.count_skips(total) for lo in loaders] == [5, 5]
    assert [lo.state_dict()["skipped"] for lo in loaders] == [5, 5] and loaders[0].skips_counted
    resumed = TokenShardLoader(bad, "train", 2, 0, 2, shuffle=False, on_error="skip")
    resumed.load_state_dict(loaders[0].state_dict())
    assert resumed.skipped == 5 and resumed.uncounted_skips().item() == 0 and resumed.skips_counted


def test_verify_cli_names_every_problem(data_dir, tmp_path):
    def verify(path, *args):
        return subprocess.run([sys.executable, "-m", "data_prep.verify", path, *args], capture_output=True,
                              text=True, timeout=120, cwd=str(Path(__file__).resolve().parents[1]))

    good = verify(data_dir)
    assert good.returncode == 0 and "verify: OK: 7 shards, 46 samples" in good.stdout, good.stdout + good.stderr
    assert verify(data_dir, "--vocab-size", "10").returncode == 1  # the model's vocabulary is smaller
    bad = damage(data_dir, str(tmp_path / "bad"), 0, truncate_shard, fix_manifest=False)
    damage(bad, str(tmp_path / "bad2"), 2, set_sample(3, np.full(SEQ + 1, VOCAB, dtype=np.int32)))
    bad = str(tmp_path / "bad2")
    path = os.path.join(bad, "train-000004.tar")
    data = bytearray(open(path, "rb").read())
    data[700] ^= 1  # a token byte of sample 0: the tar still parses, only the checksum tells
    open(path, "wb").write(bytes(data))
    result = verify(bad)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and "verify: 4 problems in 7 shards, 46 samples" in result.stderr
    assert any("train-000000.tar has" in line and "truncated" in line for line in lines), lines
    assert any("train-000000.tar: sample 0000000003:" in line and "read 3 of 8" in line for line in lines), lines
    assert any("train-000002.tar: sample 0000000019: token id 1000 outside" in line for line in lines), lines
    assert any("train-000004.tar: sha256 differs" in line for line in lines), lines
    assert len(lines) == 4, lines  # the truncated shard: its size and its first unreadable sample, once each


def test_a_checkpoint_of_the_per_rank_order_resumes_at_the_same_depth(data_dir, capfd):
    """Loader state format 1 (per-rank contiguous slices, before the global stream): continued at the same
    number of consumed samples, with a warning that the order changes."""
    old = {"format": 1, "split": "train", "epoch": 1, "batch_in_epoch": 3, "segments": None, "seed": 0,
           "shuffle": True, "dp_size": 2, "micro_batch_size": 2, "num_samples": N_TRAIN, "skipped": 4}
    loader = TokenShardLoader(data_dir, "train", 4, 0, 1)
    loader.load_state_dict(old)
    assert loader.consumed_samples == N_TRAIN + 12 and loader.skipped == 4 and loader.epoch == 1
    assert "older per-rank data order" in capfd.readouterr().err
    loader.load_state_dict({**old, "segments": [[0, 10], [20, 36]], "batch_in_epoch": 1})  # resharded mid-epoch
    assert loader.consumed_samples == N_TRAIN + 10 + 4
