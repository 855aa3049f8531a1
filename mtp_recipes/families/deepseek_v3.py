"""DeepSeek-V3 (transformers ``deepseek_v3``): MLA attention + DeepSeekMoE, D MTP modules.

Depth d is one ``DeepseekV3DecoderLayer`` stored as the extra decoder layer ``model.layers.{N+d}``
(N = ``num_hidden_layers``): its own keys (``self_attn.*``, ``mlp.*``, ``input_layernorm``,
``post_attention_layernorm``) sit directly under that prefix, next to ``enorm``, ``hnorm``, ``eh_proj``
and ``shared_head.norm`` (our ``final_norm``). The MTP block is always MoE, as in the published model:
transformers picks dense vs MoE by ``layer_idx >= first_k_dense_replace``, so the block is built from a
config copy with ``first_k_dense_replace=0`` (what transformers' own ``get_mtp_config`` does).

The head is the backbone's ``lm_head`` (shared in training); the checkpoint also stores per-depth
copies ``shared_head.head`` and ``embed_tokens`` that vLLM reads, written on export from ``lm_head`` /
``embed_tokens`` and checked, not loaded, on import. Depth k hands its state *after* ``shared_head.norm`` to
depth k+1 (as vLLM's and SGLang's drafters recycle it). The block gets the backbone's rotary ``(cos, sin)`` and
causal mask for the unrolled position ids.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from mtp_recipes.engines import Conventions, EngineRule, ServingLimit, at_most
from mtp_recipes.families.base import (
    Family,
    KeyPrefixes,
    ignore_trailing_layers,
    num_nextn_layers,
    projection_widths,
    register,
    set_fields,
    sub_config,
)
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import MTPDepth


class DeepseekV3(Family):
    """Also the base of the families whose MTP modules are laid out like DeepSeek-V3's (their own block and norm
    classes, title and engine rules as class attributes)."""

    name = "deepseek_v3"
    title = "DeepSeek-V3"
    model_types = ("deepseek_v3",)
    head = "shared"
    decoder_layer: ClassVar[type[nn.Module]] = hf.DeepseekV3DecoderLayer
    rms_norm: ClassVar[type[nn.Module]] = hf.DeepseekV3RMSNorm
    # Both engines feed depth 1 the final-normed backbone state and recycle the state after shared_head.norm;
    # vLLM zeroes the embedding at position 0, SGLang keeps it.
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/deepseek_mtp.py (DeepSeekMultiTokenPredictorLayer.forward, "
            "DeepSeekMultiTokenPredictor: layers N .. N+n-1, module step % n), vllm/config/speculative.py "
            "(use_multi_module_mtp)",
            Conventions(h0="normed", passes_on="normed", zero_first_embedding=True),
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/deepseek_mtp.py (load_weights: is_mtp_completeness_check_enabled), "
            "vllm/config/speculative.py (use_multi_module_mtp reads num_nextn_predict_layers)",
            Conventions(h0="normed", passes_on="normed", zero_first_embedding=True),
            multi_module_field="num_nextn_predict_layers",
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/deepseek_nextn.py (DeepseekV3ForCausalLMNextN: one layer, shared_head.norm "
            "recycled, position 0 kept)",
            Conventions(h0="normed", passes_on="normed", zero_first_embedding=False),
            config_rules=(at_most("num_nextn_predict_layers", 1, "SGLang serves one DeepSeek-V3 MTP layer"),),
        ),
    )

    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        return MTPConfig(num_layers=num_nextn_layers(hf_config)).with_overrides(**overrides)

    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        set_fields(config_json, {"num_nextn_predict_layers": mtp.num_physical_layers})

    def serving_limits(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> list[ServingLimit]:
        if mtp.num_physical_layers > 1:
            line = f"SGLang serves {self.title} MTP with one depth only; this layout has {mtp.num_physical_layers}"
            return [ServingLimit(("sglang",), line)]
        return []

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        backbone = super().build_backbone(hf_config)
        ignore_trailing_layers(backbone, hf_config.num_hidden_layers)
        return backbone

    def block_config(self, hf_config: PretrainedConfig, layer_idx: int) -> PretrainedConfig:
        """The config the MTP block at ``layer_idx`` is built from: one whose layer ``layer_idx`` is MoE."""
        return sub_config(hf_config, first_k_dense_replace=0)

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        layer_idx = hf_config.num_hidden_layers + index
        block = self.decoder_layer(self.block_config(hf_config, layer_idx), layer_idx=layer_idx)
        norm = functools.partial(self.rms_norm, hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        return MTPDepth.with_norms(hf_config.hidden_size, norm, [block])

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        layer = f"model.layers.{hf_config.num_hidden_layers + index}."
        pairs = [(f"{n}.", f"{layer}{n}.") for n in ("enorm", "hnorm", "eh_proj")]
        pairs += [("blocks.0.", layer), ("final_norm.", f"{layer}shared_head.norm.")]
        return pairs

    def attention_widths(self, module: nn.Module) -> tuple[int, int] | None:
        # MLA: the query comes out of q_b_proj (the low-rank path), or q_proj when q_lora_rank is null.
        return projection_widths(module, "q_b_proj") or projection_widths(module)

    def tied_export_copies(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> dict[str, str]:
        copies = {}
        for i in range(mtp.num_physical_layers):
            layer = f"model.layers.{hf_config.num_hidden_layers + i}."
            copies[f"{layer}shared_head.head.weight"] = "lm_head.weight"
            copies[f"{layer}embed_tokens.weight"] = "model.embed_tokens.weight"
        return copies


register(DeepseekV3())
