"""Data pipeline: tokenizer, token shards, the default corpus and the DP loader.

Names are imported lazily so that data preparation does not import torch.
"""

import importlib

_EXPORTS = {
    "prepare_default_corpus": "corpus", "stdlib_documents": "corpus",
    "TokenShardLoader": "loader", "make_val_loader": "loader", "make_loader": "sources",
    "MqarConfig": "mqar", "MqarLoader": "mqar",
    "ShardDataError": "shards", "read_manifest": "shards", "write_shards": "shards",
    "write_synthetic_shards": "shards",
    "verify_data_dir": "verify",
    "file_sha256": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
