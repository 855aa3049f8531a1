"""The held-out split never reaches training; held-out batches cover every held-out row once, on every rank."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mtp_recipes.data import build_train_and_eval, eval_batches, load_documents, load_tokenizer, pack_documents
from mtp_recipes.data.formats import Document
from mtp_recipes.errors import DataError


def write_rows(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def cfg_for(source, **changes):
    base = {"source": str(source), "split": "train", "format": "text", "text_field": "text", "messages_field": "m",
            "text_sample_by": "line", "max_documents": None, "eval_fraction": 0.2, "eval_source": None,
            "eval_split": "train"}  # fmt: skip
    return {**base, **changes}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:debug")


def contains(doc: list[int], piece: list[int]) -> bool:
    return any(doc[i : i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1))


def test_held_out_documents_never_reach_training_rows(tmp_path, tokenizer):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + f" #{i}" for i in range(60)]
    texts += texts[:10]  # repeated rows: each copy must land on the same side
    source = write_rows(tmp_path / "rows.jsonl", texts)
    cfg = cfg_for(source, seq_len=32, batch_size=3)

    train, held = load_documents(cfg, tokenizer)
    assert len(held) >= math.ceil(0.2 * 70) and len(train) + len(held) == 70
    held_ids = {tuple(d.input_ids) for d in held}
    assert not held_ids & {tuple(d.input_ids) for d in train}

    # the split depends on content only: the same documents are held out from shuffled rows
    shuffled = texts[:]
    rng.shuffle(shuffled)
    _, again = load_documents(cfg_for(write_rows(tmp_path / "shuffled.jsonl", shuffled)), tokenizer)
    assert {tuple(d.input_ids) for d in again} == held_ids

    # every segment of every packed training row comes from a training document, none from a held-out one
    loader, batches = build_train_and_eval(cfg, tokenizer)
    rows = loader.dataset.tensors
    unique_held = [d.input_ids for d in held if not any(contains(t.input_ids, d.input_ids[:8]) for t in train)]
    for ids, labels, seq_idx in zip(rows["input_ids"], rows["labels"], rows["seq_idx"], strict=True):
        for s in seq_idx.unique():
            piece = ids[(seq_idx == s) & (labels != -100)].tolist()
            if len(piece) >= 8:
                assert any(contains(d.input_ids, piece) for d in train)
                assert not any(contains(d, piece) for d in unique_held)
    assert unique_held  # the check above had held-out text to find
    held_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert held_tokens == sum(len(d.input_ids) - 1 for d in held)  # every held-out target, in the held-out batches


def test_separate_eval_source_and_errors(tmp_path, tokenizer):
    train_src = write_rows(tmp_path / "train.jsonl", [f"row {i} of training" for i in range(10)])
    eval_src = write_rows(tmp_path / "val.jsonl", [f"row {i} of validation" for i in range(3)])
    train, held = load_documents(cfg_for(train_src, eval_source=str(eval_src)), tokenizer)
    assert len(train) == 10 and len(held) == 3
    assert load_documents(cfg_for(train_src, eval_fraction=0.0), tokenizer)[1] is None
    with pytest.raises(DataError, match="holds out all 10 documents"):
        load_documents(cfg_for(write_rows(tmp_path / "same.jsonl", ["one row"] * 10)), tokenizer)


@pytest.mark.parametrize("rows, batch, ranks", [(7, 2, 3), (12, 4, 3), (1, 3, 2)])
def test_eval_batches_cover_every_row_once_with_equal_counts_per_rank(rows, batch, ranks):
    docs = [Document(list(range(10 * i + 3, 10 * i + 11)), [True] * 8) for i in range(rows)]
    packed = pack_documents(docs, 8, pad_id=0, strategy="greedy")
    per_rank = [eval_batches(packed, batch, 0, rank, ranks) for rank in range(ranks)]
    assert len({len(b) for b in per_rank}) == 1 and all(x["input_ids"].shape[0] == batch for b in per_rank for x in b)
    seen = [tuple(r) for b in per_rank for x in b for r, lab in zip(x["input_ids"], x["labels"], strict=True)
            if (lab != -100).any()]  # fmt: skip
    assert sorted(seen) == sorted(tuple(r) for r in packed.input_ids.tolist())
    padding = [x for b in per_rank for x in b for lab in x["labels"] if (lab == -100).all()]
    assert len(seen) + len(padding) == len(per_rank[0]) * batch * ranks
    assert all(torch.equal(x["position_ids"][0], torch.arange(8)) for b in per_rank for x in b)
