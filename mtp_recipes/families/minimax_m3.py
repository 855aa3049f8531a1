"""MiniMax-M3 (transformers ``minimax_m3_vl``), text part: MoE + block-sparse attention with an indexer.

The backbone is transformers' text causal LM (``MiniMaxM3VLForCausalLM``) built from the text config; a VL
checkpoint's ``language_model.`` prefix is stripped on load and written back on save, and its other towers
are copied verbatim. D = ``num_mtp_modules``; on disk ``model.mtp.layers.{d}.{enorm,hnorm,eh_proj,
final_layernorm}`` and ``model.mtp.layers.{d}.transformer_layer.*``, the block built like the last backbone
layer (sparse attention with an indexer, MoE). Norms are Gemma RMSNorms ``x * (1 + w)``; the head is the
shared ``lm_head``. As vLLM drafts: depth 1 reads the final-normed backbone state, depth k hands its block
output *before* ``final_layernorm`` to depth k+1, and depth 1's embedding is zero at position 0.

Every indexer (backbone and MTP) is the document-aware one of ``minimax_m3_attention.py``; indexer weights
are frozen buffers (docs/decisions.md says why).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf

from mtp_recipes.checkpoint.nesting import Nesting
from mtp_recipes.engines import Conventions, EngineRule, ServingLimit
from mtp_recipes.families.base import Family, KeyPrefixes, register, set_fields
from mtp_recipes.families.frozen import freeze_modules
from mtp_recipes.families.minimax_m3_attention import make_document_aware
from mtp_recipes.hf_compat import attach_weight_conversions, checkpoint_conversions, keep_in_fp32
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import MTPDepth


def freeze_indexers(module: nn.Module) -> None:
    """The indexers select key blocks only: their weights become buffers (:func:`freeze_modules`)."""
    freeze_modules(module, hf.MiniMaxM3VLIndexer)


def text_weight_conversions() -> list[Any]:
    """The VL model's on-disk conversions that apply inside the language model (no root-anchored renames)."""
    return [c for c in checkpoint_conversions("minimax_m3_vl") if not any(p.startswith("^") for p in c.source_patterns)]


class MiniMaxM3(Family):
    name = "minimax_m3"
    model_types = ("minimax_m3_vl", "minimax_m3_vl_text")
    head = "shared"
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/models/minimax_m3/nvidia/mtp.py (MiniMaxM3MultiTokenPredictor: num_mtp_modules modules, "
            "position 0 zeroed, the block output before final_layernorm recycled), vllm/config/speculative.py "
            "(use_multi_module_mtp is False for minimax_m3_mtp: module 1 drafts every step)",
            Conventions(h0="normed", passes_on="pre_norm", zero_first_embedding=True),
            modules_field="num_mtp_modules",
            multi_module=False,
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/models/minimax_m3/nvidia/mtp.py, vllm/config/speculative.py (use_multi_module_mtp: a module "
            "per draft step when num_nextn_predict_layers > 1)",
            Conventions(h0="normed", passes_on="pre_norm", zero_first_embedding=True),
            modules_field="num_mtp_modules",
            multi_module_field="num_nextn_predict_layers",
            fails_on_missing=False,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/ (no MiniMax-M3 MTP drafter: its MTP weights are skipped on load)",
            None,
            modules_field="num_mtp_modules",
        ),
    )
    checkpoint_nestings = (Nesting("language_model."),)

    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        return MTPConfig(num_layers=int(getattr(hf_config, "num_mtp_modules", 0) or 0)).with_overrides(**overrides)

    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        # vLLM builds num_mtp_modules depths but picks one per draft step only when num_nextn_predict_layers
        # is > 1; without it every step would run module 0.
        set_fields(
            config_json,
            {"num_mtp_modules": mtp.num_physical_layers, "num_nextn_predict_layers": mtp.num_physical_layers},
        )

    def serving_limits(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> list[ServingLimit]:
        skipped = "SGLang skips MiniMax-M3's MTP weights (serve MTP drafting with vLLM)"
        limits = [ServingLimit(("sglang",), skipped)] if mtp.num_layers else []
        if mtp.num_physical_layers > 1:
            line = (
                f"vLLM 0.34 drafts every step with MTP module 1 (multi-module MTP is off for MiniMax-M3): modules "
                f"2..{mtp.num_physical_layers} are never used; mtp.use_repeated_layer=true trains one module for "
                "every step"
            )
            limits.append(ServingLimit(("vllm",), line))
        return limits

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

        norm = functools.partial(hf.MiniMaxM3VLRMSNorm, hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        return MTPDepth.with_norms(hf_config.hidden_size, norm, [block])

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        base = f"model.mtp.layers.{index}."
        pairs = [(f"{n}.", f"{base}{n}.") for n in ("enorm", "hnorm", "eh_proj")]
        pairs.append(("blocks.0.", f"{base}transformer_layer."))
        pairs.append(("final_norm.", f"{base}final_layernorm."))
        return pairs


register(MiniMaxM3())
