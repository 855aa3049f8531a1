"""Text and chat tokenisation: EOS, assistant-only targets, clear errors on malformed rows."""

import datasets
import pytest

from mtp_recipes.data.formats import tokenize_chat, tokenize_dataset
from mtp_recipes.data.packing import IGNORE_INDEX, pack_documents
from mtp_recipes.data.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer tersely."},
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items."},
    {"role": "user", "content": "And for a dict?"},
    {"role": "assistant", "content": "The number of keys."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:debug")


def test_text_documents_end_with_eos_and_are_all_trainable(tokenizer) -> None:
    ds = datasets.Dataset.from_dict({"body": ["def f(x): return x", "", "import os"]})
    docs = tokenize_dataset(ds, tokenizer, fmt="auto", text_field="body")
    assert len(docs) == 2  # the empty row holds nothing to learn
    assert docs[0].input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(docs[0].input_ids[:-1]) == "def f(x): return x"
    assert all(all(d.trainable) for d in docs)


def test_chat_masks_everything_but_assistant_turns(tokenizer) -> None:
    doc = tokenize_chat(CONVERSATION, tokenizer)
    assert doc.input_ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    targets = tokenizer.decode([t for t, keep in zip(doc.input_ids, doc.trainable) if keep])
    prompt = tokenizer.decode([t for t, keep in zip(doc.input_ids, doc.trainable) if not keep])
    assert targets == "The number of items.<|im_end|>\nThe number of keys.<|im_end|>\n"
    assert "len()" in prompt and "dict" in prompt and "tersely" in prompt and "number" not in prompt

    # After packing, a label is kept exactly where the next token is assistant output.
    packed = pack_documents([doc], 256, tokenizer.pad_token_id)
    ids, labels = packed.input_ids[0].tolist(), packed.labels[0].tolist()
    n = len(doc.input_ids)
    assert labels[:n] == [ids[t + 1] if t + 1 < n and doc.trainable[t + 1] else IGNORE_INDEX for t in range(n)]
    first = doc.trainable.index(True)
    assert tokenizer.decode(ids[first - 1 : first]) == "\n" and labels[first - 1] == ids[first]


def test_auto_format_prefers_messages(tokenizer) -> None:
    ds = datasets.Dataset.from_list([{"text": "ignored", "messages": CONVERSATION[1:3]}])
    (doc,) = tokenize_dataset(ds, tokenizer)
    assert not all(doc.trainable) and any(doc.trainable)


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        ([{"text": "ok"}, {"text": "ok"}, {"text": None}], {}, r"row 2: text field 'text' is missing.*data.text_field"),
        ([{"text": 3}, {"text": 4}], {"format": "text"}, r"row 0: text field 'text' is int, not a string"),
        ([{"content": "x"}], {}, r"neither a text column 'text' nor a messages column.*data.text_field"),
        ([{"text": "x"}], {"format": "chat"}, r"no column 'messages'.*data.messages_field"),
        ([{"messages": "hello"}], {"format": "chat"}, r"row 0: messages field 'messages' is str"),
        ([{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "user"}]}], {}, r"row 1: message 0"),
    ],
)
def test_malformed_rows_raise_with_row_index(tokenizer, rows, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, fmt=kwargs.get("format", "auto"), where="x.jsonl")
