"""Document bookkeeping of packed rows: where documents start, positions within them, ids from positions.

One definition for the model, the Mamba2 kernels and the attention masks, so all of them agree on
where a document begins: a new document starts wherever ``seq_idx`` changes (never "wherever the id
differs": ids may be reused along a row).
"""

from __future__ import annotations

import torch


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool, True where a token starts a new document (its ``seq_idx`` differs from the previous token).

    Boundaries are change points rather than "ids differ", so a row is split correctly even if an id is reused
    later in the row (e.g. ``[0, 0, 1, 1, 0, 0]`` is three documents). Position 0 is False: nothing precedes it.
    """
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[..., 1:] = seq_idx[..., 1:] != seq_idx[..., :-1]
    return starts


def position_in_document(seq_idx: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` long: the offset of every token from the first token of its document (its position id)."""
    seq_len = seq_idx.shape[-1]
    arange = torch.arange(seq_len, device=seq_idx.device).expand(seq_idx.shape)
    start = torch.where(document_starts(seq_idx), arange, torch.zeros_like(arange)).cummax(dim=-1).values
    return arange - start


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``seq_idx [B, S]`` from packed ``position_ids``, with the rule transformers' masks use for packed rows.

    A document starts wherever the position does not continue the previous one by +1
    (``transformers.masking_utils.find_packed_sequence_indices``), so attention masking and the Mamba2 resets
    agree on where documents begin.
    """
    position_ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(dim=-1).to(torch.int32)


def document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """``seq_idx`` renumbered 0, 1, 2, ... along each row, one number per document (same dtype).

    Two tokens are in the same document exactly when their numbers are equal. That holds for these numbers,
    not for any ``seq_idx`` (``[0, 0, 1, 1, 0, 0]`` is three documents), so code that compares ids (the MTP
    rolls, per-document attention, kernels that expect increasing ids) compares these.
    """
    return document_starts(seq_idx).cumsum(dim=-1).to(seq_idx.dtype)


def check_positions_match(position_ids: torch.Tensor, seq_idx: torch.Tensor) -> None:
    """Raise one ValueError naming the first slot where ``position_ids`` disagree with ``seq_idx``.

    They agree when positions restart at 0 exactly where ``seq_idx`` changes and count up by 1 everywhere
    else (a row may begin inside a document, at any position). Attention masks read documents from the
    positions and the MTP rolls and Mamba2 scans from ``seq_idx``, so a disagreement would let one see
    across a boundary the other respects.
    """
    position_ids, seq_idx = torch.broadcast_tensors(position_ids, seq_idx)
    starts = document_starts(seq_idx)
    prev = torch.cat([position_ids[..., :1] - 1, position_ids[..., :-1]], dim=-1)
    expected = torch.where(starts, torch.zeros_like(position_ids), prev + 1)
    expected[..., 0] = position_ids[..., 0]
    bad = (position_ids != expected).reshape(-1, seq_idx.shape[-1])
    if not bool(bad.any()):
        return
    row, slot = (int(i) for i in bad.nonzero()[0])
    got, want = int(position_ids.reshape(bad.shape)[row, slot]), int(expected.reshape(bad.shape)[row, slot])
    where = (
        "a document starts there (seq_idx changes)"
        if bool(starts.reshape(bad.shape)[row, slot])
        else ("seq_idx does not change there")
    )
    raise ValueError(
        f"position_ids disagree with seq_idx at row {row}, slot {slot}: position {got}, expected {want} because "
        f"{where}; positions must restart at 0 exactly where seq_idx changes"
    )


def document_layout(
    input_ids: torch.Tensor, position_ids: torch.Tensor | None, seq_idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(position_ids, document ids)`` of a batch given either, both (checked to agree) or neither (one document
    per row, ``None`` ids): the one reading of a packed batch that the backbone, the depths and the loss share."""
    if seq_idx is not None and position_ids is not None:
        check_positions_match(position_ids, seq_idx)
    if seq_idx is None and position_ids is not None:
        seq_idx = seq_idx_from_position_ids(position_ids)
    if position_ids is None:
        if seq_idx is not None:
            position_ids = position_in_document(seq_idx)
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return position_ids, None if seq_idx is None else document_ids(seq_idx)
