"""TokenShardLoader: DP/worker partition, determinism, resume, validation (synthetic shards)."""

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
from jambatrain.data.loader import TokenShardLoader, decode_shard, make_val_loader  # noqa: E402
from jambatrain.data.shards import ShardDataError, write_synthetic_shards  # noqa: E402
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
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


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
        assert loader.epoch == 1 and loader.batch_in_epoch == 0
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
    assert state["epoch"] * first.batches_per_epoch + state["batch_in_epoch"] == stop_at
    state = json.loads(json.dumps(state))  # must survive a checkpoint round trip
    resumed = TokenShardLoader(data_dir, "train", 2, 0, 2, num_workers=workers, seed=7)
    resumed.load_state_dict(state)
    got += [rows_of(b) for b in take(resumed, total - stop_at)]
    assert got == reference


def test_resume_reads_only_the_needed_shards(data_dir, monkeypatch):
    loaded = []
    real = loader_mod.decode_shard
    monkeypatch.setattr(loader_mod, "decode_shard", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    loader = TokenShardLoader(data_dir, "train", 4, 0, 1, shuffle=False)
    loader.load_state_dict({**loader.state_dict(), "batch_in_epoch": 7})  # samples 28..31: last shard
    batch = next(iter(loader))
    assert [os.path.basename(p) for p in loaded] == ["train-000003.tar"]  # holds samples 24..31
    assert rows_of(batch) == all_rows(data_dir)[28:32]


def test_state_dict_checks_the_data_settings(data_dir):
    loader = TokenShardLoader(data_dir, "train", 2, 0, 2)
    take(loader, 4)
    with pytest.raises(ValueError, match="seed"):
        TokenShardLoader(data_dir, "train", 2, 0, 2, seed=9).load_state_dict(loader.state_dict())
    boundary = {**loader.state_dict(), "epoch": 2, "batch_in_epoch": 0}
    other = TokenShardLoader(data_dir, "train", 2, 2, 3)
    other.load_state_dict(boundary)
    assert other.epoch == 2 and other.batch_in_epoch == 0


@pytest.mark.parametrize("before,after", [((2, 2), (3, 2)), ((2, 2), (1, 2)), ((3, 1), (2, 3)), ((1, 4), (2, 1))])
def test_resume_on_another_geometry_mid_epoch_neither_repeats_nor_loses(data_dir, before, after):
    """A job that comes back with another (data-parallel size, micro batch) mid-epoch reads each sample the first
    geometry had not read, once; resharded twice in a row; and the next epoch is whole again."""
    def run(geometry, state, batches=None):
        dp, mb = geometry
        seen, states = [], []
        for r in range(dp):
            loader = TokenShardLoader(data_dir, "train", mb, r, dp, seed=5)
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))  # through a checkpoint's JSON
            it, epoch, n = iter(loader), loader.epoch, 0
            while loader.epoch == epoch and (batches is None or n < batches):
                seen += rows_of(next(it))
                n += 1
            states.append(loader.state_dict())
        assert all(s == states[0] for s in states)  # every rank saves the same loader state
        return seen, states[0]

    seen1, state = run(before, None, batches=2)
    seen2, state = run(after, state, batches=1)
    seen3, state = run(before, state)  # back to the first geometry, to the end of the epoch
    used = seen1 + seen2 + seen3
    assert len(used) == len(set(used)), "a sample was read twice in one epoch"
    assert N_TRAIN - len(used) < 2 * max(before[0] * before[1], after[0] * after[1]), "samples were lost"
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0 and state["segments"] is None
    epoch1, _ = run(after, state)
    assert len(epoch1) == N_TRAIN // (after[0] * after[1]) * after[0] * after[1]


def test_val_loader_one_pass_per_iter(data_dir):
    val = make_val_loader(data_dir, 2, 0, 2)
    assert val.batches_per_epoch == 2 and val.dropped_per_epoch == 2
    first = [rows_of(b) for b in val]
    second = [rows_of(b) for b in val]
    assert len(first) == 2 and first == second
    assert [r for b in first for r in b] == all_rows(data_dir, "val")[:4]
    with_workers = make_val_loader(data_dir, 1, 1, 2, num_workers=2)
    assert [rows_of(b) for b in with_workers] == [[r] for r in all_rows(data_dir, "val")[5:10]]


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
    if fix_manifest:
        entry["sha256"], entry["bytes"] = file_sha256(path), len(data)
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
    assert len(rows) == N_TRAIN and good[19] not in rows
    assert rows[:19] == good[:19] and rows[19] == good[20]  # replaced by the next sample


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
    assert loader.skipped == 5 and len(rows) == N_TRAIN
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
    with pytest.raises(ShardDataError, match=r"train-000004.tar: sha256 differs"):
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
    assert loader.skipped == 8 and len(rows) == N_TRAIN and not set(rows) & set(good[:8])
    os.remove(os.path.join(bad, "train-000004.tar"))  # a missing shard: the same
    loader, rows = one_epoch(bad, on_error="skip")
    assert loader.skipped == 8 + 4 and len(rows) == N_TRAIN and not set(rows) & set(good[:8] + good[32:])


def test_skip_warnings_name_shard_and_sample_and_are_rate_limited(data_dir, tmp_path, capfd, monkeypatch):
    bad = damage(data_dir, str(tmp_path / "trunc"), 0, truncate_shard)  # samples 3..7 unreadable
    warnings = loader_mod._RateLimitedWarnings(burst=3, interval=3600)
    monkeypatch.setattr(loader_mod, "_SKIP_WARNINGS", warnings)
    loader, _ = one_epoch(bad, on_error="skip")
    lines = [line for line in capfd.readouterr().err.splitlines() if "skipped a bad sample" in line]
    assert loader.skipped == 5 and len(lines) == 3, lines
    for key, line in zip((3, 4, 5), lines):
        assert f"rank 0 skipped a bad sample (data.on_error=skip): shard {bad}/train-000000.tar: sample " \
               f"{key:010d}: " in line and "read 3 of 8" in line
    warnings.interval = 0  # the next warning says how many were held back
    one_epoch(bad, on_error="skip")
    lines = [line for line in capfd.readouterr().err.splitlines() if "skipped a bad sample" in line]
    assert "sample 0000000003" in lines[0] and "(2 more skipped since the last warning)" in lines[0]


def test_skip_count_is_summed_over_ranks_and_checkpointed(data_dir, tmp_path):
    """Rank 1 alone reads the damaged shard: once the ranks' uncounted skips are summed (train.py does it in
    the all-reduce of its logged metrics), every rank's state_dict holds the run's total, and a resume keeps it."""
    bad = damage(data_dir, str(tmp_path / "trunc"), 3, truncate_shard)  # rank 1's slice: samples 16..31
    loaders = [TokenShardLoader(bad, "train", 2, rank, 2, shuffle=False, on_error="skip") for rank in (0, 1)]
    for loader in loaders:
        take(loader, loader.batches_per_epoch)
    assert [lo.skipped for lo in loaders] == [0, 5] and not loaders[0].skips_counted
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
