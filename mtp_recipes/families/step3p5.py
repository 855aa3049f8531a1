"""Step-3.5 (model_type ``step3p5``, transformers package ``step3p7``): sliding/full GQA attention with
head-wise gates, (1 + w) RMSNorms, MoE with a shared expert, D MTP layers with their own output heads.

Backbone: transformers 5.23 has only the text *model* (``Step3p7TextModel``) and the vision-language
``Step3p7ForConditionalGeneration``; ``AutoModelForCausalLM`` knows no ``step3p5``. The causal LM is
therefore :class:`Step3p5TextForCausalLM` below: transformers' text model + ``lm_head``, with
transformers' own ``step3p7`` weight conversions minus the VL-only prefix moves, so a text checkpoint
reads and writes the published names (``moe.{gate,up,down}_proj.weight`` stacked over experts,
``moe.gate.weight``, ``moe.router_bias``, ``share_expert.*``).

MTP: depth d is decoder layer ``model.layers.{N+d}`` (N = ``num_hidden_layers``) with a dense MLP,
attention type ``mtp_layer_types[d]``. **Decision on keys**: the block's own keys sit directly under
``model.layers.{N+d}.`` (``self_attn.*``, ``mlp.*``, ``input_layernorm``, ...), beside ``enorm``,
``hnorm``, ``eh_proj``; only the head lives under ``.transformer.``:
``model.layers.{N+d}.transformer.shared_head.{norm,output}.weight``. vLLM's ``step3p5_mtp`` loader maps
undecorated block keys to its ``mtp_block`` and strips ``.transformer.`` (SGLang does the same), so it
loads this layout; transformers' own ``MtpModel`` also expects the block directly at ``layers.{N+d}.``.
The head is per depth (``shared_head.output``, trained, not tied to ``lm_head``) behind
``shared_head.norm``; depth k hands its block output before that norm to depth k+1.

Per-layer config lists: hub configs pad ``layer_types``/``swiglu_limits*``/``rope_theta``/
``partial_rotary_factors`` with entries N..N+D-1 for the MTP layers. transformers' config keeps only
``mtp_layer_types``/``mtp_mlp_layer_types`` and drops the rest (rope is resolved per layer *type*), so a
block gets the rope of its type and no SwiGLU clamp (Step-3.5-Flash clamps only layers 43-44).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.step3p7 import Step3p7TextConfig
from transformers.models.step3p7 import modeling_step3p7 as hf

from mtp_recipes.errors import ConfigError
from mtp_recipes.families.base import (
    Family,
    KeyPrefixes,
    ignore_trailing_layers,
    num_nextn_layers,
    packed_mask,
    register,
    sub_config,
)
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import BlockRunner, MTPDepth


class Step3p5TextForCausalLM(hf.Step3p7PreTrainedModel, GenerationMixin):
    """transformers' Step-3.5 text model + ``lm_head``: the text-only causal LM transformers lacks."""

    config: Step3p7TextConfig
    input_modalities = ("text",)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Step3p7TextConfig) -> None:
        super().__init__(config)
        self.model = hf.Step3p7TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def _text_conversions() -> list:
    """transformers' ``step3p7`` conversions without the renames that move text/vision under the VL model."""
    nested = ("language_model", "vision_model", "multi_modal_projector")
    return [
        t
        for t in get_checkpoint_conversion_mapping("step3p7")
        if not (isinstance(t, WeightRenaming) and any(n in str(t.target_patterns) for n in nested))
    ]


register_checkpoint_conversion_mapping(Step3p5TextForCausalLM.__name__, _text_conversions(), overwrite=True)


class Step3p5(Family):
    name = "step3p5"
    model_types = ("step3p5",)
    head = "per_depth"
    passes_on = "pre_norm"

    def mtp_config(self, hf_config: PretrainedConfig, **overrides: Any) -> MTPConfig:
        return MTPConfig(num_layers=num_nextn_layers(hf_config)).with_overrides(**overrides)

    def export_mtp_fields(self, mtp: MTPConfig) -> dict[str, Any]:
        return {"num_nextn_predict_layers": mtp.num_physical_layers}

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        backbone = Step3p5TextForCausalLM(hf_config)
        ignore_trailing_layers(backbone, hf_config.num_hidden_layers)
        return backbone

    @staticmethod
    def attention_type(hf_config: PretrainedConfig, index: int) -> str:
        """``mtp_layer_types[index]``; depths beyond the list (a larger D than the checkpoint's) reuse the last."""
        types = hf_config.mtp_layer_types or ["full_attention"]
        return types[min(index, len(types) - 1)]

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        # Step3p7DecoderLayer reads its attention type, MLP type, clamps and head count at layer_idx, so
        # the block is built as layer 0 of a one-layer copy of the config holding the MTP entries.
        kind = self.attention_type(hf_config, index)
        cfg = sub_config(
            hf_config,
            layer_types=[kind],
            mlp_layer_types=["dense"],
            swiglu_limits=[None],
            swiglu_limits_shared=[None],
        )
        # Sliding layers may have more heads (``num_sliding_attention_heads``); full ones use the default.
        sliding = kind == "sliding_attention"
        cfg.per_layer_config = {0: {"num_attention_heads": hf_config.num_sliding_attention_heads}} if sliding else {}
        block = hf.Step3p7DecoderLayer(cfg, layer_idx=0)

        def norm() -> nn.Module:
            return hf.Step3p7RMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)

        head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        return MTPDepth(hf_config.hidden_size, norm(), norm(), [block], norm(), head)

    def block_runner(
        self,
        backbone: PreTrainedModel,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        seq_idx: torch.Tensor | None,
    ) -> BlockRunner:
        # The masks and per-type (cos, sin) Step3p7TextModel.forward builds, for the unrolled positions.
        decoder = backbone.get_decoder()
        masks = {
            "full_attention": packed_mask(backbone.config, hidden, position_ids),
            "sliding_attention": packed_mask(backbone.config, hidden, position_ids, create_sliding_window_causal_mask),
        }
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            kind = block.attention_type
            if kind not in rotary:
                if kind not in decoder.rotary_emb.rope_type:
                    raise ConfigError(
                        f"MTP layer type {kind!r} has no rope parameters: the backbone has only "
                        f"{sorted(decoder.rotary_emb.rope_type)} layers"
                    )
                rotary[kind] = decoder.rotary_emb(hidden, position_ids, kind)
            return block(x, attention_mask=masks[kind], position_ids=position_ids, position_embeddings=rotary[kind])

        return run

    def block_kind(self, block: nn.Module) -> Any:
        return (block.attention_type, type(block.mlp))

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        layer = f"model.layers.{hf_config.num_hidden_layers + index}."
        pairs = [(f"{n}.", f"{layer}{n}.") for n in ("enorm", "hnorm", "eh_proj")]
        pairs += [
            ("blocks.0.", layer),
            ("final_norm.", f"{layer}transformer.shared_head.norm."),
            ("head.", f"{layer}transformer.shared_head.output."),
        ]
        return pairs


register(Step3p5())
