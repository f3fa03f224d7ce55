"""SentencePiece tokenizer training and loading.

The tokenizer keeps text byte-exact (identity normalization, no dummy prefix,
whitespace kept, byte fallback), so source code round trips through
``decode(encode(text))``. Special ids: unk=0, bos=1, eos=2, no pad.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from typing import Iterator

import sentencepiece as spm

from jambatrain.fileio import atomic_write

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Expand globs (``**`` allowed) into a sorted, de-duplicated file list."""
    if isinstance(inputs, str):
        inputs = [inputs]
    paths: set[str] = set()
    for pattern in inputs:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches and os.path.isfile(pattern):
            matches = [pattern]
        paths.update(p for p in matches if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no input files match {list(inputs)!r}")
    return sorted(paths)


def open_text(path: str):
    """A text stream of ``path``, decompressing ``.gz`` (gzip) and ``.zst`` (zstandard, pip install zstandard)."""
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as exc:
            raise ImportError(f"reading {path} needs zstandard: pip install zstandard") from exc
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(paths: list[str], start: int = 0) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(doc_index, doc_id, text)`` for every document of ``paths``.

    A document is a whole text file, one ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` record (field ``"text"``)
    or one ``.parquet`` row (column ``"text"``, needs pyarrow). Documents with
    index < ``start`` are yielded with ``text=None`` without reading them where
    possible (used to resume shard writing).
    """
    index = 0
    for path in paths:
        if path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            with open_text(path) as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    text = None
                    if index >= start:
                        try:
                            text = json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError) as exc:
                            raise ValueError(
                                f"{path}:{line_no}: expected a JSON object with a string field "
                                f'"text" ({exc!r})') from exc
                        if not isinstance(text, str):
                            raise ValueError(f'{path}:{line_no}: field "text" is not a string')
                    yield index, f"{path}:{line_no}", text
                    index += 1
        elif path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
            for row, text in enumerate(pq.read_table(path, columns=["text"]).column("text").to_pylist()):
                yield index, f"{path}:{row}", (text if index >= start else None)
                index += 1
        else:
            text = None
            if index >= start:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            yield index, path, text
            index += 1


def _sentences(paths: list[str], max_chars: int | None) -> Iterator[str]:
    """Non-empty lines of all documents, stopping after ``max_chars`` characters."""
    total = 0
    for _, _, text in iter_documents(paths):
        for line in text.split("\n"):
            if line:
                yield line
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def train_tokenizer(
    inputs: list[str] | str,
    out_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    user_defined_symbols: tuple[str, ...] | list[str] = (),
    max_sentences: int = 2_000_000,
    num_threads: int = 2,
    max_chars: int | None = None,
    character_coverage: float = 0.9999,
    seed: int = 0,
) -> str:
    """Train a SentencePiece model on the lines of ``inputs``; return ``out_prefix + ".model"``.

    ``max_sentences`` caps the lines sentencepiece samples (seeded, so the
    result is deterministic for a fixed input); ``max_chars`` stops reading
    input documents after that many characters.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    paths = expand_inputs(inputs)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(paths, max_chars),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        user_defined_symbols=list(user_defined_symbols),
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        minloglevel=2,
    )
    path = out_prefix + ".model"
    atomic_write(path, model.getvalue())
    return path


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer model {path} not found: train one with python -m data_prep.train_tokenizer")
    return spm.SentencePieceProcessor(model_file=path)
