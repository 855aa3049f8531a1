"""Data pipeline: sources -> tokenised documents -> packed rows -> sharded, resumable batches.

Batches follow spec §1: ``input_ids``, ``labels`` (already shifted), ``position_ids`` and
``seq_idx``, all ``[batch, seq_len]``.
"""

import importlib
from typing import Any

# Each name's submodule, imported on first use: the input checks read ``sources`` and ``formats`` before
# torch loads, and importing the package must not pull the loader (and torch) in with them.
_SUBMODULE = {
    "DATA_DEFAULTS": "build",
    "build_data": "build",
    "build_train_and_eval": "build",
    "Document": "formats",
    "tokenize_chat": "formats",
    "tokenize_dataset": "formats",
    "heldout_mask": "heldout",
    "load_documents": "heldout",
    "PackedDataLoader": "loader",
    "PackedDataset": "loader",
    "build_dataloader": "loader",
    "eval_batches": "loader",
    "IGNORE_INDEX": "packing",
    "PackedRows": "packing",
    "PackingStats": "packing",
    "pack_documents": "packing",
    "BUILTIN_SOURCES": "sources",
    "load_source": "sources",
    "DEBUG_TOKENIZER": "tokenizer",
    "load_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_SUBMODULE[name]}", __name__), name)


__all__ = [
    "BUILTIN_SOURCES",
    "DATA_DEFAULTS",
    "DEBUG_TOKENIZER",
    "IGNORE_INDEX",
    "Document",
    "PackedDataLoader",
    "PackedDataset",
    "PackedRows",
    "PackingStats",
    "build_data",
    "build_train_and_eval",
    "build_dataloader",
    "eval_batches",
    "heldout_mask",
    "load_source",
    "load_documents",
    "load_tokenizer",
    "pack_documents",
    "tokenize_chat",
    "tokenize_dataset",
]
