"""Depthwise causal conv1d that respects document boundaries of packed rows.

A plain padded ``F.conv1d`` (transformers' torch fallback) is wrong for packed rows: with several
documents packed in one row, the first ``K-1`` tokens of every document read the tail of the previous
one. The CUDA ``causal_conv1d`` kernel avoids this through ``seq_idx``; this module gives the CPU (and
kernel-less GPU) path the same semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtp_recipes import hf_compat
from mtp_recipes.document_layout import position_in_document


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal conv over ``x [B, C, S]`` with ``weight [C, K]`` that never reads across a document start.

    Tap ``j`` (looking ``j`` tokens back) contributes to position ``t`` only if ``t - j`` is in the same document,
    which is exactly zero-padding every document on its own. Without ``seq_idx`` it is one padded ``F.conv1d``.
    Like transformers' mixer, the maths runs in ``weight.dtype`` and the result is returned in ``x.dtype``.
    """
    batch, channels, seq_len = x.shape
    kernel_size = weight.shape[-1]
    xw = x.to(weight.dtype)
    if seq_idx is None:
        out = F.conv1d(xw, weight.unsqueeze(1), bias, padding=kernel_size - 1, groups=channels)[:, :, :seq_len]
    else:
        if seq_idx.shape != (batch, seq_len):
            raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}, expected {(batch, seq_len)} to match x")
        pos = position_in_document(seq_idx.to(x.device)).unsqueeze(1)  # [B, 1, S]
        # Tap j = 0 (the current token) is always in-document; the others are masked where the source
        # position lies before the start of the token's document. K is tiny (4), so a loop over taps is
        # cheaper than any gather-based formulation.
        out = xw * weight[:, kernel_size - 1, None]
        for j in range(1, min(kernel_size, seq_len)):
            shifted = F.pad(xw[:, :, : seq_len - j], (j, 0))
            out = out + (shifted * weight[:, kernel_size - 1 - j, None]).masked_fill(pos < j, 0.0)
        if bias is not None:
            out = out + bias[:, None]
    if activation is not None:
        out = hf_compat.activation(activation)(out)
    return out.to(x.dtype)
