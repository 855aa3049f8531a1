"""Naive, obviously-correct references for the boundary-aware Mamba2 pieces (float64, loops over time).

They share no code with ``mtp_recipes.families.nemotron_h_mamba``: documents are found by comparing each token's id with the
previous token's, the conv is a loop over taps and positions, the scan a per-timestep recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def doc_start_flags(seq_idx: torch.Tensor | None, batch: int, seq_len: int) -> list[list[bool]]:
    """``flags[b][t]``: token t of row b starts a document (t = 0 always does)."""
    flags = [[t == 0 for t in range(seq_len)] for _ in range(batch)]
    if seq_idx is not None:
        for b in range(batch):
            for t in range(1, seq_len):
                flags[b][t] = bool(seq_idx[b, t] != seq_idx[b, t - 1])
    return flags


def conv_reference(x, weight, bias, seq_idx, activation):
    """Depthwise causal conv, ``x [B, C, S]``, ``weight [C, K]``, each document zero-padded on its own."""
    batch, _, seq_len = x.shape
    k = weight.shape[-1]
    starts = doc_start_flags(seq_idx, batch, seq_len)
    cols = []
    for b in range(batch):
        row = []
        for t in range(seq_len):
            acc = bias.clone() if bias is not None else torch.zeros_like(x[b, :, t])
            for j in range(k):  # j tokens back
                src = t - j
                if src < 0 or any(starts[b][u] for u in range(src + 1, t + 1)):
                    break
                acc = acc + weight[:, k - 1 - j] * x[b, :, src]
            row.append(acc)
        cols.append(torch.stack(row, dim=-1))
    out = torch.stack(cols)
    return F.silu(out) if activation in ("silu", "swish") else out


def scan_reference(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, seq_idx=None, initial_states=None):
    """Per-timestep SSM recurrence with the state reset at every document start. Returns ``(y, final_state)``."""
    batch, seq_len, heads, head_dim = x.shape
    groups = B.shape[2]
    rep = heads // groups
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.repeat_interleave(rep, dim=2)
    Ch = C.repeat_interleave(rep, dim=2)
    starts = doc_start_flags(seq_idx, batch, seq_len)
    ys, finals = [], []
    for b in range(batch):
        h = initial_states[b] if initial_states is not None else x.new_zeros(heads, head_dim, B.shape[-1])
        row = []
        for t in range(seq_len):
            if starts[b][t] and t > 0:
                h = torch.zeros_like(h)
            decay = torch.exp(dt[b, t] * A)  # [h]
            h = decay[:, None, None] * h + (dt[b, t][:, None, None] * x[b, t][:, :, None] * Bh[b, t][:, None, :])
            y = (h * Ch[b, t][:, None, :]).sum(-1)
            if D is not None:
                y = y + D[:, None] * x[b, t]
            row.append(y)
        ys.append(torch.stack(row))
        finals.append(h)
    return torch.stack(ys), torch.stack(finals)


def random_seq_idx(lengths: list[int]) -> torch.Tensor:
    """One row of document ids for documents of the given lengths."""
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
