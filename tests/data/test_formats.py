"""Text and chat tokenisation: EOS, assistant-only targets, clear errors on malformed rows."""

import datasets
import pytest

from mtp_recipes.data.formats import tokenize_chat, tokenize_dataset
from mtp_recipes.data.packing import IGNORE_INDEX, pack_documents
from mtp_recipes.data.tokenizer import load_tokenizer
from mtp_recipes.errors import DataError

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
    assert (
        doc.input_ids
        == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    )
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
        (
            [
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                {"messages": [{"role": "user"}]},
            ],
            {},
            r"row 1: message 0",
        ),
    ],
)
def test_malformed_rows_raise_with_row_index(tokenizer, rows, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, fmt=kwargs.get("format", "auto"), where="x.jsonl")


REASONING = [
    {"role": "system", "content": "Think first."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>two and two</think>4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "<think>three and three</think>6"},
]
# Like reasoning models' templates: an earlier assistant turn is rendered without its <think> part.
STRIP_HISTORY = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{%- else %}{{ m.content }}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
STRIP_HISTORY_MARKED = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}"
    "{{ m.content.split('</think>')[-1] if not loop.last else m.content }}{{ '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{ m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
TOOL_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m.role + '\\n' }}{%- if m.content %}{{ m.content }}{% endif -%}"
    "{%- for c in m.tool_calls or [] %}{{ '<tool_call>' + c.function.name + c.function.arguments | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def with_template(template: str):
    tokenizer = load_tokenizer("builtin:debug")
    tokenizer.chat_template = template
    return tokenizer


def targets_of(doc, tokenizer) -> str:
    return tokenizer.decode([t for t, keep in zip(doc.input_ids, doc.trainable) if keep])


def test_sharegpt_conversations_are_mapped_and_logged(tokenizer, caplog) -> None:
    sharegpt = [
        {"from": "system", "value": "You answer tersely."},
        {"from": "human", "value": "What does len() return?"},
        {"from": "gpt", "value": "The number of items."},
    ]
    ds = datasets.Dataset.from_list([{"conversations": sharegpt}])
    with caplog.at_level("INFO", logger="mtp_recipes"):
        (doc,) = tokenize_dataset(ds, tokenizer, where="sg.jsonl")
    assert doc == tokenize_chat(CONVERSATION[:3], tokenizer)
    assert targets_of(doc, tokenizer) == "The number of items.<|im_end|>\n"
    n, t = len(doc.input_ids), sum(doc.trainable[1:])
    assert (
        f"sg.jsonl: format chat (ShareGPT 'conversations' column), 1 rows -> 1 documents, {n} tokens, {t} targets"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("conversation", "match"),
    [
        ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}], r"row 1: message 1 is from 'bot'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}],
            r"row 1: message 1 has role 'model'",
        ),
        ([{"from": "human", "value": "hi"}, {"from": "human", "value": "anyone?"}], r"row 1: .*no assistant turn"),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], r"row 1: .*no assistant turn"),
    ],
)
def test_unknown_roles_and_conversations_without_an_assistant_turn_name_the_row(tokenizer, conversation, match) -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    key = "conversations" if "from" in conversation[0] else "messages"
    if key == "conversations":
        good = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    ds = datasets.Dataset.from_list([{key: good}, {key: conversation}])
    with pytest.raises(DataError, match=match) as err:
        tokenize_dataset(ds, tokenizer, where="x.jsonl")
    assert "\n" not in str(err.value)


def test_a_template_that_rewrites_history_is_refused_without_generation_markers() -> None:
    tokenizer = with_template(STRIP_HISTORY)
    ds = datasets.Dataset.from_list([{"messages": CONVERSATION}, {"messages": REASONING}])
    # Row 0 has no reasoning to strip, so its turns are found; row 1's first answer would get no target.
    with pytest.raises(DataError, match=r"x.jsonl row 1: assistant message 2 gets 0 target tokens") as err:
        tokenize_dataset(ds, tokenizer, where="x.jsonl")
    assert "generation" in str(err.value) and repr(tokenizer.name_or_path) in str(err.value)


def test_generation_markers_use_transformers_assistant_mask() -> None:
    tokenizer = with_template(STRIP_HISTORY_MARKED)
    doc = tokenize_chat(REASONING, tokenizer)
    full = tokenizer.apply_chat_template(REASONING, tokenize=False)
    assert doc.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    # History as the template renders it (reasoning stripped), the last turn whole; no system or user token.
    assert targets_of(doc, tokenizer) == "4<|im_end|>\n<think>three and three</think>6<|im_end|>\n"


def test_zero_target_tokens_are_refused_before_training() -> None:
    # A marked template whose generation block is empty: transformers' mask selects nothing.
    empty_block = STRIP_HISTORY.replace(
        "{{ '<|im_end|>\\n' }}{%- endfor", "{% generation %}{% endgeneration %}{{ '<|im_end|>\\n' }}{%- endfor"
    )
    ds = datasets.Dataset.from_list([{"messages": CONVERSATION[1:3]}])
    with pytest.raises(DataError, match=r"x.jsonl: no target tokens in 1 rows"):
        tokenize_dataset(ds, with_template(empty_block), where="x.jsonl")


def test_tool_calls_and_system_prompt() -> None:
    tokenizer = with_template(TOOL_TEMPLATE)
    call = {"type": "function", "function": {"name": "clock", "arguments": {"tz": "UTC"}}}
    conversation = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Noon."},
    ]
    (doc,) = tokenize_dataset(datasets.Dataset.from_list([{"messages": conversation}]), tokenizer)
    assert targets_of(doc, tokenizer) == '<tool_call>clock{"tz": "UTC"}</tool_call><|im_end|>\nNoon.<|im_end|>\n'
    prompt = tokenizer.decode([t for t, keep in zip(doc.input_ids, doc.trainable) if not keep])
    assert "Use tools." in prompt and "12:00" in prompt and "What time" in prompt


# ---- prompt/completion (TRL's columns) ---------------------------------------------------------------------
def test_prompt_completion_strings_train_the_completion_only(tokenizer, caplog) -> None:
    rows = [{"prompt": "Q: What is len()? A:", "completion": " The number of items."}]
    with caplog.at_level("INFO"):
        (doc,) = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, where="pc.jsonl")
    prompt_ids = tokenizer(rows[0]["prompt"], add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(rows[0]["completion"], add_special_tokens=False)["input_ids"]
    assert doc.input_ids == [*prompt_ids, *completion_ids, tokenizer.eos_token_id]  # tokenised apart, as generated
    assert doc.trainable == [False] * len(prompt_ids) + [True] * (len(completion_ids) + 1)
    assert "pc.jsonl: format prompt/completion (text; loss on the completion only)" in caplog.text


def test_prompt_completion_messages_train_the_answer_turn_only(tokenizer, caplog) -> None:
    """A message-list prompt (earlier assistant turns included) is context; the completion, a string or messages,
    is the turn the loss is on; a string prompt with message completions becomes a user turn."""
    history = CONVERSATION[:4]  # ends with the user's second question; holds one assistant turn
    answers = ["The number of keys.", [{"role": "assistant", "content": "The number of keys."}]]
    with caplog.at_level("INFO"):
        docs = [
            doc
            for answer in answers  # one file holds one kind of completion (a column has one type)
            for doc in tokenize_dataset(
                datasets.Dataset.from_list([{"prompt": history, "completion": answer}]), tokenizer
            )
        ]
    for doc in docs:
        assert doc.input_ids == tokenize_chat(CONVERSATION, tokenizer).input_ids
        assert targets_of(doc, tokenizer) == "The number of keys.<|im_end|>\n"  # not the history's answer
    assert "format prompt/completion (chat template; loss on the completion only)" in caplog.text
    ds = datasets.Dataset.from_list([{"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello."}]}])
    (doc,) = tokenize_dataset(ds, tokenizer)
    assert tokenizer.decode(doc.input_ids).startswith("<|im_start|>user\nHi<|im_end|>")
    assert targets_of(doc, tokenizer) == "Hello.<|im_end|>\n"


def test_prompt_completion_with_generation_markers_trains_the_answer_turn_only() -> None:
    tokenizer = with_template(STRIP_HISTORY_MARKED)
    history, answer = REASONING[:-1], REASONING[-1]
    (doc,) = tokenize_dataset(
        datasets.Dataset.from_list([{"prompt": history, "completion": answer["content"]}]), tokenizer
    )
    assert targets_of(doc, tokenizer) == "<think>three and three</think>6<|im_end|>\n"


def test_prompt_completion_is_chosen_by_auto_and_refused_without_both_columns(tokenizer) -> None:
    both = datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "text": "c"}])
    (doc,) = tokenize_dataset(both, tokenizer)  # prompt/completion before a text column
    assert not all(doc.trainable)
    with pytest.raises(DataError, match=r"data.format='prompt_completion' needs 'prompt' and 'completion' columns"):
        tokenize_dataset(datasets.Dataset.from_list([{"prompt": "a"}]), tokenizer, fmt="prompt_completion")
    bad = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"oops": 1}]}])
    with pytest.raises(DataError, match=r"row 0: message 0 is .*'completion'"):
        tokenize_dataset(bad, tokenizer)
