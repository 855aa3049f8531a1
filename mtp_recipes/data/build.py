"""One call from a ``data`` config to a ready loader: source -> documents -> rows -> batches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torch import Tensor
from transformers import PreTrainedTokenizerFast

from ..config import DataConfig
from ..errors import DataError
from .heldout import load_documents
from .loader import PackedDataLoader, build_dataloader, eval_batches
from .packing import pack_documents

# The data group's fields and defaults: the config schema's, so the two can never disagree.
DATA_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(DataConfig)}


def build_data(
    cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast, rank: int = 0, world_size: int = 1
) -> PackedDataLoader:
    """This rank's training loader (see :func:`build_train_and_eval` for the fields of ``cfg``)."""
    return build_train_and_eval(cfg, tokenizer, rank, world_size)[0]


def build_train_and_eval(
    cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast, rank: int = 0, world_size: int = 1
) -> tuple[PackedDataLoader, list[dict[str, Tensor]] | None]:
    """Load, tokenise and pack the data described by ``cfg`` into this rank's loader and held-out batches.

    The held-out documents (none without ``eval_fraction``/``eval_source``) are packed the same way as the
    training ones, into this rank's share of ``batch_size`` rows (:func:`.loader.eval_batches`).

    ``cfg`` is a dict or an OmegaConf ``DictConfig`` (the ``data`` group); unknown keys
    are rejected so typos fail loudly. Fields (default in brackets):

    - ``source`` [builtin:pydoc]: ``builtin:pydoc`` / ``builtin:shakespeare``, a local
      ``.jsonl``/``.json``/``.parquet``/``.txt``/``.md`` file, directory or glob, or a hub name.
    - ``split`` [train]: split to load; slices like ``train[:90%]`` work for files and hub.
    - ``format`` [auto]: ``text``, ``chat`` or ``auto`` (chat if ``messages_field`` exists).
    - ``text_field`` [text], ``messages_field`` [messages]: column names.
    - ``text_sample_by`` [line]: rows of ``.txt``/``.md`` files: ``line``, ``paragraph``, ``document``.
    - ``max_documents`` [None]: keep only the first N rows (quick runs).
    - ``seq_len`` [1024], ``batch_size`` [8]: batches are ``[batch_size, seq_len]`` per rank.
    - ``packing`` [first_fit]: ``greedy`` or ``first_fit``; ``packing_buffer`` [8192]
      segments per first-fit buffer.
    - ``shuffle`` [true], ``seed`` [0]: deterministic per-epoch shuffle of packed rows.
    - ``eval_fraction`` [0], ``eval_source`` [None], ``eval_split`` [train]: held-out documents, never trained
      on (see :mod:`.heldout`).
    """
    unknown = sorted(set(cfg) - set(DATA_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data config fields {unknown}; known: {sorted(DATA_DEFAULTS)}")
    c = {**DATA_DEFAULTS, **{key: cfg[key] for key in cfg}}
    if not c["source"]:
        raise DataError("data.source is empty: name a file, directory, glob, hub dataset or builtin:pydoc")
    documents, heldout = load_documents(c, tokenizer)
    seq_len, pad, batch = int(c["seq_len"]), tokenizer.pad_token_id, int(c["batch_size"])
    packed = pack_documents(documents, seq_len, pad, c["packing"], int(c["packing_buffer"]))
    loader = build_dataloader(packed, batch, int(c["seed"]), rank, world_size, bool(c["shuffle"]))
    if heldout is None:
        return loader, None
    held = pack_documents(heldout, seq_len, pad, c["packing"], int(c["packing_buffer"]))
    return loader, eval_batches(held, batch, pad, rank, world_size)
