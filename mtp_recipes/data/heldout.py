"""The held-out documents: kept out of training, used by validation and by ``python -m mtp_recipes.evaluate``.

``data.eval_source`` names a separate source (all of its rows are held out). Otherwise ``data.eval_fraction``
holds out that share of ``data.source``'s documents (one per non-empty row), chosen by content: those whose
token ids hash among the smallest ``ceil(fraction * documents)``, together with every other document equal
to one of them. The choice depends neither on row order nor on seeds, and a row repeated in the source is
never in both splits. Rows are tokenised before they are split, so a bad row is named by its number in the
source whichever side it falls on.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerFast

from ..errors import DataError
from .formats import Document, tokenize_dataset
from .sources import load_source


def document_hash(doc: Document) -> int:
    """A stable 64-bit hash of a document's token ids."""
    return int.from_bytes(hashlib.sha256(array("q", doc.input_ids).tobytes()).digest()[:8], "big")


def heldout_mask(documents: Sequence[Document], fraction: float) -> list[bool]:
    """True for the documents ``fraction`` holds out (see the module docstring); none when ``fraction`` is 0."""
    if not 0 <= fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    hashes = [document_hash(doc) for doc in documents]
    count = math.ceil(fraction * len(hashes))
    if count == 0:
        return [False] * len(hashes)
    cut = sorted(hashes)[count - 1]
    return [h <= cut for h in hashes]


def load_documents(
    cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast
) -> tuple[list[Document], list[Document] | None]:
    """``(training documents, held-out documents or None)`` of a ``data`` config (``max_documents`` applied)."""
    rows = load_source(cfg["source"], split=cfg["split"], text_sample_by=cfg["text_sample_by"])
    if cfg.get("max_documents") is not None:
        rows = rows.select(range(min(int(cfg["max_documents"]), len(rows))))
    fields = {"fmt": cfg["format"], "text_field": cfg["text_field"], "messages_field": cfg["messages_field"]}
    documents = tokenize_dataset(rows, tokenizer, where=f"data.source={cfg['source']!r}", **fields)
    if cfg.get("eval_source"):
        held = load_source(cfg["eval_source"], split=cfg["eval_split"], text_sample_by=cfg["text_sample_by"])
        return documents, tokenize_dataset(held, tokenizer, where=f"data.eval_source={cfg['eval_source']!r}", **fields)
    fraction = float(cfg.get("eval_fraction") or 0.0)
    if fraction == 0:
        return documents, None
    mask = heldout_mask(documents, fraction)
    train = [doc for doc, held in zip(documents, mask, strict=True) if not held]
    if not train:
        raise DataError(
            f"data.eval_fraction={fraction} holds out all {len(documents)} documents of data.source={cfg['source']!r}; "
            "lower it or give a separate data.eval_source"
        )
    return train, [doc for doc, held in zip(documents, mask, strict=True) if held]
