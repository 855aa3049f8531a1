"""Document-aware block-sparse selection for MiniMax-M3 packed rows.

transformers' ``MiniMaxM3VLIndexer`` scores every (query, key) pair with a small multi-head dot product
(RoPE on the first ``index_head_dim`` channels, float32), masks keys after the query's *position* with
``-inf``, max-pools the scores over contiguous key blocks of ``index_block_size`` *slots* (block j holds
slots ``[j*bs, (j+1)*bs)`` of the row), forces the ``index_local_blocks`` blocks ending at the query's
block (``position // bs - i``, clamped at 0) to ``+inf``, keeps the top ``min(index_topk_blocks,
ceil(S / bs))`` blocks per query and indexer head (``-inf`` ones dropped), and on eager/SDPA expands them
to a per-key mask intersected with the given mask. In a packed row this ranks blocks of earlier documents
against the query's own, and the row's block grid is not the document's when it starts mid-block.

The attention's forward stays transformers' own: it calls ``self.indexer(hidden, rope, cache,
position_ids)`` and, on eager/SDPA, ``self.indexer.build_block_mask(selection, mask, ...)``. Those two
calls are the seam: :class:`DocumentIndexer` (built by class swap, :func:`make_document_aware`) keeps the
indexer's parameters and state dict, and when ``position_ids`` restart inside a row (a packed row; the
rule transformers' masks use to find packed documents) it does for every query what the indexer would
do for the query's document run alone:

* offsets ``r`` = slot minus the document's first slot (== the restarting ``position_ids``);
* visibility = same document and ``r_k <= r_q``; other keys score ``-inf`` before pooling (a);
* block ids are document-relative: a block starts at every key with ``r % bs == 0`` (so at each document
  start), and the row's blocks are numbered in order (``cumsum``); the max-pool is a ``scatter_reduce``
  over those ids, so block j of a document covers exactly its offsets ``[j*bs, (j+1)*bs)`` (b);
* local blocks are the query's block and the ``index_local_blocks - 1`` before it *in its document*
  (clamped at the document's block 0); the top-k size is ``index_topk_blocks``: blocks of other documents
  sit at ``-inf`` and are never kept, and the alone run's ``min(topk, ceil(L / bs))`` only trims ``-inf``
  entries, so the kept set is the alone one (c);
* the selection is a per-key boolean mask, which ``build_block_mask`` ANDs with the given mask into an
  additive mask with the dtype's minimum, as transformers' own does (d).

On rows whose positions never restart (one document per row, generation) both methods are transformers'
own, bit-identical. Selection runs under ``no_grad`` (integer indices: no gradient flows through it in
transformers either). Packed rows need the eager / SDPA interfaces (the MiniMax block-sparse kernel takes
slot-anchored block indices) and no KV cache (training). Ties in the top-k (equal finite scores, or more
``+inf`` local blocks than ``index_topk_blocks``) may be broken differently than in the alone run.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf

from mtp_recipes.document_layout import document_ids, position_in_document, seq_idx_from_position_ids
from mtp_recipes.hf_compat import attention_implementation, passed_cache, swap_class


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

    seq_idx = document_ids(seq_idx.to(hidden_states.device).expand(batch, -1))  # equal ids <=> same document
    offset = position_in_document(seq_idx)  # [B, S]
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


class DocumentIndexer(hf.MiniMaxM3VLIndexer):
    """``MiniMaxM3VLIndexer`` that selects per document on packed rows (``position_ids`` restarting).

    Same parameters and state dict; on any other row both methods are the parent's. Only created by class
    swap (:func:`make_document_aware`). ``forward`` takes the KV cache positionally or by keyword under
    either name transformers has used (``past_key_values``, ``cache``), as the parent accepts them.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # The parent's signature is (hidden_states, position_embeddings, <cache>, position_ids): the cache
        # is the third argument and position_ids the last, whatever the cache is called.
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[-1]
        seq_idx = seq_idx_from_position_ids(position_ids)
        if not bool(seq_idx[:, -1].any()):  # no restart in any row: one document per row
            return super().forward(hidden_states, position_embeddings, *args, **kwargs)
        cache = args[0] if len(args) == 2 else passed_cache(kwargs)
        if cache is not None:
            raise NotImplementedError("packed rows with a KV cache: packed rows are a training-time layout")
        impl = attention_implementation(self.config)
        if impl not in ("eager", "sdpa"):
            raise NotImplementedError(f"document-aware sparse attention supports eager/sdpa, not {impl!r}")
        return document_block_keep(self, hidden_states, position_embeddings, seq_idx, self.config.num_attention_heads)

    def build_block_mask(
        self,
        block_indices: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_length: int,
        dtype: torch.dtype,
        device: torch.device,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The parent's for block indices; for ``forward``'s per-key keep mask (bool): it AND ``attention_mask``."""
        if block_indices.dtype != torch.bool:
            return super().build_block_mask(block_indices, attention_mask, key_length, dtype, device, position_ids)
        keep = block_indices
        if attention_mask is not None:
            keep = keep & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
        return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def make_document_aware(module: torch.nn.Module) -> None:
    """Swap every ``MiniMaxM3VLIndexer`` in ``module`` (backbone or MTP block) to the document-aware one."""
    for sub in module.modules():
        if type(sub) is hf.MiniMaxM3VLIndexer:
            swap_class(sub, DocumentIndexer)
