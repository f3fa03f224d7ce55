"""Tokenizer training, shard writing/resume, manifest validation, default corpus, CLIs."""

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # repo root, when pytest does not add it

from jambatrain.data import shards as shards_mod  # noqa: E402
from jambatrain.data.corpus import prepare_default_corpus, stdlib_documents  # noqa: E402
from jambatrain.data.loader import TokenShardLoader, decode_shard  # noqa: E402
from jambatrain.data.shards import ShardDataError, read_manifest, write_shards  # noqa: E402
from jambatrain.data.tokenizer import file_sha256, iter_documents, load_tokenizer, train_tokenizer  # noqa: E402

VOCAB, SEQ = 400, 32
TRICKY = "def f(x):\n\treturn  x  # trailing   \n\n    \u00e9\u4e2d\U0001F600 tab\tend\r\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 stdlib files plus a jsonl with two records; documents are in sorted path order."""
    d = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(stdlib_documents(max_files=12)):
        (d / f"doc{i:02d}.py").write_text(open(path, encoding="utf-8").read()[:6000], encoding="utf-8")
    with open(d / "z.jsonl", "w") as f:
        f.write(json.dumps({"text": TRICKY}) + "\n\n" + json.dumps({"text": "second record"}) + "\n")
    return d


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_tokenizer([str(corpus / "*")], str(tmp_path_factory.mktemp("tok") / "spm"), VOCAB)


def build(corpus, tokenizer, out, **kw):
    args = dict(samples_per_shard=40, num_workers=2, val_fraction=0.25)
    args.update(kw)
    return write_shards([str(corpus / "*.py"), str(corpus / "*.jsonl")], tokenizer, str(out), SEQ, **args)


@pytest.fixture(scope="module")
def built(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, build(corpus, tokenizer, out)


def documents(corpus):
    paths = sorted(str(p) for p in corpus.iterdir())
    return [text for _, _, text in iter_documents(paths)]


def stream(out, manifest, split):
    rows = []
    for entry in manifest["splits"][split]["shards"]:
        tokens, bad = decode_shard(str(out / entry["name"]), entry, SEQ, VOCAB)
        assert not bad
        rows.append(tokens)
    return np.concatenate(rows)


def test_tokenizer_round_trip_and_determinism(corpus, tokenizer, tmp_path):
    sp = load_tokenizer(tokenizer)
    assert sp.get_piece_size() == VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    for text in documents(corpus):
        assert sp.decode(sp.encode(text)) == text
    assert sp.decode(sp.encode(TRICKY)) == TRICKY
    again = train_tokenizer([str(corpus / "*")], str(tmp_path / "again"), VOCAB)
    assert file_sha256(again) == file_sha256(tokenizer)
    other = train_tokenizer([str(corpus / "*.py")], str(tmp_path / "other"), VOCAB, model_type="unigram")
    assert file_sha256(other) != file_sha256(tokenizer)


def test_jsonl_without_text_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\""):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))


def test_shards_hold_the_documents_in_order(corpus, tokenizer, built):
    out, manifest = built
    sp = load_tokenizer(tokenizer)
    assert manifest == read_manifest(str(out)) and manifest["format"] == 1
    assert (manifest["seq_len"], manifest["vocab_size"], manifest["eos_id"]) == (SEQ, VOCAB, 2)
    assert manifest["tokenizer"]["sha256"] == file_sha256(tokenizer) == file_sha256(str(out / "tokenizer.model"))
    docs = documents(corpus)
    for split, wanted in (("train", [d for i, d in enumerate(docs) if (i + 1) % 4]),
                          ("val", [d for i, d in enumerate(docs) if (i + 1) % 4 == 0])):
        info = manifest["splits"][split]
        tokens = stream(out, manifest, split)
        assert tokens.shape == (info["num_samples"], SEQ + 1) and info["num_tokens"] == tokens.size
        assert [s["num_samples"] for s in info["shards"]][:-1] == [40] * (len(info["shards"]) - 1)
        assert all(file_sha256(str(out / s["name"])) == s["sha256"] for s in info["shards"])
        expected = np.concatenate([sp.encode(d) + [2] for d in wanted])
        assert len(expected) - tokens.size == info["dropped_tail_tokens"] < SEQ + 1
        assert np.array_equal(tokens.ravel(), expected[: tokens.size])
        first_doc = tokens.ravel()[: list(tokens.ravel()).index(2)]
        assert sp.decode(first_doc.tolist()) == wanted[0]


def test_loader_yields_every_written_sample(built):
    out, manifest = built
    loader = TokenShardLoader(str(out), "train", 1, 0, 1, shuffle=False, vocab_size=512)
    assert loader.batches_per_epoch == manifest["splits"]["train"]["num_samples"]
    it = iter(loader)
    got = np.stack([next(it)["input_ids"][0].numpy() for _ in range(loader.batches_per_epoch)])
    assert np.array_equal(got, stream(out, manifest, "train")[:, :-1])


def test_rerun_skips_finished_work(corpus, tokenizer, built, tmp_path, monkeypatch):
    ref_dir, ref = built
    out = tmp_path / "resume"
    build(corpus, tokenizer, out)
    stamp = lambda: {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}  # noqa: E731
    before = stamp()
    assert build(corpus, tokenizer, out) == ref and stamp() == before  # complete: nothing redone

    # crash mid-corpus: manifest never written, progress lists the finished shards
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    train = manifest["splits"]["train"]["shards"]
    keep = {"train": next(i for i, s in enumerate(train) if s["next"][0] >= 4) + 1, "val": 1}
    assert keep["train"] < len(train) - 2 and len(manifest["splits"]["val"]["shards"]) > 2
    finished = {s: manifest["splits"][s]["shards"][: keep[s]] for s in keep}
    for split in keep:
        for entry in manifest["splits"][split]["shards"][keep[split]:]:
            (out / entry["name"]).unlink()
    (out / f".train-{keep['train']:06d}.tar.tmp").write_bytes(b"half-written")
    (out / "progress.json").write_text(json.dumps(
        {"config": manifest["config"], "splits": {s: {"shards": v} for s, v in finished.items()}}))
    encoded = []
    real = shards_mod._encode
    monkeypatch.setattr(shards_mod, "_encode", lambda item: encoded.append(item[0]) or real(item))
    assert build(corpus, tokenizer, out, num_workers=1) == ref
    assert min(i for i in encoded if (i + 1) % 4) == finished["train"][-1]["next"][0] >= 4  # train resumed
    assert min(i for i in encoded if (i + 1) % 4 == 0) == finished["val"][-1]["next"][0]  # val resumed
    after = stamp()
    assert all(after[s["name"]] == before[s["name"]] for s in finished["train"])
    assert not list(out.glob(".*.tmp")) and not (out / "progress.json").exists()
    assert all(file_sha256(str(out / n)) == file_sha256(str(ref_dir / n)) for n in after)

    # a deleted shard with a complete manifest: rebuilt; later identical shards are not rewritten
    (out / "train-000001.tar").unlink()
    before = stamp()
    assert build(corpus, tokenizer, out, num_workers=1) == ref
    after = stamp()
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000002.tar"] == before["train-000002.tar"]
    assert file_sha256(str(out / "train-000001.tar")) == ref["splits"]["train"]["shards"][1]["sha256"]


def test_other_settings_need_overwrite(corpus, tokenizer, tmp_path):
    out = tmp_path / "cfg"
    build(corpus, tokenizer, out)
    with pytest.raises(ShardDataError, match="other settings.*--overwrite"):
        build(corpus, tokenizer, out, samples_per_shard=7)
    manifest = build(corpus, tokenizer, out, samples_per_shard=7, overwrite=True)
    assert manifest["splits"]["train"]["shards"][0]["num_samples"] == 7
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s["name"] for v in manifest["splits"].values() for s in v["shards"])
    with pytest.raises(ShardDataError, match="400 pieces > vocab_size=300"):
        build(corpus, tokenizer, tmp_path / "small", vocab_size=300)


def test_read_manifest_errors(built, tmp_path):
    with pytest.raises(ShardDataError, match=r"manifest.json missing in .*python -m data_prep.write_shards"):
        read_manifest(str(tmp_path))
    out, manifest = built
    broken = json.loads(json.dumps(manifest))
    broken["splits"]["train"]["num_samples"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ShardDataError, match="says .* samples but its shards hold"):
        read_manifest(str(tmp_path), check_files=False)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardDataError, match=r"shard .*train-000000.tar listed in .* is missing"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardDataError, match="unreadable"):
        read_manifest(str(tmp_path))


def test_stdlib_documents():
    files = stdlib_documents()
    assert files == sorted(files) and len(files) > 300
    parts = {part for f in files for part in Path(f).parts}
    assert not parts & {"site-packages", "test", "tests", "idlelib"}
    assert all(f.endswith(".py") for f in files)
    subset = stdlib_documents(max_files=50)
    assert len(subset) == 50 and subset == stdlib_documents(max_files=50) and set(subset) < set(files)


def _prepare(out, queue):
    from jambatrain.data import corpus

    builds, real = [], corpus.write_shards
    corpus.write_shards = lambda *a, **k: builds.append(1) or real(*a, **k)  # this child process only
    manifest = prepare_default_corpus(out, vocab_size=VOCAB, seq_len=SEQ, max_files=15, samples_per_shard=50)
    queue.put((len(builds), json.dumps(manifest, sort_keys=True)))


@pytest.mark.slow
def test_default_corpus_is_idempotent_and_process_safe(tmp_path):
    out = str(tmp_path / "default")
    queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_prepare, args=(out, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert sorted(n for n, _ in results) == [0, 1]  # built once, the other process waited and reused it
    assert results[0][1] == results[1][1]
    manifest = json.loads(results[0][1])
    assert manifest["splits"]["train"]["num_samples"] > 0 and manifest["vocab_size"] == VOCAB
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir() if p.name != ".prepare.lock"}
    assert prepare_default_corpus(out, vocab_size=VOCAB, seq_len=SEQ, max_files=15) == manifest
    # no data file touched (the lock records each holder)
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir() if p.name != ".prepare.lock"} == mtimes
    with pytest.raises(ShardDataError, match="seq_len=32.*requested seq_len=64"):
        prepare_default_corpus(out, vocab_size=VOCAB, seq_len=64)


@pytest.mark.slow
def test_clis(corpus, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    for module in ("data_prep.train_tokenizer", "data_prep.write_shards", "data_prep.default_corpus"):
        result = run(module, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    result = run("data_prep.train_tokenizer", "--inputs", str(corpus / "*.py"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "400")
    assert result.returncode == 0, result.stderr
    result = run("data_prep.write_shards", "--inputs", str(corpus / "*.py"), "--tokenizer", str(tmp_path / "t.model"),
                 "--out", str(tmp_path / "s"), "--seq-len", "16", "--samples-per-shard", "100")
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and read_manifest(str(tmp_path / "s"))["vocab_size"] == 400


def flip_byte(path, offset=700):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 1  # same size: a size check alone keeps the file
    Path(path).write_bytes(bytes(data))


def test_rerun_repairs_a_bit_flipped_shard(corpus, tokenizer, built, tmp_path):
    ref_dir, ref = built
    out = tmp_path / "flip"
    shutil.copytree(ref_dir, out)
    flip_byte(out / "train-000001.tar")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert build(corpus, tokenizer, out, num_workers=1) == ref
    assert file_sha256(str(out / "train-000001.tar")) == ref["splits"]["train"]["shards"][1]["sha256"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["train-000000.tar"] == before["train-000000.tar"]  # the good ones are not rewritten
    assert after["train-000002.tar"] == before["train-000002.tar"]


def test_replaced_tokenizer_is_refused_and_not_exported(corpus, tokenizer, built, tmp_path):
    from jambatrain.export_hf import export

    ref_dir, ref = built
    out = tmp_path / "tok"
    shutil.copytree(ref_dir, out)
    (out / "tokenizer.model").write_bytes((out / "tokenizer.model").read_bytes() + b"\n")
    fix = r"tokenizer .*tok/tokenizer.model has sha256 \w+\.\.\. but .*manifest.json says \w+\.\.\.: .*Put back"
    with pytest.raises(ShardDataError, match=fix):
        read_manifest(str(out))
    with pytest.raises(ShardDataError, match=fix):
        TokenShardLoader(str(out), "train", 1, 0, 1)
    # export_hf refuses to ship it, before reading the checkpoint or creating the export dir
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "params_r00000_000.pt").write_bytes(b"not read")
    (tag / "manifest.json").write_text(json.dumps({"kind": "portable", "files": {"params_r00000_000.pt": 8},
                                                   "params": {}}))
    (tmp_path / "run" / "config.yaml").write_text(json.dumps({"model": {}, "data": {"dir": str(out)}}))
    with pytest.raises(SystemExit, match="not shipping the tokenizer: " + fix):
        export(str(tag), str(tmp_path / "hf"), config=str(tmp_path / "run" / "config.yaml"))
    assert not (tmp_path / "hf").exists()
    assert build(corpus, tokenizer, out, num_workers=1) == ref  # re-running write_shards puts the original back
    assert read_manifest(str(out)) == ref


@pytest.mark.slow
def test_default_corpus_repairs_a_damaged_shard_and_tokenizer(tmp_path):
    out = str(tmp_path / "default")
    manifest = prepare_default_corpus(out, vocab_size=VOCAB, seq_len=SEQ, max_files=15, samples_per_shard=50)
    tok = Path(out) / "tokenizer.model"
    sha = file_sha256(str(tok))
    flip_byte(Path(out) / "train-000001.tar")
    assert prepare_default_corpus(out, vocab_size=VOCAB, seq_len=SEQ, max_files=15, samples_per_shard=50) == manifest
    assert file_sha256(str(Path(out) / "train-000001.tar")) == manifest["splits"]["train"]["shards"][1]["sha256"]
    tok.write_bytes(b"garbage")
    assert prepare_default_corpus(out, vocab_size=VOCAB, seq_len=SEQ, max_files=15, samples_per_shard=50) == manifest
    assert file_sha256(str(tok)) == sha  # retrained: the training is deterministic


def test_rerun_on_a_build_without_record_indexes_adds_them(corpus, tokenizer, built, tmp_path):
    """A build from before the .idx files: write_shards re-run adds them (the shards are untouched), and the loader
    then reads records instead of whole shards, with the same batches."""
    out, manifest = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    m = json.load(open(old / "manifest.json"))
    for info in m["splits"].values():
        for entry in info["shards"]:
            os.remove(old / entry["index"]["name"])
            entry.pop("index"), entry.pop("record_bytes")
    json.dump(m, open(old / "manifest.json", "w"), indent=1)
    before = [b["input_ids"].tolist() for _, b in zip(range(6), TokenShardLoader(str(old), "train", 2, 0, 1))]
    again = json.load(open(out / "manifest.json"))
    rebuilt = build(corpus, tokenizer, old)  # the same write_shards command, re-run
    assert rebuilt == again == json.load(open(old / "manifest.json"))
    assert all((old / e["index"]["name"]).read_bytes() == (out / e["index"]["name"]).read_bytes()
               for info in again["splits"].values() for e in info["shards"])
    after = [b["input_ids"].tolist() for _, b in zip(range(6), TokenShardLoader(str(old), "train", 2, 0, 1))]
    assert after == before


def test_a_file_renamed_away_while_a_waiter_looks_does_not_crash_it(tmp_path, monkeypatch):
    """A waiter's liveness check lists the build dir while the build renames its temporary files: an entry gone by
    the time it is stat'ed is skipped (CI once saw FileNotFoundError on a .idx.tmp there)."""
    import jambatrain.data.corpus as corpus

    (tmp_path / "kept.bin").write_bytes(b"x")
    real = os.scandir

    class Gone:
        def is_file(self):
            return True

        def stat(self):
            raise FileNotFoundError(str(tmp_path / ".train-000046.idx.tmp"))

    class Listing:
        def __init__(self, path):
            self.it = real(path)

        def __enter__(self):
            return [Gone(), *self.it]

        def __exit__(self, *a):
            self.it.close()

    monkeypatch.setattr(corpus.os, "scandir", Listing)
    newest = max(os.path.getmtime(tmp_path), (tmp_path / "kept.bin").stat().st_mtime)
    assert corpus._last_change(str(tmp_path)) == newest
