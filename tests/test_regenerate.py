"""regenerate: assistant turns rewritten with the model's own responses; prompts kept; resumable."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtp_recipes.acceptance import greedy_generate
from mtp_recipes.data import load_tokenizer
from mtp_recipes.errors import ConfigError
from mtp_recipes.evaluation import load_model, stop_token_ids
from mtp_recipes.finetune import CONFIG_DIR
from mtp_recipes.regenerate import completed_rows, regenerate, split_config

CHATS = [
    {"id": 0, "messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A."}]},
    {
        "id": 1,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a loop."},
            {"role": "assistant", "content": "for"},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "while"},
        ],
    },
    {
        "id": 2,
        "messages": [{"role": "user", "content": "Define a tuple in Python"}, {"role": "assistant", "content": "B"}],
    },
]


def _config(tmp_path, *overrides):
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="regenerate",
            overrides=[
                f"data.source={source}",
                f"out={tmp_path / 'out.jsonl'}",
                "regenerate.max_new_tokens=6",
                "trainer.device=cpu",
                *overrides,
            ],
        )
    return split_config(cfg)


def test_assistant_turns_are_the_models_greedy_replies_and_everything_else_is_kept(tmp_path):
    cfg, options = _config(tmp_path, "regenerate.batch_size=2")
    assert regenerate(cfg, options) == len(CHATS)
    rows = [json.loads(line) for line in options.out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    model = load_model(cfg, torch.device("cpu"))
    tokenizer = load_tokenizer("builtin:debug")
    stop = stop_token_ids(model, tokenizer)
    for row, source in zip(rows, CHATS):
        got, want = row["messages"], source["messages"]
        assert [m["role"] for m in got] == [m["role"] for m in want]
        for j, (g, w) in enumerate(zip(got, want)):
            if w["role"] != "assistant":
                assert g == w  # prompts unchanged
                continue
            # reference: one prompt at a time through the evaluator's greedy generate, earlier turns as regenerated
            prompt = tokenizer.apply_chat_template(got[:j], add_generation_prompt=True)["input_ids"]
            tokens = greedy_generate(model, prompt, 6, stop)
            end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
            assert g["content"] == tokenizer.decode(tokens[:end], skip_special_tokens=True)
            assert g["content"] != w["content"]


def test_a_rerun_skips_the_rows_already_written_and_rewrites_a_cut_last_row(tmp_path):
    cfg, options = _config(tmp_path)
    done = json.dumps({"id": 0, "messages": [{"role": "user", "content": "kept"}]}) + "\n"
    options.out.write_text(done + '{"id": 1, "messa')  # killed while writing row 1
    assert completed_rows(options.out) == 1 and options.out.read_text() == done
    options.out.write_text(done + '{"id": 1, "messa')
    assert regenerate(cfg, options) == 2
    lines = options.out.read_text().splitlines()
    assert lines[0] + "\n" == done and [json.loads(line)["id"] for line in lines] == [0, 1, 2]
    assert regenerate(cfg, options) == 0  # finished: nothing generated again


def test_sampling_is_seeded_and_bad_options_are_one_line(tmp_path):
    cfg, options = _config(tmp_path, "regenerate.temperature=1.0", "data.max_documents=1")
    regenerate(cfg, options)
    first = options.out.read_text()
    options.out.unlink()
    regenerate(cfg, options)
    assert options.out.read_text() == first
    with pytest.raises(ConfigError, match="regenerate.temperature must be >= 0"):
        _config(tmp_path, "regenerate.temperature=-1")
    cfg, options = _config(tmp_path, "model.tokenizer=null", "out=" + str(tmp_path / "y.jsonl"))
    with pytest.raises(ConfigError, match="model.tokenizer is required"):
        regenerate(cfg, options)
    result = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.regenerate", "trainer.device=cpu", f"out={tmp_path / 'x.jsonl'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert re.fullmatch(r"error: data.source=builtin:pydoc has no messages column .*\n", result.stderr)
