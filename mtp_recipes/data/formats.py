"""Turn rows into token documents: plain text, or chat conversations with the prompt masked.

A `Document` carries ``input_ids`` and ``trainable``: ``trainable[t]`` says whether token t
is a target, i.e. whether the label at position t-1 is kept (``trainable[0]`` is never
used: nothing in the document predicts its first token).

- ``text``: the tokenizer's own special tokens (e.g. a BOS) + the text + EOS; every token
  is a target, EOS included so the model learns where documents end.
- ``chat``: rendered by ``tokenizer.apply_chat_template``; only tokens produced by the
  assistant (its content and the template's end-of-turn marker) are targets. No EOS is
  appended: the template's end-of-turn marker already ends the conversation.

The assistant spans are found by rendering prefixes of the conversation — ``messages[:i]``
with the generation prompt, and ``messages[:i+1]`` — and diffing them against the full
rendering (longest common prefix, in characters). Tokens whose character offset starts
inside a span are targets. This works with any template, unlike ``{% generation %}``
markers, which most templates lack, and is robust to BPE merges at span edges.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerFast

from ..errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "text", "chat")


@dataclass(frozen=True)
class Document:
    """One tokenised document; ``trainable[t]`` keeps the label of position t-1."""

    input_ids: list[int]
    trainable: list[bool]


def resolve_format(columns: Sequence[str], fmt: str, text_field: str, messages_field: str, where: str) -> str:
    """Pick ``text`` or ``chat``; ``auto`` prefers chat when the messages column exists."""
    if fmt not in FORMATS:
        raise DataError(f"{where}: data.format={fmt!r}; choose one of {FORMATS}")
    if fmt == "auto":
        if messages_field in columns:
            return "chat"
        if text_field in columns:
            return "text"
        raise DataError(
            f"{where}: neither a text column {text_field!r} nor a messages column {messages_field!r} "
            f"(columns: {list(columns)}); set data.text_field=... or data.messages_field=..."
        )
    field = text_field if fmt == "text" else messages_field
    if field not in columns:
        raise DataError(
            f"{where}: data.format={fmt!r} but no column {field!r} (columns: {list(columns)}); "
            f"set data.{'text_field' if fmt == 'text' else 'messages_field'}=..."
        )
    return fmt


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerFast,
    fmt: str = "auto",
    text_field: str = "text",
    messages_field: str = "messages",
    where: str = "data",
) -> list[Document]:
    """Tokenise every row of ``dataset``; ``where`` names the source in error messages.

    Empty texts and empty conversations are skipped (and counted in the log): they hold
    nothing to learn. Malformed rows raise a one-line ValueError naming the row.
    """
    fmt = resolve_format(dataset.column_names, fmt, text_field, messages_field, where)
    if fmt == "text":
        texts = [_check_text(row, text_field, i, where) for i, row in enumerate(dataset[text_field])]
        kept = [text for text in texts if text.strip()]
        docs = _tokenize_texts(kept, tokenizer)
    else:
        conversations = [
            _check_messages(row, messages_field, i, where) for i, row in enumerate(dataset[messages_field])
        ]
        docs = [tokenize_chat(messages, tokenizer) for messages in conversations if messages]
    if len(docs) < len(dataset):
        logger.info("%s: skipped %d empty rows", where, len(dataset) - len(docs))
    return docs


def tokenize_chat(messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerFast) -> Document:
    """Render one conversation with the chat template; only assistant tokens are targets."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        spans.append((_common_prefix_len(full, before), _common_prefix_len(full, through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    trainable = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding["offset_mapping"]]
    return Document(input_ids=list(encoding["input_ids"]), trainable=trainable)


def _tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> list[Document]:
    eos = tokenizer.eos_token_id
    docs = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []:
        ids = list(ids) if ids and ids[-1] == eos else [*ids, eos]
        docs.append(Document(input_ids=ids, trainable=[True] * len(ids)))
    return docs


def _render(tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _check_text(value: Any, field: str, index: int, where: str) -> str:
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is {type(value).__name__}, not a string"
        raise DataError(f"{where} row {index}: text field {field!r} {problem}; fix the row or set data.text_field=...")
    return value


def _check_messages(value: Any, field: str, index: int, where: str) -> list[dict[str, str]]:
    fix = f"each row's {field!r} must be a list of {{'role': str, 'content': str}} (or set data.messages_field=...)"
    if value is None:
        raise DataError(f"{where} row {index}: messages field {field!r} is missing; {fix}")
    if not isinstance(value, list):
        raise DataError(f"{where} row {index}: messages field {field!r} is {type(value).__name__}; {fix}")
    for turn, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where} row {index}: message {turn} is {message!r}; {fix}")
    # Columnar loaders fill keys that only other rows have with None; templates expect them absent.
    return [{key: item for key, item in message.items() if item is not None} for message in value]
