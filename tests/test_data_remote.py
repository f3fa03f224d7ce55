"""Shards read from a URL (issue 23.2): a loopback HTTP server with Range support, a flaky one that drops
connections mid-body, `python -m http.server` (no Range support), a dead server, a missing URL."""
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import free_port  # noqa: E402
from jambatrain.data.loader import TokenShardLoader  # noqa: E402
from jambatrain.data.remote import serve_directory  # noqa: E402
from jambatrain.data.shards import ShardDataError, read_manifest, write_synthetic_shards  # noqa: E402
from test_data_loader import N_TRAIN, PER_SHARD, SEQ, VOCAB, rows_of, take  # noqa: E402

FAST = {"attempts": 4, "backoff": 0.01, "timeout": 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic_remote")
    write_synthetic_shards(str(d), {"train": N_TRAIN, "val": 10}, SEQ, VOCAB, PER_SHARD, seed=1)
    return str(d)


@pytest.fixture
def server(data_dir):
    srv, url = serve_directory(data_dir)
    yield url
    srv.shutdown()


def batches(location, dp=2, n=20, state=None, **kw):
    out, states = [], []
    for rank in range(dp):
        loader = TokenShardLoader(location, "train", 2, rank, dp, seed=3, store_options=FAST, **kw)
        if state is not None:
            loader.load_state_dict(state)
        out.append([rows_of(b) for b in take(loader, n)])
        states.append(loader.state_dict())
    return out, states[0]


@pytest.mark.parametrize("workers,prefetch", [(0, None), (0, 0), (2, 2)])
def test_url_gives_the_batches_of_the_local_dir(data_dir, server, workers, prefetch):
    assert batches(server, num_workers=workers, prefetch=prefetch) == batches(data_dir)


def test_resume_from_a_url_is_exact(data_dir, server):
    reference, _ = batches(data_dir, n=14)
    first, state = batches(server, n=5)
    second, _ = batches(server, n=9, state=state)
    assert [a + b for a, b in zip(first, second)] == reference


def test_a_server_that_drops_connections_mid_shard_is_survived(data_dir):
    srv, url = serve_directory(data_dir, drop_every=3)  # every 3rd response is cut half-way through its body
    try:
        loader = TokenShardLoader(url, "train", 2, 0, 1, seed=3, store_options={**FAST, "attempts": 12})
        got = [rows_of(b) for b in take(loader, 20)]
        assert loader._plan.store.retries > 5
    finally:
        srv.shutdown()
    local = TokenShardLoader(data_dir, "train", 2, 0, 1, seed=3)
    assert got == [rows_of(b) for b in take(local, 20)]


def test_plain_python_http_server_without_range_support(data_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", data_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/manifest.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        assert batches(url, dp=2, n=10) == batches(data_dir, dp=2, n=10)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_missing_url_and_dead_server_are_one_clear_error(data_dir, tmp_path):
    srv, url = serve_directory(str(tmp_path))  # serves an empty directory
    try:
        with pytest.raises(ShardDataError, match=rf"{url}/nope/manifest.json not found .*check data.dir"):
            read_manifest(f"{url}/nope")
    finally:
        srv.shutdown()
    dead = f"http://127.0.0.1:{free_port()}/data"
    with pytest.raises(ShardDataError, match=rf"cannot read {dead}/manifest.json: 4 attempts failed"):
        read_manifest(dead, store_options=FAST)


def test_server_gone_mid_run_names_the_url_or_skips(data_dir):
    srv, url = serve_directory(data_dir)
    loader = TokenShardLoader(url, "train", 2, 0, 1, seed=3, store_options=FAST, prefetch=0)
    skipping = TokenShardLoader(url, "train", 2, 0, 1, seed=3, store_options=FAST, on_error="skip", prefetch=0)
    skipping.load_state_dict({**skipping.state_dict(), "consumed_samples": 2 * N_TRAIN})  # epoch 2: other records
    take(loader, 1)
    srv.shutdown()
    srv.server_close()
    with pytest.raises(ShardDataError, match=rf"cannot read {url}/train-00000\d\.(tar|idx)"
                                             r".*4 attempts failed"):
        take(loader, 20)
    rows = [r for b in take(skipping, 3) for r in rows_of(b)]
    assert rows == [None] * 6 and skipping.skipped == 6


def test_corrupt_record_behind_a_url_is_caught_by_its_digest(data_dir, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(data_dir, bad)
    path = os.path.join(bad, "train-000000.tar")
    data = bytearray(open(path, "rb").read())
    data[700] ^= 1  # a token byte of sample 0
    open(path, "wb").write(bytes(data))
    srv, url = serve_directory(bad)
    try:
        loader = TokenShardLoader(url, "train", 4, 0, 1, shuffle=False, store_options=FAST)
        with pytest.raises(ShardDataError, match=r"train-000000.tar: sample 0000000000: checksum differs"):
            take(loader, 1)
    finally:
        srv.shutdown()


def test_fsspec_and_pipe_stores_give_the_same_batches(data_dir):
    """fsspec URLs (file:// here; s3:// and gs:// take the same path with s3fs / gcsfs) and webdataset-style
    pipe: commands (one command per read, {name} the file)."""
    pytest.importorskip("fsspec")
    reference = batches(data_dir, n=6)
    assert batches(f"file://{data_dir}", n=6) == reference
    assert batches(f"pipe:cat {data_dir}/{{name}}", n=6) == reference
    with pytest.raises(ShardDataError, match=r"cannot read pipe:cat /nonexistent/manifest.json: 4 attempts"):
        read_manifest("pipe:cat /nonexistent/{name}", store_options=FAST)


def test_verify_cli_reads_a_url(data_dir, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(data_dir, bad)
    path = os.path.join(bad, "train-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[700] ^= 1
    open(path, "wb").write(bytes(data))
    os.remove(os.path.join(bad, "train-000003.tar"))
    for directory, rc in ((data_dir, 0), (bad, 1)):
        srv, url = serve_directory(directory)
        try:
            p = subprocess.run([sys.executable, "-m", "data_prep.verify", url], capture_output=True, text=True,
                               timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
        finally:
            srv.shutdown()
        assert p.returncode == rc, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines == [f"shard {url}/train-000001.tar: sha256 differs from the manifest (file corrupt or replaced)",
                     f"shard {url}/train-000003.tar listed in the manifest is missing"], lines
