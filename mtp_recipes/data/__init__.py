"""Data pipeline: sources -> tokenised documents -> packed rows -> sharded, resumable batches.

Batches follow spec §1: ``input_ids``, ``labels`` (already shifted), ``position_ids`` and
``seq_idx``, all ``[batch, seq_len]``.
"""

from .build import DATA_DEFAULTS, build_data, build_train_and_eval
from .formats import Document, tokenize_chat, tokenize_dataset
from .heldout import heldout_mask, load_documents
from .loader import PackedDataLoader, PackedDataset, build_dataloader, eval_batches
from .packing import IGNORE_INDEX, PackedRows, PackingStats, pack_documents
from .sources import BUILTIN_SOURCES, load_source
from .tokenizer import DEBUG_TOKENIZER, load_tokenizer

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
