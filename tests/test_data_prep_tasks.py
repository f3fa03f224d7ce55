"""data_prep at corpus scale (issue 23.3): .parquet / .jsonl.gz / .jsonl.zst inputs, N tasks whose result is
byte-identical to one process, resumable; empty or unmatched inputs are one-line errors (issue 26.7)."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jambatrain.data.shards import write_shards, write_synthetic_shards  # noqa: E402
from jambatrain.data.tokenizer import iter_documents  # noqa: E402
from test_data_shards import SEQ, corpus, tokenizer  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="module")
def mixed(corpus, tmp_path_factory):
    """The corpus's .py files, and records spread over .jsonl.gz, .jsonl.zst, .parquet and .jsonl files."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    zstd = pytest.importorskip("zstandard")
    d = tmp_path_factory.mktemp("mixed")
    texts = [open(p, encoding="utf-8").read() for p in sorted(corpus.glob("*.py"))]
    for i, text in enumerate(texts[:4]):
        (d / f"a{i}.py").write_text(text, encoding="utf-8")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[4:7])
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (d / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[7:10]).encode()))
    pq.write_table(pa.table({"text": texts[10:], "id": list(range(len(texts[10:])))}), str(d / "d.parquet"))
    (d / "e.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": ""}) + "\n")
    return d, texts


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "data_prep.write_shards", *args], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def tree(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def test_compressed_and_parquet_inputs_are_read(mixed):
    d, texts = mixed
    got = [t for _, _, t in iter_documents(sorted(str(p) for p in d.iterdir()))]
    assert got == texts[:4] + texts[4:7] + texts[7:10] + texts[10:] + ["short", ""]


def test_two_tasks_equal_one_process_byte_for_byte_and_resume(mixed, tokenizer, tmp_path):
    d, _ = mixed
    common = ["--inputs", str(d / "*"), "--tokenizer", tokenizer, "--seq-len", str(SEQ),
              "--samples-per-shard", "8", "--val-fraction", "0.25", "--num-workers", "1"]
    one = write_shards([str(d / "*")], tokenizer, str(tmp_path / "one"), SEQ, samples_per_shard=8,
                       val_fraction=0.25, num_workers=1)
    assert len(one["splits"]["train"]["shards"]) >= 4 and len(one["splits"]["val"]["shards"]) >= 2
    # task 1 tokenizes its files, then "dies" mid-file (a stale temp file); the array is re-run: both resume
    out = str(tmp_path / "two")
    first = cli(*common, "--out", out, "--num-tasks", "2", "--task-index", "1", "--stage", "tokenize")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    (Path(out) / ".work" / ".000002.bin.tmp").write_bytes(b"partial")
    tasks = [cli(*common, "--out", out, "--num-tasks", "2", "--task-index", str(k)) for k in (0, 1)]
    outs = [(t.wait(timeout=300), t.stdout.read(), t.stderr.read()) for t in tasks]
    assert [o[0] for o in outs] == [0, 0], outs
    assert "tokens/s" in outs[0][2] and "ETA" in outs[0][2]
    assert "train:" in outs[0][1] and "task 1 of 2 done" in outs[1][1]
    single_task = cli(*common, "--out", str(tmp_path / "task1"), "--num-tasks", "1", "--task-index", "0")
    assert single_task.wait(timeout=300) == 0
    reference = tree(tmp_path / "one")
    assert set(reference) == set(tree(out)) == set(tree(tmp_path / "task1"))
    assert "manifest.json" in reference and any(n.endswith(".idx") for n in reference)
    for name in reference:
        assert tree(out)[name] == reference[name] == tree(tmp_path / "task1")[name], name
    assert not (Path(out) / ".work").exists()


def test_empty_and_unmatched_inputs_are_one_line_errors(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    for inputs, message in ((str(tmp_path / "nothing*.jsonl"), "no input files match"),
                            (str(tmp_path / "*.jsonl"), "0 train samples")):
        for extra in ([], ["--num-tasks", "1", "--task-index", "0"]):
            p = cli("--inputs", inputs, "--tokenizer", tokenizer, "--out", str(tmp_path / "o"), "--seq-len", "64",
                    *extra)
            rc, err = p.wait(timeout=120), p.stderr.read()
            lines = [line for line in err.splitlines() if not line.startswith(("write_shards: ", "tokenize"))]
            assert rc == 1 and message in err and "Traceback" not in err and not lines, err
    write_synthetic_shards(str(tmp_path / "zero"), {"train": 0, "val": 3}, 16, 100, 4)
    p = subprocess.run([sys.executable, "-m", "data_prep.verify", str(tmp_path / "zero")], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1 and "train split holds 0 samples" in p.stdout, p.stdout + p.stderr
