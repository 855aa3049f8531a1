"""Boundary-aware rolls that build the inputs and targets of MTP depth k (spec §2, §3).

A plain ``torch.roll`` would wrap the row around and, in packed rows, let depth k at the end of one
document see (and be trained on) tokens of the next. These helpers shift left by k along the last
dimension and blank every slot whose source ``t+k`` is past the row end or in another document (a new
document starts wherever ``seq_idx`` changes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtp_recipes.document_layout import document_ids


def _shifted_valid(like: Tensor, k: int, seq_idx: Tensor | None) -> Tensor:
    """Bool mask over ``like[..., :S-k]``: True where slot ``t+k`` is in the document of ``t``."""
    size = like.shape[-1]
    if seq_idx is None:
        return torch.ones(like.shape[:-1] + (size - k,), dtype=torch.bool, device=like.device)
    doc = document_ids(seq_idx)  # a reused id (e.g. [0, 0, 1, 1, 0, 0]) is still another document
    return doc[..., k:] == doc[..., : size - k]


def roll_ids(input_ids: Tensor, k: int, seq_idx: Tensor | None = None, fill: int = 0) -> Tensor:
    """Token ids of depth k: slot t gets ``input_ids[t+k]`` inside its document, else ``fill``.

    Filler slots are never targets (see :func:`roll_targets`), so their value only has to be a
    valid embedding index.
    """
    if k < 0:
        raise ValueError(f"roll offset k must be >= 0, got {k}")
    if seq_idx is not None and seq_idx.shape != input_ids.shape:
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != {tuple(input_ids.shape)}")
    out = torch.full_like(input_ids, fill)
    size = input_ids.shape[-1]
    if k >= size:
        return out
    keep = _shifted_valid(input_ids, k, seq_idx)
    out[..., : size - k] = torch.where(keep, input_ids[..., k:], out[..., : size - k])
    return out


def roll_targets(labels: Tensor, k: int, seq_idx: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Targets of depth k on already-shifted labels: ``labels[t+k]`` inside the document.

    ``ignore_index`` where ``t+k >= S``, where ``seq_idx[t+k] != seq_idx[t]`` and where
    ``labels[t+k]`` is itself ignored. ``k = 0`` gives the main next-token targets.
    """
    return roll_ids(labels, k, seq_idx, fill=ignore_index)


def count_depth_targets(
    labels: Tensor, num_layers: int, seq_idx: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Valid-target counts ``[main, depth 1, ..., depth D]`` as one int64 tensor of length D+1.

    One tensor so a trainer can sum it over micro-batches and ``all_reduce`` it once, then pass
    ``counts[0]`` as ``num_label_tokens`` and ``counts[1:]`` as ``num_depth_tokens`` for an exact
    global mean (spec §3, ``depth_tokens``).
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    counts = [(roll_targets(labels, k, seq_idx, ignore_index) != ignore_index).sum() for k in range(num_layers + 1)]
    return torch.stack(counts).to(torch.int64)
