"""DeepSeek-V3.2 (transformers ``deepseek_v32``): DeepSeek-V3 with DSA sparse attention, D MTP modules.

The MTP modules are laid out like DeepSeek-V3's (:class:`~mtp_recipes.families.deepseek_v3.DeepseekV3`), with the
block's indexer (``self_attn.indexer.*``) among its keys. The indexer scores keys under the causal mask the block
gets, which is block-diagonal in a packed row, so a token's top-k never picks a key of another document. The
indexers (backbone and MTP) are not trained, as MiniMax-M3's: the LM loss sends them no gradient (their top-k is
integer), and the distillation loss DeepSeek trains them with is not part of transformers; their weights are kept
as buffers and exported unchanged.
Both engines draft with their DeepSeek-V3 drafter, so the engine rules are DeepSeek-V3's: vLLM 0.34
``deepseek_mtp.py`` builds the indexer when the config has ``index_topk`` (``vllm/config/speculative.py`` maps
``deepseek_v32`` to ``deepseek_mtp``; with ``index_share_for_mtp_iteration`` set, draft steps after the first reuse
the first step's top-k and one module drafts every step); SGLang 0.5.23 drafts ``DeepseekV32ForCausalLM`` with
``DeepseekV3ForCausalLMNextN`` (``sglang/srt/configs/model_config.py``).
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf

from mtp_recipes.families.base import register, sub_config
from mtp_recipes.families.deepseek_v3 import DeepseekV3
from mtp_recipes.families.frozen import freeze_modules
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import MTPDepth


class DeepseekV32(DeepseekV3):
    name = "deepseek_v32"
    title = "DeepSeek-V3.2"
    model_types = ("deepseek_v32",)
    decoder_layer = hf.DeepseekV32DecoderLayer
    rms_norm = hf.DeepseekV32RMSNorm
    block_reads_mask = True  # the indexer's top-k is taken under it

    def block_config(self, hf_config: PretrainedConfig, layer_idx: int) -> PretrainedConfig:
        # transformers picks dense vs MoE per layer from mlp_layer_types, which covers the backbone's layers only.
        return sub_config(
            hf_config,
            first_k_dense_replace=0,
            mlp_layer_types=["sparse"] * (layer_idx + 1),
            layer_types=["indexed_attention"] * (layer_idx + 1),
        )

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        backbone = super().build_backbone(hf_config)
        freeze_modules(backbone, hf.DeepseekV32Indexer)
        return backbone

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        depth = super().build_depth(hf_config, mtp, index)
        freeze_modules(depth, hf.DeepseekV32Indexer)
        return depth


register(DeepseekV32())
