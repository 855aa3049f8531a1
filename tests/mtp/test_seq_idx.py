"""One meaning of ``seq_idx`` everywhere: a new document starts where the id changes, even if an id is reused."""

from __future__ import annotations

import pytest
import torch

from mtp_recipes.document_layout import check_positions_match, document_ids
from mtp_recipes.model import MTPModel
from mtp_recipes.mtp.roll import count_depth_targets, roll_ids, roll_targets
from tests.helpers import DEBUG_MODELS, debug_model_config, depths

REUSED = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.int32)  # three documents: slots 0-2, 3-4, 5-7
CANONICAL = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]], dtype=torch.int32)


def reference_targets(labels: list[int], k: int, starts: list[int]) -> list[int]:
    """Plain loop: slot t keeps labels[t+k] when no document starts in (t, t+k]."""
    size = len(labels)
    return [labels[t + k] if t + k < size and not any(t < s <= t + k for s in starts) else -100 for t in range(size)]


def test_a_reused_id_starts_a_new_document_in_the_rolls():
    assert torch.equal(document_ids(REUSED), CANONICAL)
    labels = torch.arange(10, 18)[None]
    for k in range(1, 8):
        expected = reference_targets(labels[0].tolist(), k, starts=[3, 5])
        assert roll_targets(labels, k, REUSED).tolist() == [expected], k
        assert torch.equal(roll_ids(labels, k, REUSED), roll_ids(labels, k, CANONICAL))
    # depth 4 at slots 0-1 would read slots 4-5: another document each, not the first one again
    assert roll_targets(labels, 4, REUSED)[0, :2].tolist() == [-100, -100]
    assert torch.equal(count_depth_targets(labels, 5, REUSED), count_depth_targets(labels, 5, CANONICAL))


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_the_model_reads_documents_from_change_points(name):
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name), **depths(name, 2))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.text_config.vocab_size, (1, 8), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    reused, canonical = model(ids, labels, seq_idx=REUSED), model(ids, labels, seq_idx=CANONICAL)
    torch.testing.assert_close(reused.loss, canonical.loss, rtol=0, atol=0)
    for a, b in zip(reused.mtp_losses, canonical.mtp_losses, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    both = model(ids, labels, position_ids=positions, seq_idx=REUSED)
    torch.testing.assert_close(both.loss, canonical.loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("positions", "match"),
    [
        ([0, 1, 2, 3, 4, 0, 1, 2], r"row 0, slot 3: position 3, expected 0 because a document starts there"),
        ([0, 1, 2, 0, 1, 0, 1, 0], r"row 0, slot 7: position 0, expected 2 because seq_idx does not change there"),
        ([0, 1, 2, 0, 2, 0, 1, 2], r"row 0, slot 4: position 2, expected 1"),
    ],
)
def test_position_ids_that_disagree_with_seq_idx_are_one_error_naming_the_slot(positions, match):
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config("deepseek_v3_debug"))
    ids = torch.randint(3, 100, (1, 8))
    with pytest.raises(ValueError, match=match) as err:
        model(ids, position_ids=torch.tensor([positions]), seq_idx=REUSED)
    assert "\n" not in str(err.value)


def test_positions_may_continue_a_document_from_the_previous_row():
    rows = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    check_positions_match(torch.tensor([[7, 8, 0, 1], [2, 3, 4, 0]]), rows)
    with pytest.raises(ValueError, match=r"row 1, slot 3"):
        check_positions_match(torch.tensor([[7, 8, 0, 1], [2, 3, 4, 5]]), rows)
