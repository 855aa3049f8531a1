import pytest
import torch

from mtp_recipes.mtp.roll import count_depth_targets, roll_ids, roll_targets

I = -100


def _ref_roll(values, k, seq_idx, fill, ignore=None):
    """Plain-python reference straight from spec §2/§3."""
    out = []
    for b, row in enumerate(values):
        size = len(row)
        new = []
        for t in range(size):
            src = t + k
            ok = src < size and (seq_idx is None or seq_idx[b][src] == seq_idx[b][t])
            if ok and ignore is not None and row[src] == ignore:
                ok = False
            new.append(row[src] if ok else fill)
        out.append(new)
    return out


def _random_batch(gen, batch, size, num_docs):
    seq_idx = []
    for _ in range(batch):
        cuts = sorted(torch.randint(0, size + 1, (num_docs - 1,), generator=gen).tolist())
        row, doc, prev = [], 0, 0
        for cut in cuts + [size]:
            row += [doc] * (cut - prev)
            doc, prev = doc + 1, cut
        seq_idx.append(row)
    labels = torch.randint(1, 50, (batch, size), generator=gen)
    labels[torch.rand(batch, size, generator=gen) < 0.25] = I
    return labels, torch.tensor(seq_idx, dtype=torch.int32)


def test_spec_example():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    assert roll_targets(labels, 1, seq_idx).tolist() == [[2, 3, 4, I, 6, 7, 8, I]]
    assert roll_targets(labels, 2, seq_idx).tolist() == [[3, 4, I, I, 7, 8, I, I]]
    assert roll_ids(labels, 1, seq_idx).tolist() == [[2, 3, 4, 0, 6, 7, 8, 0]]
    assert roll_ids(labels, 2, seq_idx, fill=-1).tolist() == [[3, 4, -1, -1, 7, 8, -1, -1]]


def test_no_seq_idx_only_row_end_is_blanked():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert roll_targets(labels, 3).tolist() == [[4, 5, 6, 7, 8, I, I, I]]
    assert roll_ids(labels, 3).tolist() == [[4, 5, 6, 7, 8, 0, 0, 0]]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("use_seq_idx", [True, False])
def test_random_against_reference(k, use_seq_idx):
    gen = torch.Generator().manual_seed(100 * k + use_seq_idx)
    labels, seq_idx = _random_batch(gen, batch=3, size=17, num_docs=4)
    sidx = seq_idx if use_seq_idx else None
    sidx_list = seq_idx.tolist() if use_seq_idx else None
    got_t = roll_targets(labels, k, sidx)
    got_i = roll_ids(labels, k, sidx, fill=7)
    assert got_t.tolist() == _ref_roll(labels.tolist(), k, sidx_list, I, ignore=I)
    assert got_i.tolist() == _ref_roll(labels.tolist(), k, sidx_list, 7)
    assert got_t.dtype == labels.dtype and got_t.shape == labels.shape


@pytest.mark.parametrize("k", [8, 9, 100])
def test_offset_at_or_past_row_length(k):
    labels = torch.arange(1, 9).view(1, 8)
    seq_idx = torch.zeros(1, 8, dtype=torch.int32)
    assert (roll_targets(labels, k, seq_idx) == I).all()
    assert (roll_ids(labels, k, seq_idx, fill=3) == 3).all()


def test_inputs_are_not_modified():
    labels = torch.tensor([[1, 2, 3, 4]])
    seq_idx = torch.tensor([[0, 0, 1, 1]])
    roll_targets(labels, 1, seq_idx)
    assert labels.tolist() == [[1, 2, 3, 4]]


def test_count_depth_targets():
    labels = torch.tensor([[1, 2, 3, I, 5, 6, 7, I], [1, 2, 3, 4, 5, 6, 7, 8]])
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    counts = count_depth_targets(labels, 2, seq_idx)
    assert counts.dtype == torch.int64
    expected = [
        sum(v != I for row in _ref_roll(labels.tolist(), k, seq_idx.tolist(), I, I) for v in row) for k in range(3)
    ]
    assert counts.tolist() == expected == [14, 11, 8]
    assert count_depth_targets(labels, 0).tolist() == [14]


def test_errors():
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be >= 0"):
        roll_targets(labels, -1)
    with pytest.raises(ValueError, match="seq_idx shape"):
        roll_ids(labels, 1, torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_layers"):
        count_depth_targets(labels, -1)
