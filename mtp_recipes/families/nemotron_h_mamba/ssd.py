"""Chunked Mamba2 SSD scan in plain PyTorch that resets its state at every document start.

transformers' torch fallback scan has no ``seq_idx``: in a packed row the SSM state of one document flows
into the next. This scan takes ``seq_idx`` with the semantics of ``mamba_ssm.mamba_chunk_scan_combined``:

* within a chunk the decay matrix is masked to "same document", so ``exp(-inf) = 0`` across boundaries;
* a chunk's carried-in state reaches position ``l`` only if ``l`` is in the document that was running at the
  end of the previous chunk, and the state a chunk passes on contains only tokens of the document of its last
  token (plus the carried-in state when the chunk holds no boundary).

Memory stays linear in the sequence: the only ``[l, s]`` tensors are per chunk (``[b, c, h, Q, Q]``), ``B``/``C``
are contracted over the state dim per *group* before anything is expanded to heads, and the inter-chunk
recurrence is a loop over chunks instead of transformers' ``[chunks, chunks]`` decay matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtp_recipes.document_layout import document_starts


def _chunked(t: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    """``[b, S, ...] -> [b, S/Q, Q, ...]`` after zero-padding the sequence dim to a multiple of ``Q``."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.view(t.shape[0], -1, chunk_size, *t.shape[2:])


def discretized_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The step size every SSD scan uses: ``clamp(softplus(dt + dt_bias))`` in ``dtype`` (fp32 at least)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``(y + D x) * silu(z)`` in ``y``'s (compute) dtype, returned in ``x.dtype``: the scan's epilogue."""
    cdt = torch.promote_types(y.dtype, torch.float32)
    y = y.to(cdt)
    if D is not None:
        Dc = D.to(cdt)
        y = y + x.to(cdt) * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)


@dataclass(frozen=True)
class _ChunkDocuments:
    """Which tokens of each chunk may exchange state, from the row's documents (no ``seq_idx``: all of them).

    ``intra_mask [b, c, 1, l, s]`` (or ``[l, s]``): causal and same document; ``passes_on [b, c, 1, l]``:
    tokens in the chunk's last document, the only ones whose state leaves the chunk; ``receives``: tokens
    that continue the previous chunk's last document; ``carries [b, c]``: the chunk holds no boundary, so
    the carried-in state survives it.
    """

    intra_mask: torch.Tensor
    passes_on: torch.Tensor | None = None
    receives: torch.Tensor | None = None
    carries: torch.Tensor | None = None

    @classmethod
    def of(cls, seq_idx: torch.Tensor | None, pad: int, chunk_size: int, device: torch.device) -> _ChunkDocuments:
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()
        if seq_idx is None:
            return cls(causal)
        doc = document_starts(seq_idx.to(device)).cumsum(dim=-1)  # monotone document number per token
        if pad:
            doc = torch.cat([doc, doc[:, -1:].expand(doc.shape[0], pad)], dim=1)
        doc = doc.view(doc.shape[0], -1, chunk_size)
        end_doc = doc[..., -1]  # [b, c]
        prev_end_doc = torch.cat([doc[:, :1, 0], end_doc[:, :-1]], dim=1)
        return cls(
            intra_mask=(causal & (doc[..., :, None] == doc[..., None, :])).unsqueeze(2),
            passes_on=(doc == end_doc[..., None]).unsqueeze(2),
            receives=(doc == prev_end_doc[..., None]).unsqueeze(2),
            carries=end_doc == prev_end_doc,
        )


def _carry(
    state: torch.Tensor, chunk_decay: torch.Tensor, chunk_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inter-chunk recurrence, one chunk at a time (O(chunks) memory, no ``[chunks, chunks]`` matrix).

    Returns the state carried into every chunk ``[b, c, h, p, n]`` and the state after the last one.
    """
    carried_in = []
    for c in range(chunk_states.shape[1]):
        carried_in.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    return torch.stack(carried_in, dim=1), state


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSD over ``x [b, S, h, p]`` with ``dt [b, S, h]``, ``A [h]``, ``B``/``C [b, S, g, n]``.

    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t + D x_t`` (then ``* silu(z)`` if given), with
    ``h`` reset to zero at every document start in ``seq_idx [b, S]`` (``initial_states [b, h, p, n]`` feeds the
    row's first document only). Computes in fp32 (fp64 for fp64 inputs) and returns ``y`` in ``x.dtype``; with
    ``return_final_states`` also the state (compute dtype) after the last token, i.e. of the row's last document.

    Longer than 60 lines on purpose: the four numbered steps of the chunked algorithm (intra-chunk, chunk states,
    state passing with resets, output) read together, each using the previous one's tensors.
    """
    batch, seq_len, n_heads, head_dim = x.shape
    n_groups, state_size = B.shape[2], B.shape[3]
    heads_per_group = n_heads // n_groups
    pad = (-seq_len) % chunk_size
    n_chunks = (seq_len + pad) // chunk_size
    view_grouped = (batch, n_chunks, chunk_size, n_groups, heads_per_group, head_dim)

    # fp32 at least (bf16 cumsums/exps are far too coarse), fp64 kept as is so references can be exact.
    cdt = torch.promote_types(x.dtype, torch.float32)
    dt = discretized_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    xc = x.to(cdt)

    xdt = _chunked(xc * dt[..., None], pad, chunk_size)  # [b, c, l, h, p]
    Bc = _chunked(B.to(cdt), pad, chunk_size)  # [b, c, l, g, n]
    Cc = _chunked(C.to(cdt), pad, chunk_size)
    # Cumulative log-decay within each chunk, heads before positions: [b, c, h, l]. Padded tokens have
    # dt = 0, so they neither decay nor feed the state and the final state is the one after token S-1.
    acum = _chunked(dt * A.to(cdt), pad, chunk_size).cumsum(dim=2).transpose(2, 3)

    docs = _ChunkDocuments.of(seq_idx, pad, chunk_size, x.device)

    # 1. Intra-chunk (diagonal blocks). C.B is contracted over n per group before expanding to heads.
    decay = torch.exp((acum[..., :, None] - acum[..., None, :]).masked_fill(~docs.intra_mask, -math.inf))
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    weights = decay.view(batch, n_chunks, n_groups, heads_per_group, chunk_size, chunk_size) * scores[:, :, :, None]
    weights = weights.view(batch, n_chunks, n_heads, chunk_size, chunk_size)
    y = torch.einsum("bchls,bcshp->bclhp", weights, xdt)

    # 2. State each chunk contributes at its end: sum_s exp(acum_end - acum_s) B_s x_s dt_s.
    to_end = torch.exp(acum[..., -1:] - acum)
    if docs.passes_on is not None:
        to_end = to_end * docs.passes_on
    xw = (xdt * to_end.transpose(2, 3)[..., None]).view(view_grouped)
    chunk_states = torch.einsum("bclgn,bclgrp->bcgrpn", Bc, xw).reshape(batch, n_chunks, n_heads, head_dim, state_size)

    # 3. Inter-chunk recurrence.
    chunk_decay = torch.exp(acum[..., -1])  # [b, c, h]
    if docs.carries is not None:
        chunk_decay = chunk_decay * docs.carries[..., None]
    state = xc.new_zeros(chunk_states[:, 0].shape) if initial_states is None else initial_states.to(xc)
    carried, state = _carry(state, chunk_decay, chunk_states)
    carried = carried.view(batch, n_chunks, n_groups, heads_per_group, head_dim, state_size)

    # 4. Carried state -> outputs (off-diagonal blocks), again contracting over n per group.
    from_start = torch.exp(acum)
    if docs.receives is not None:
        from_start = from_start * docs.receives
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, carried).reshape(batch, n_chunks, chunk_size, n_heads, head_dim)
    y = y + y_off * from_start.transpose(2, 3)[..., None]

    y = skip_and_gate(y.reshape(batch, n_chunks * chunk_size, n_heads, head_dim)[:, :seq_len], x, D, z)
    return (y, state) if return_final_states else y
