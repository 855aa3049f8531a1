"""Document-aware block-sparse attention for MiniMax-M3 packed rows (``seq_idx``).

transformers' ``MiniMaxM3VLIndexer`` scores every (query, key) pair with a small multi-head dot product
(RoPE on the first ``index_head_dim`` channels, float32), masks keys after the query's *position* with
``-inf``, max-pools the scores over contiguous key blocks of ``index_block_size`` *slots* (block j holds
slots ``[j*bs, (j+1)*bs)`` of the row), forces the ``index_local_blocks`` blocks ending at the query's
block (``position // bs - i``, clamped at 0) to ``+inf``, keeps the top ``min(index_topk_blocks,
ceil(S / bs))`` blocks per query and indexer head (``-inf`` ones dropped), and on eager/SDPA expands them
to a per-key mask intersected with the given mask. In a packed row this ranks blocks of earlier documents
against the query's own, and the row's block grid is not the document's when it starts mid-block.

:class:`DocumentSparseAttention` (built by class swap, :func:`make_document_aware`) keeps the parent's
parameters, state dict and, without ``seq_idx``, its forward (it calls it). With ``seq_idx`` it does for
every query what the indexer would do for the query's document run alone:

* offsets ``r`` = slot minus the document's first slot (== the restarting ``position_ids``);
* visibility = same document and ``r_k <= r_q``; other keys score ``-inf`` before pooling (a);
* block ids are document-relative: a block starts at every key with ``r % bs == 0`` (so at each document
  start), and the row's blocks are numbered in order (``cumsum``); the max-pool is a ``scatter_reduce``
  over those ids, so block j of a document covers exactly its offsets ``[j*bs, (j+1)*bs)`` (b);
* local blocks are the query's block and the ``index_local_blocks - 1`` before it *in its document*
  (clamped at the document's block 0); the top-k size is ``index_topk_blocks``: blocks of other documents
  sit at ``-inf`` and are never kept, and the alone run's ``min(topk, ceil(L / bs))`` only trims ``-inf``
  entries, so the kept set is the alone one (c);
* the attention mask = selected blocks AND document-causal AND the given mask, additive with the dtype's
  minimum like transformers' ``build_block_mask`` (d).

Selection runs under ``no_grad`` (integer indices: no gradient flows through it in transformers either).
Only the eager / SDPA interfaces are supported with ``seq_idx`` (the MiniMax block-sparse kernel takes
slot-anchored block indices) and no KV cache (training). Ties in the top-k (equal finite scores, or more
``+inf`` local blocks than ``index_topk_blocks``) may be broken differently than in the alone run.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf


def document_offsets(seq_idx: torch.Tensor) -> torch.Tensor:
    """Slot minus the first slot of the slot's document (``seq_idx`` runs are documents)."""
    slots = torch.arange(seq_idx.shape[-1], device=seq_idx.device).expand_as(seq_idx)
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[..., 1:] = seq_idx[..., 1:] != seq_idx[..., :-1]
    return slots - torch.where(start, slots, torch.zeros_like(slots)).cummax(dim=-1).values


@torch.no_grad()
def document_block_keep(
    indexer: hf.MiniMaxM3VLIndexer,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    seq_idx: torch.Tensor,
    num_attention_heads: int,
) -> torch.Tensor:
    """``[B, num_attention_heads, S, S]`` bool: the indexer's block selection, per document, AND doc-causal."""
    batch, length, _ = hidden_states.shape
    bs, dim, heads = indexer.block_size, indexer.head_dim, indexer.num_heads
    idx_q = indexer.q_norm(indexer.q_proj(hidden_states).view(batch, length, -1, dim)).transpose(1, 2)
    idx_k = indexer.k_norm(indexer.k_proj(hidden_states).view(batch, length, 1, dim)).transpose(1, 2)
    cos, sin = position_embeddings
    idx_q, idx_k = hf.apply_rotary_pos_emb(idx_q, idx_k, cos[..., :dim], sin[..., :dim])
    scores = torch.matmul(idx_q.float(), idx_k.float().transpose(-1, -2))  # [B, H_idx, S, S]

    seq_idx = seq_idx.to(hidden_states.device).expand(batch, -1)
    offset = document_offsets(seq_idx)  # [B, S]
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    visible = (same_doc & (offset[:, None, :] <= offset[:, :, None]))[:, None]  # [B, 1, S_q, S_k]
    scores = scores.masked_fill(~visible, float("-inf"))

    # Document-relative key blocks, numbered along the row: a new block at every offset multiple of bs.
    block = (offset % bs == 0).cumsum(-1) - 1  # [B, S]; offset 0 at slot 0, so block[:, 0] == 0
    num_blocks = int(block.max()) + 1
    block_scores = scores.new_full((batch, heads, length, num_blocks), float("-inf"))
    block_scores.scatter_reduce_(-1, block[:, None, None, :].expand_as(scores), scores, "amax", include_self=True)

    if indexer.local_blocks > 0:
        local = torch.arange(indexer.local_blocks, device=block.device)
        back = torch.minimum(local[None, None, :], (offset // bs)[..., None])  # never before the doc's block 0
        local_idx = (block[..., None] - back).unsqueeze(1).expand(-1, heads, -1, -1)  # [B, H_idx, S, local]
        block_scores.scatter_(-1, local_idx, float("inf"))

    top_scores, top_idx = block_scores.topk(min(indexer.topk_blocks, num_blocks), dim=-1)
    top_idx = top_idx.masked_fill(top_scores == float("-inf"), num_blocks)  # dropped -> throwaway column
    kept = torch.zeros((batch, heads, length, num_blocks + 1), dtype=torch.bool, device=block.device)
    kept.scatter_(-1, top_idx, True)
    key_kept = kept.gather(-1, block[:, None, None, :].expand(-1, heads, length, -1))  # [B, H_idx, S_q, S_k]
    key_kept = key_kept.repeat_interleave(num_attention_heads // heads, dim=1)
    return key_kept & visible


class DocumentSparseAttention(hf.MiniMaxM3VLAttention):
    """``MiniMaxM3VLAttention`` whose sparse selection respects packed documents when given ``seq_idx``.

    Same parameters and state dict; without ``seq_idx`` (or without an indexer) the parent's forward runs
    unchanged. Only created by class swap (:func:`make_document_aware`).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq_idx = kwargs.pop("seq_idx", None)
        if seq_idx is None or self.indexer is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        if past_key_values is not None:
            raise NotImplementedError("seq_idx with a KV cache: packed rows are a training-time layout")
        impl = self.config._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise NotImplementedError(f"document-aware sparse attention supports eager/sdpa, not {impl!r}")

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = hf.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        keep = document_block_keep(
            self.indexer, hidden_states, position_embeddings, seq_idx, self.config.num_attention_heads
        )
        if attention_mask is not None:
            keep = keep & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
        dtype = query_states.dtype
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

        kwargs.pop("position_ids", None)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, hf.eager_attention_forward)
        attn_output, attn_weights = interface(
            self,
            query_states,
            key_states,
            value_states,
            mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def make_document_aware(module: torch.nn.Module) -> None:
    """Swap every ``MiniMaxM3VLAttention`` in ``module`` (backbone or MTP block) to the document-aware one."""
    for sub in module.modules():
        if type(sub) is hf.MiniMaxM3VLAttention:
            sub.__class__ = DocumentSparseAttention
