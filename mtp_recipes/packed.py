"""Document bookkeeping of packed rows: where documents start, positions within them, ids from positions.

One definition for the model, the Mamba2 kernels and the attention masks, so all of them agree on
where a document begins.
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
