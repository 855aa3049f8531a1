"""Turn rows into token documents: plain text, or chat conversations with the prompt masked.

A `Document` carries ``input_ids`` and ``trainable``: ``trainable[t]`` says whether token t
is a target, i.e. whether the label at position t-1 is kept (``trainable[0]`` is never
used: nothing in the document predicts its first token).

- ``text``: the tokenizer's own special tokens (e.g. a BOS) + the text + EOS; every token
  is a target, EOS included so the model learns where documents end.
- ``chat``: rendered by ``tokenizer.apply_chat_template``; only tokens produced by the
  assistant (its content, its tool calls and the template's end-of-turn marker) are targets.
- ``prompt_completion``: TRL's ``prompt`` and ``completion`` columns; only the completion is a target. Both
  strings: the prompt's tokens (with the tokenizer's special tokens), then the completion's and EOS, tokenised
  apart as generation sees them. A prompt given as messages is rendered with the chat template and the
  completion (a string, or messages) is its answer; a string prompt with message completions is a user turn.
  No EOS is appended: the template's end-of-turn marker already ends the conversation.
  Messages are ``{"role", "content"}`` (roles system, developer, user, assistant, tool;
  an assistant turn may carry ``tool_calls`` instead of content) or ShareGPT's
  ``{"from", "value"}`` (human, gpt, system), which ``auto`` finds in a ``conversations``
  column. Every conversation needs an assistant turn: one without is a DataError naming the row.

Assistant tokens come from transformers' own assistant mask when the template marks them with
``{% generation %}``. Otherwise they are found by rendering prefixes of the conversation —
``messages[:i]`` with the generation prompt, and ``messages[:i+1]`` — and diffing them against
the full rendering (longest common prefix, in characters); tokens whose character offset starts
inside a span are targets. That works with templates that lack the markers (most do) and is
robust to BPE merges at span edges, but not with templates that render history differently
from the last turn (reasoning templates strip ``<think>`` from earlier turns): an assistant turn
left with fewer targets than its content has tokens is then a DataError naming the row and the
template, never a silently untrained turn.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets

from ..errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

FORMATS = ("auto", "text", "chat", "prompt_completion")
SHAREGPT_FIELD = "conversations"
PROMPT_FIELD, COMPLETION_FIELD = "prompt", "completion"  # TRL's names
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Document:
    """One tokenised document; ``trainable[t]`` keeps the label of position t-1."""

    input_ids: list[int]
    trainable: list[bool]


def resolve_format(
    columns: Sequence[str], fmt: str, text_field: str, messages_field: str, where: str
) -> tuple[str, str]:
    """``(format, column)``: ``text`` or ``chat`` and the column it reads.

    ``auto`` prefers chat: the messages column, else ShareGPT's ``conversations``, else ``prompt`` and
    ``completion`` columns, else the text column.
    """
    if fmt not in FORMATS:
        raise DataError(f"{where}: data.format={fmt!r}; choose one of {FORMATS}")
    pairs = PROMPT_FIELD in columns and COMPLETION_FIELD in columns
    if fmt == "auto":
        for column, chosen in ((messages_field, "chat"), (SHAREGPT_FIELD, "chat"), (text_field, "text")):
            if column in columns and not (chosen == "text" and pairs):
                return chosen, column
        if pairs:
            return "prompt_completion", PROMPT_FIELD
        raise DataError(
            f"{where}: neither a text column {text_field!r} nor a messages column {messages_field!r} "
            f"(nor ShareGPT's {SHAREGPT_FIELD!r}, nor {PROMPT_FIELD!r} and {COMPLETION_FIELD!r}; columns: "
            f"{list(columns)}); name the columns {PROMPT_FIELD!r} and {COMPLETION_FIELD!r} for prompt/completion "
            "pairs, or set data.text_field / data.messages_field to a column holding whole documents / chats"
        )
    if fmt == "prompt_completion":
        if not pairs:
            raise DataError(
                f"{where}: data.format='prompt_completion' needs {PROMPT_FIELD!r} and {COMPLETION_FIELD!r} columns "
                f"(columns: {list(columns)})"
            )
        return fmt, PROMPT_FIELD
    field = text_field if fmt == "text" else messages_field
    if field not in columns:
        raise DataError(
            f"{where}: data.format={fmt!r} but no column {field!r} (columns: {list(columns)}); "
            f"set data.{'text_field' if fmt == 'text' else 'messages_field'}=..."
        )
    return fmt, field


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerFast,
    fmt: str = "auto",
    text_field: str = "text",
    messages_field: str = "messages",
    where: str = "data",
) -> list[Document]:
    """Tokenise every row of ``dataset``; ``where`` names the source in error messages.

    Empty texts and empty conversations are skipped: they hold nothing to learn. Malformed rows raise a
    one-line DataError naming the row; a dataset without a single target token is refused. One log line
    says which format was chosen and how many tokens are targets.
    """
    fmt, column = resolve_format(dataset.column_names, fmt, text_field, messages_field, where)
    if fmt == "text":
        texts = [_check_text(row, column, i, where) for i, row in enumerate(dataset[column])]
        docs = _tokenize_texts([text for text in texts if text.strip()], tokenizer)
    elif fmt == "prompt_completion":
        pairs = list(zip(dataset[PROMPT_FIELD], dataset[COMPLETION_FIELD], strict=True))
        docs = [tokenize_prompt_completion(p, c, tokenizer, i, where) for i, (p, c) in enumerate(pairs)]
        chat = {isinstance(p, list) or isinstance(c, list) for p, c in pairs}  # rows may mix the two
        column = "text and chat template rows" if len(chat) == 2 else "chat template" if True in chat else "text"
    else:
        docs = []
        for i, row in enumerate(dataset[column]):
            messages = check_messages(row, column, i, where)
            if messages:
                docs.append(tokenize_chat(messages, tokenizer, where=f"{where} row {i}"))
    tokens = sum(len(doc.input_ids) for doc in docs)
    targets = sum(sum(doc.trainable[1:]) for doc in docs)
    if fmt == "prompt_completion":
        chosen = f"prompt/completion ({column}; loss on the completion only)"
    else:
        sharegpt = "ShareGPT " if column == SHAREGPT_FIELD else ""
        chosen = "text" if fmt == "text" else f"chat ({sharegpt}{column!r} column)"
    logger.info(
        "%s: format %s, %d rows -> %d documents, %d tokens, %d targets (%.1f%%)",
        where,
        chosen,
        len(dataset),
        len(docs),
        tokens,
        targets,
        100 * targets / max(tokens, 1),
    )
    if targets == 0:
        raise DataError(
            f"{where}: no target tokens in {len(dataset)} rows (format {chosen}); nothing would be trained: "
            "check the rows (chat: assistant turns are the targets) or set data.format"
        )
    return docs


def tokenize_chat(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerFast,
    where: str = "conversation",
    train_from: int = 0,
) -> Document:
    """Render one conversation with the chat template; only assistant tokens are targets, of the turns from
    message ``train_from`` on (a prompt's earlier assistant turns are context).

    ``where`` names the row in errors: a template that fails on it, or one that leaves an assistant turn
    with fewer targets than its content has tokens.
    """
    template = _template(tokenizer, where)
    if _GENERATION_BLOCK.search(template):
        encoding = _apply(
            tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        trainable = [bool(m) for m in encoding["assistant_masks"]]
        if train_from:
            trainable = _after_prompt(trainable, messages, train_from, tokenizer, where)
        return Document(input_ids=list(encoding["input_ids"]), trainable=trainable)
    full = _apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = _apply(tokenizer, messages[:i], where, tokenize=False, add_generation_prompt=True) if i else ""
        through = _apply(tokenizer, messages[: i + 1], where, tokenize=False, add_generation_prompt=False)
        spans.append((i, _common_prefix_len(full, before), _common_prefix_len(full, through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoding["offset_mapping"]]
    for turn, lo, hi in spans:
        got = sum(lo <= start < hi for start in starts)
        content = (messages[turn].get("content") or "").strip()  # templates often trim the content
        need = max(len(tokenizer(content, add_special_tokens=False)["input_ids"]), 1)
        if got < need:
            raise DataError(
                f"{where}: assistant message {turn} gets {got} target tokens but its content has {need}: the chat "
                f"template of {tokenizer.name_or_path!r} renders it differently as history than as the last turn "
                "(e.g. it strips reasoning), so prefix masking cannot find it; use a template with "
                "{% generation %} markers, or split the conversation so each row ends with the turn to train"
            )
    trainable = [any(lo <= start < hi for _, lo, hi in spans) for start in starts]
    return Document(input_ids=list(encoding["input_ids"]), trainable=trainable)


def _after_prompt(
    trainable: list[bool], messages: Sequence[dict[str, Any]], train_from: int, tokenizer: Any, where: str
) -> list[bool]:
    """``trainable`` without the tokens of ``messages[:train_from]`` (and its generation prompt)."""
    full = _apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=False)
    prompt = _apply(tokenizer, messages[:train_from], where, tokenize=False, add_generation_prompt=True)
    cut = _common_prefix_len(full, prompt)
    starts = [a for a, _ in tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    if len(starts) != len(trainable):
        raise DataError(f"{where}: the chat template's tokens are not its rendered text's; use data.format=chat")
    return [t and start >= cut for t, start in zip(trainable, starts, strict=True)]


def tokenize_prompt_completion(
    prompt: Any, completion: Any, tokenizer: PreTrainedTokenizerFast, index: int, where: str
) -> Document:
    """One prompt/completion row; only the completion's tokens (and the EOS or end-of-turn ending it) are targets.

    Two strings are tokenised apart (the prompt with the tokenizer's special tokens) and joined, as a prompt is
    tokenised for generation; any message list makes it a conversation rendered by the chat template.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]
        return Document(input_ids=[*prompt_ids, *ids], trainable=[False] * len(prompt_ids) + [True] * len(ids))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    messages = check_messages(prompt, PROMPT_FIELD, index, where, need_assistant=False)
    answer = check_messages(completion, COMPLETION_FIELD, index, where)
    return tokenize_chat([*messages, *answer], tokenizer, f"{where} row {index}", train_from=len(messages))


def _tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> list[Document]:
    eos = tokenizer.eos_token_id
    docs = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []:
        ids = list(ids) if ids and ids[-1] == eos else [*ids, eos]
        docs.append(Document(input_ids=ids, trainable=[True] * len(ids)))
    return docs


def _template(tokenizer: PreTrainedTokenizerFast, where: str) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise DataError(
            f"{where}: the tokenizer {tokenizer.name_or_path!r} has no chat template; set model.tokenizer to one "
            "that has, or use text rows (data.format=text)"
        ) from None


def _apply(tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict[str, Any]], where: str, **kwargs: Any) -> Any:
    try:
        return tokenizer.apply_chat_template(list(messages), **kwargs)
    except Exception as e:  # jinja raises many types; each means this row does not fit the template
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: the chat template of {tokenizer.name_or_path!r} fails on it ({reason})") from None


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _check_text(value: Any, field: str, index: int, where: str) -> str:
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is {type(value).__name__}, not a string"
        raise DataError(f"{where} row {index}: text field {field!r} {problem}; fix the row or set data.text_field=...")
    return value


def check_messages(value: Any, field: str, index: int, where: str, need_assistant: bool = True) -> list[dict[str, Any]]:
    """The row's messages as ``{"role", "content", ...}`` dicts (ShareGPT's ``from``/``value`` mapped); one
    DataError line for a malformed one, or (``need_assistant``) for a conversation without an assistant turn."""
    fix = (
        f"each row's {field!r} must be a list of {{'role': str, 'content': str}} or ShareGPT "
        "{'from': str, 'value': str} (or set data.messages_field=...)"
    )
    if value is None:
        raise DataError(f"{where} row {index}: messages field {field!r} is missing; {fix}")
    if not isinstance(value, list):
        raise DataError(f"{where} row {index}: messages field {field!r} is {type(value).__name__}; {fix}")
    messages = []
    for turn, raw in enumerate(value):
        # Columnar loaders fill keys that only other rows have with None; templates expect them absent.
        message = {key: item for key, item in raw.items() if item is not None} if isinstance(raw, dict) else raw
        if isinstance(message, dict) and "role" not in message and "from" in message:
            role = message.pop("from")
            if role not in SHAREGPT_ROLES:
                raise DataError(
                    f"{where} row {index}: message {turn} is from {role!r}; ShareGPT roles are {sorted(SHAREGPT_ROLES)}"
                )
            message = {"role": SHAREGPT_ROLES[role], "content": message.pop("value", None), **message}
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where} row {index}: message {turn} is {raw!r}; {fix}")
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where} row {index}: message {turn} has role {message['role']!r}; roles are {list(CHAT_ROLES)} "
                f"(ShareGPT: {sorted(SHAREGPT_ROLES)})"
            )
        tool_call = message["role"] == "assistant" and isinstance(message.get("tool_calls"), list)
        if not (isinstance(message.get("content"), str) or (tool_call and "content" not in message)):
            raise DataError(f"{where} row {index}: message {turn} is {raw!r}; {fix}")
        messages.append(message)
    if need_assistant and messages and not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where} row {index}: the conversation has no assistant turn, so nothing in it would be trained; "
            "drop the row or fix its roles"
        )
    return messages
