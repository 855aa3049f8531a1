"""Validation during training: held-out numbers against a float64 reference, when they are logged."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mtp_recipes.data import build_train_and_eval, load_tokenizer
from mtp_recipes.model import MTPModel
from mtp_recipes.recipe import FinetuneRecipe
from tests.recipes.test_finetune import FAST, composed


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def target(labels: torch.Tensor, seq_idx: torch.Tensor, t: int, k: int) -> int | None:
    """Depth k's target at slot t (k = 0: the main one): the label k slots on, inside the document."""
    s = t + k
    ok = s < len(labels) and seq_idx[s] == seq_idx[t] and labels[s] != -100
    return int(labels[s]) if ok else None


def reference(model: MTPModel, batches: list[dict], depths: int) -> dict[str, float]:
    """Held-out main CE, per-depth CE and acceptance length, slot by slot in float64."""
    ce = torch.zeros(depths + 1, dtype=torch.float64)
    count = torch.zeros(depths + 1)
    hits, slots = torch.zeros(depths), torch.zeros(depths)
    for batch in batches:
        ids, labels, seq_idx = batch["input_ids"], batch["labels"], batch["seq_idx"]
        with torch.no_grad():
            out = model(ids, seq_idx=seq_idx, return_logits=True)
        heads = [out.logits.double()] + [(h @ model.mtp_heads().T).double() for h in out.mtp_hidden_states]
        for row in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                targets = [target(labels[row], seq_idx[row], t, k) for k in range(depths + 1)]
                right = True  # depths 1..k all right (counted while depths 1..k all have a target)
                for k, want in enumerate(targets):
                    if want is None:
                        if k:
                            break
                        continue
                    ce[k] += F.cross_entropy(heads[k][row, t], torch.tensor(want))
                    count[k] += 1
                    if k:
                        right = right and int(heads[k][row, t].argmax()) == want
                        hits[k - 1] += right
                        slots[k - 1] += 1
    mean = (ce / count).tolist()
    return {"main_ce": mean[0], **{f"mtp_ce_{k}": mean[k] for k in range(1, depths + 1)},
            "acceptance_length": 1 + float((hits / slots).sum())}  # fmt: skip


def test_validation_numbers_are_the_held_out_rows_own(tmp_path):
    cfg = composed(*FAST, "mtp.num_layers=2", "trainer.max_steps=2", "trainer.eval_every=0", "data.max_documents=10")
    FinetuneRecipe(cfg, tmp_path).run()
    held = [r for r in records(tmp_path) if r["split"] == "eval"]
    assert [r["step"] for r in held] == [2]  # eval_every=0: after the last step only
    assert all(r["split"] == "train" for r in records(tmp_path) if r not in held)

    model = MTPModel.from_pretrained(tmp_path / "final", dtype=torch.float64, experts_implementation="eager")
    _, batches = build_train_and_eval(cfg.data, load_tokenizer(cfg.model.tokenizer))
    want = reference(model, batches, depths=2)
    for key, value in want.items():
        assert held[0][key] == pytest.approx(value, rel=1e-4), key


def test_validation_every_n_steps_and_none_without_held_out_rows(tmp_path):
    FinetuneRecipe(composed(*FAST, "trainer.max_steps=5", "trainer.eval_every=2"), tmp_path / "a").run()
    assert [r["step"] for r in records(tmp_path / "a") if r["split"] == "eval"] == [2, 4, 5]
    FinetuneRecipe(composed(*FAST, "trainer.max_steps=2", "data.eval_fraction=0"), tmp_path / "b").run()
    assert {r["split"] for r in records(tmp_path / "b")} == {"train"}


def test_two_ranks_validate_like_one(tmp_path):
    """FSDP2: each rank evaluates its share of the held-out rows (padded to equal counts); the numbers are global."""
    from tests.distributed.test_fsdp_and_resume import cli, finish, run_inline

    args = ["trainer.max_steps=2", "trainer.eval_every=1"]
    two = cli(*args, "data.batch_size=2", f"hydra.run.dir={tmp_path}/two", nproc=2, cwd=tmp_path)
    finish(two)
    run_inline(*args, "data.batch_size=4", run_dir=tmp_path / "one")
    a, b = ([r for r in records(tmp_path / run) if r["split"] == "eval"] for run in ("two", "one"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "main_ce", "mtp_ce_1", "mtp_acc_1", "acceptance_length"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
