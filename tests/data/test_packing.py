"""Packing invariants, checked against a plain-python reconstruction of every document."""

import random

import pytest
import torch

from mtp_recipes.data.formats import Document
from mtp_recipes.data.packing import IGNORE_INDEX, pack_documents

PAD = 0


def random_documents(rng: random.Random, n: int, max_len: int) -> list[Document]:
    """Documents whose token ids are globally unique, so every slot names (document, offset)."""
    docs, next_id = [], 1
    for _ in range(n):
        length = rng.randint(1, max_len)
        ids = list(range(next_id, next_id + length))
        next_id += length
        docs.append(Document(ids, [rng.random() < 0.8 for _ in ids]))
    return docs


def check_packing(docs: list[Document], packed, seq_len: int) -> None:
    where = {tok: (d, off) for d, doc in enumerate(docs) for off, tok in enumerate(doc.input_ids)}
    seen: list[int] = []
    rows = packed.input_ids.tolist()
    for r, row in enumerate(rows):
        labels, pos, sid = packed.labels[r].tolist(), packed.position_ids[r].tolist(), packed.seq_idx[r].tolist()
        assert len(row) == seq_len
        assert sid[0] == 0 and all(b - a in (0, 1) for a, b in zip(sid, sid[1:])), "seq_idx 0,1,2,... per row"
        for t in range(seq_len):
            new_segment = t == 0 or sid[t] != sid[t - 1]
            assert pos[t] == (0 if new_segment else pos[t - 1] + 1), "positions restart at 0 per seq_idx"
            if row[t] == PAD:  # padding: the row's last segment, never a target
                assert sid[t] == sid[-1] and labels[t] == IGNORE_INDEX
                continue
            d, off = where[row[t]]
            seen.append(row[t])
            if not new_segment:
                assert where[row[t - 1]] == (d, off - 1), "a segment is a contiguous slice of one document"
            doc = docs[d]
            has_target = off + 1 < len(doc.input_ids) and doc.trainable[off + 1]
            assert labels[t] == (doc.input_ids[off + 1] if has_target else IGNORE_INDEX), (r, t)
            if t + 1 < seq_len and sid[t + 1] != sid[t] and labels[t] != IGNORE_INDEX:
                assert labels[t] not in row[t + 1 :], "a label never points into another segment"
    assert sorted(seen) == sorted(where), "every real token appears exactly once"
    stats = packed.stats
    real = sum(len(d.input_ids) for d in docs)
    assert (stats.rows, stats.documents, stats.real_tokens) == (len(rows), len(docs), real)
    assert stats.padding_tokens == len(rows) * seq_len - real == (packed.input_ids == PAD).sum().item()
    assert stats.split_documents == sum(len(d.input_ids) > seq_len for d in docs)
    assert stats.efficiency == pytest.approx(real / (len(rows) * seq_len))


@pytest.mark.parametrize("strategy", ["greedy", "first_fit"])
@pytest.mark.parametrize("seed", range(6))
def test_packing_invariants_random(strategy: str, seed: int) -> None:
    rng = random.Random(seed)
    seq_len = rng.choice([8, 16, 33])
    docs = random_documents(rng, rng.randint(1, 60), 3 * seq_len)
    packed = pack_documents(docs, seq_len, PAD, strategy, buffer_size=rng.choice([1, 7, 1000]))
    check_packing(docs, packed, seq_len)
    assert packed.seq_idx.dtype == torch.int32 and packed.input_ids.dtype == torch.long


def test_exact_layout_with_split_document() -> None:
    docs = [
        Document([1, 2, 3], [True, True, True]),
        Document([4, 5, 6, 7, 8, 9], [True, False, True, True, True, True]),
    ]
    packed = pack_documents(docs, 4, PAD, "greedy")
    assert packed.input_ids.tolist() == [[1, 2, 3, PAD], [4, 5, 6, 7], [8, 9, PAD, PAD]]
    # Label at the first piece's last slot is the true next token (8), not -100.
    assert packed.labels.tolist() == [[2, 3, -100, -100], [-100, 6, 7, 8], [9, -100, -100, -100]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert packed.seq_idx.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]]
    assert packed.stats.split_documents == 1


def test_first_fit_beats_greedy_on_random_inputs() -> None:
    for seed in range(20):
        rng = random.Random(100 + seed)
        docs = random_documents(rng, 200, 100)
        greedy = pack_documents(docs, 128, PAD, "greedy")
        first_fit = pack_documents(docs, 128, PAD, "first_fit")
        assert first_fit.stats.rows <= greedy.stats.rows
        assert first_fit.stats.efficiency >= greedy.stats.efficiency
        assert first_fit.stats.efficiency == pytest.approx(first_fit.stats.real_tokens / (first_fit.stats.rows * 128))


def test_first_fit_fills_gaps() -> None:
    docs = [Document([i] * n, [True] * n) for i, n in enumerate([6, 6, 2, 2], start=1)]
    assert pack_documents(docs, 8, PAD, "greedy").stats.rows == 3
    packed = pack_documents(docs, 8, PAD, "first_fit")
    assert packed.stats.rows == 2 and packed.stats.padding_tokens == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="data.packing"):
        pack_documents([Document([1], [True])], 4, PAD, "best")
    with pytest.raises(ValueError, match="no tokens"):
        pack_documents([], 4, PAD)
