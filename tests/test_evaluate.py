"""``python -m mtp_recipes.evaluate``: held-out prompts, the eval.json record, reference CE, errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from mtp_recipes.config import CONFIG_DIR, to_schema
from mtp_recipes.data import load_tokenizer
from mtp_recipes.data.heldout import load_documents
from mtp_recipes.errors import ConfigError
from mtp_recipes.measure_acceptance import evaluate, heldout_prompts, load_model, summary_line

TINY = ["eval.num_prompts=2", "eval.max_new_tokens=12", "eval.prompt_tokens=16", "trainer.progress_bar=false"]


def schema(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_schema(compose(config_name="finetune", overrides=[*TINY, *overrides]))


def test_record_of_a_two_depth_model(tmp_path):
    cfg = schema("mtp.num_layers=2", "eval.temperature=0.8", "eval.verify=true", "eval.verify_prompts=1")
    record = evaluate(cfg, tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text()) == record
    assert record["prompts"] == 2 and record["num_layers"] == 2
    assert 0 < record["generated_tokens"] <= 2 * 12
    assert [r["num_drafts"] for r in record["per_num_drafts"]] == [1, 2]
    for r in record["per_num_drafts"]:
        assert 1 <= r["acceptance_length"] <= 1 + r["num_drafts"]
        assert r["acceptance_length"] == pytest.approx(1 + sum(r["acceptance_rates"]))
        assert 1 <= r["sampling_acceptance_length"] <= 1 + r["num_drafts"]
    assert record["acceptance_length"] == record["per_num_drafts"][-1]["acceptance_length"]
    assert record["verify"]["passed"] and set(record["verify"]["acceptance_length"]) == {"1", "2"}
    assert record["backbone_agreement"] > 0.9  # float32 teacher-forced argmax vs generate's tokens
    assert record["tokens_per_s"] > 0
    assert "acceptance length" in summary_line(record) and "\n" not in summary_line(record)


def test_reference_ce_equals_plain_cross_entropy(tmp_path):
    cfg = schema("mtp.num_layers=2")
    record = evaluate(cfg, tmp_path / "eval.json")
    model = load_model(cfg, torch.device("cpu"))  # the same seeded model evaluate built
    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    right, cum_slots = torch.zeros(2), torch.zeros(2)  # slots whose depths 1..k all have a target / are all right
    for prompt in heldout_prompts(cfg, load_tokenizer(cfg.model.tokenizer)):
        ids = torch.tensor([prompt.ids + prompt.reference])
        with torch.no_grad():
            out = model(input_ids=ids, return_logits=True)
        heads = [out.logits[0].double()] + [(h @ model.mtp_heads().T)[0].double() for h in out.mtp_hidden_states]
        for k, logits in enumerate(heads):  # depth k at slot t predicts token t + k + 1: every reference token
            slots = torch.arange(len(prompt.ids) - 1 - k, ids.shape[1] - 1 - k)
            sums[k] += F.cross_entropy(logits[slots], ids[0, slots + k + 1], reduction="sum")
            counts[k] += len(slots)
        n, length = len(prompt.ids), ids.shape[1]
        for k in (1, 2):
            slots_k = range(n - 2, length - 1 - k)  # depth j's targets are reference tokens for t >= n - 1 - j
            hits = [all(heads[j][t].argmax() == ids[0, t + j + 1] for j in range(1, k + 1)) for t in slots_k]
            right[k - 1] += sum(hits)
            cum_slots[k - 1] += len(hits)
    assert record["reference_tokens"] == int(counts[0])
    want = (sums / counts).tolist()
    assert record["reference_main_ce"] == pytest.approx(want[0], rel=1e-5)
    assert record["reference_mtp_ce"] == pytest.approx(want[1:], rel=1e-5)
    assert record["reference_acceptance_length"] == pytest.approx(1 + float((right / cum_slots).sum()))


def test_prompts_are_held_out_documents_and_chat_prompts_end_at_the_last_assistant_turn(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(40)
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = schema(f"data.source={source}", "data.eval_fraction=0.25", "eval.num_prompts=3")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    prompts = heldout_prompts(cfg, tokenizer)
    train, held = load_documents(cfg.data, tokenizer)
    assert len(prompts) == 3 and len(held) == 10 and len(train) == 30
    trained = {tokenizer.decode(doc.input_ids) for doc in train}
    for prompt, doc in zip(prompts, held, strict=False):
        assert prompt.ids + prompt.reference == doc.input_ids and tokenizer.decode(doc.input_ids) not in trained
        question = re.fullmatch(
            r"<\|im_start\|>user\nquestion (\d+)<\|im_end\|>\n<\|im_start\|>assistant\n", tokenizer.decode(prompt.ids)
        )
        assert question is not None, tokenizer.decode(prompt.ids)
        assert tokenizer.decode(prompt.reference) == f"answer {question[1]}<|im_end|>\n"


def test_evaluate_needs_held_out_rows_and_checks_its_fields(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        evaluate(schema("data.eval_fraction=0"), tmp_path / "eval.json")
    for override, needle in [("eval.temperature=-1", "eval.temperature"), ("eval.num_prompts=0", "eval.num_prompts")]:
        with pytest.raises(ConfigError, match=needle):
            schema(override)


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.evaluate", *TINY, "eval.verify=true", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("acceptance length") and line.endswith(f"-> {tmp_path / 'eval.json'}")
    assert math.isfinite(json.loads((tmp_path / "eval.json").read_text())["reference_main_ce"])
    bad = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.evaluate", "eval.max_new_tokens=0", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: eval.num_prompts, eval.max_new_tokens, eval.prompt_tokens and eval.verify_prompts must be >= 1"
    ]


def test_a_model_built_from_the_config_is_the_runs_initial_model(tmp_path):
    """model.path=null: evaluate measures the model a training run with the same config starts from."""
    from mtp_recipes.recipe import FinetuneRecipe

    cfg = schema("data.max_documents=20", "data.seq_len=64", "data.batch_size=4", "trainer.seed=3")
    recipe = FinetuneRecipe(cfg, tmp_path / "run")
    try:
        recipe.setup()
        initial = recipe.model.state_dict()
    finally:
        recipe.cleanup()
    ours = load_model(cfg, torch.device("cpu")).state_dict()
    assert initial.keys() == ours.keys()
    assert all(torch.equal(initial[k], ours[k]) for k in initial)
    other = load_model(schema("trainer.seed=4"), torch.device("cpu")).state_dict()
    assert not all(torch.equal(initial[k], other[k]) for k in initial)
