"""MiniMax-M3 (transformers ``minimax_m3_vl``), text part: MoE + block-sparse attention with an indexer.

Backbone. ``AutoModelForCausalLM`` has no entry for the VL config, and MTP fine-tuning is text-only, so
the backbone is transformers' text causal LM (``MiniMaxM3VLForCausalLM``) built from the text config:
no vision tower in memory, no vision parameters without gradients. A VL checkpoint nests the text model
under ``language_model.`` (``language_model.model.*``, ``language_model.lm_head``); the checkpoint layer
strips that prefix on load (``checkpoint_prefixes``), writes it back on save and copies the tensors it
does not model (vision tower, projector) verbatim. A checkpoint without the prefix (text only) loads and
saves as is. transformers registers MiniMax-M3's on-disk conversions (``block_sparse_moe.experts.{e}.w1``
-> merged ``mlp.experts.gate_up_proj``, ``index_q_proj`` -> ``indexer.q_proj``, ...) only for the VL
model type, so the text backbone gets the same list minus the renamings anchored at the checkpoint root
(prefix moves and vision tower), which never match prefix-less text keys.

MTP. D = ``num_mtp_modules`` (text config). On disk ``model.mtp.layers.{d}.{enorm,hnorm,eh_proj,
final_layernorm}`` and ``model.mtp.layers.{d}.transformer_layer.*``, the block being a decoder layer built
like the last backbone layer (same ``layer_types`` / ``mlp_layer_types`` entry: sparse attention with an
indexer, MoE). All norms are transformers' Gemma RMSNorm ``x * (1 + w)`` (computed in float32), the head
is the shared ``lm_head`` and depth k hands its final-normed state to depth k+1.

Packing. transformers' indexer anchors key blocks to row slots, ranks every block of the row in its
top-k and takes causality from ``position_ids``: on a packed row (positions restarting per document) a
query would compete with earlier documents' blocks, see its document cut by the row's block grid, and
could select no visible block at all. Every ``MiniMaxM3VLIndexer`` (backbone and MTP blocks) is
therefore class-swapped to ``DocumentIndexer`` (``minimax_m3_attention.py``): same parameters and state
dict, and transformers' attention forward runs unchanged around it. On a packed row (found from the
restarting ``position_ids``, as transformers' packed masks find it) the indexer scores only the query's
own document's earlier keys, pools them into document-relative blocks (block j = offsets ``[j*bs,
(j+1)*bs)`` of the document), applies the local-block and top-k rules as for the document alone, and the
attention mask is that selection AND the document-causal mask. The backbone is transformers' text model
as is (without a 2D mask it builds the document-causal mask from the restarting positions); MTP blocks
get the same mask (``packed_mask``) and the real positions for RoPE and the indexer. Each packed
document is computed as if it were alone (tested against transformers on the lone document, float64
1e-9). On rows whose positions never restart (one document per row) the indexer is transformers' own,
bit-identical.

Indexer gradient. The indexer only *selects* key blocks: its output is the integer ``topk`` indices,
turned into a mask, so no gradient reaches ``indexer.{q,k}_proj`` / ``{q,k}_norm`` through the LM loss
(DeepSeek-V3.2-style indexers are trained by a separate distillation loss against the dense attention
distribution, which transformers does not ship and which needs the full attention map). **Decision**:
indexers are not trained. Their weights become persistent buffers (same state-dict names) in backbone
and MTP blocks alike, so optimizers, weight decay and DDP's unused-parameter check never see them, the
checkpoint round trip keeps them bit-exact, and ``mtp.init=from_scratch`` still copies them from the
last backbone layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf

from mtp_recipes.families.base import Family, KeyPrefixes, packed_mask, register
from mtp_recipes.families.minimax_m3_attention import make_document_aware
from mtp_recipes.hf_compat import attach_weight_conversions, checkpoint_conversions, keep_in_fp32
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import BlockRunner, MTPDepth


def freeze_indexers(module: nn.Module) -> None:
    """Turn every indexer weight into a persistent buffer: kept in the state dict, never optimised."""
    for indexer in [m for m in module.modules() if isinstance(m, hf.MiniMaxM3VLIndexer)]:
        for sub in indexer.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                delattr(sub, name)
                sub.register_buffer(name, param.detach())


def text_weight_conversions() -> list[Any]:
    """The VL model's on-disk conversions that apply inside the language model (no root-anchored renames)."""
    return [c for c in checkpoint_conversions("minimax_m3_vl") if not any(p.startswith("^") for p in c.source_patterns)]


class MiniMaxM3(Family):
    name = "minimax_m3"
    model_types = ("minimax_m3_vl", "minimax_m3_vl_text")
    head = "shared"
    passes_on = "normed"
    checkpoint_prefixes = ("language_model.",)

    def mtp_config(self, hf_config: PretrainedConfig, **overrides: Any) -> MTPConfig:
        return MTPConfig(num_layers=int(getattr(hf_config, "num_mtp_modules", 0) or 0)).with_overrides(**overrides)

    def export_mtp_fields(self, mtp: MTPConfig) -> dict[str, Any]:
        return {"num_mtp_modules": mtp.num_physical_layers}

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        backbone = hf.MiniMaxM3VLForCausalLM(self.text_config(hf_config))
        attach_weight_conversions(backbone, text_weight_conversions())
        # The router adds this bias to float32 scores; exported new depths keep it float32 as well.
        keep_in_fp32(backbone, ["e_score_correction_bias"])
        freeze_indexers(backbone)
        make_document_aware(backbone)
        return backbone

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        # layer_idx picks the attention type (sparse + indexer) and MLP type (MoE) of the last layer.
        block = hf.MiniMaxM3VLDecoderLayer(hf_config, layer_idx=hf_config.num_hidden_layers - 1)
        freeze_indexers(block)
        make_document_aware(block)

        def norm() -> nn.Module:
            return hf.MiniMaxM3VLRMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)

        return MTPDepth(hf_config.hidden_size, norm(), norm(), [block], norm())

    def block_runner(
        self,
        backbone: PreTrainedModel,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        seq_idx: torch.Tensor | None,
    ) -> BlockRunner:
        text = backbone.get_decoder()
        mask = packed_mask(text.config, hidden, position_ids)
        rope = text.rotary_emb(hidden, position_ids=position_ids)

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return block(x, position_embeddings=rope, attention_mask=mask, position_ids=position_ids)

        return run

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        base = f"model.mtp.layers.{index}."
        pairs = [(f"{n}.", f"{base}{n}.") for n in ("enorm", "hnorm", "eh_proj")]
        pairs.append(("blocks.0.", f"{base}transformer_layer."))
        pairs.append(("final_norm.", f"{base}final_layernorm."))
        return pairs


register(MiniMaxM3())
