"""Nemotron-H (NVIDIA Nemotron-3, transformers ``nemotron_h``): hybrid Mamba2 / attention / MLP / MoE.

One MTP depth is a pattern of P NemotronH sublayers (Super V3 ships ``"*E"``: attention then MoE). On
disk the depths are flattened: ``mtp.layers.{d*P + i}``, with ``enorm/hnorm/eh_proj`` on sublayer 0 and
``final_layernorm`` on sublayer P-1. The head is the backbone's ``lm_head``; depth k hands its
final-normed state to depth k+1.

Packed rows: every Mamba2 mixer (backbone and MTP) is switched to the boundary-aware conv + scan of
``families/nemotron_h_mamba/``, and ``seq_idx`` is passed down with every forward, so no conv window or SSM
state crosses a document start; attention is block-diagonal from the per-document ``position_ids``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.engines import NORMED_CHAIN, EngineRule, ServingLimit, at_most
from mtp_recipes.errors import ConfigError
from mtp_recipes.families.base import Family, KeyPrefixes, packed_mask, register, set_fields, sub_config
from mtp_recipes.families.nemotron_h_mamba import kernels, use_boundary_aware_mamba
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import BlockRunner, MTPDepth

PATTERN_SYMBOLS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
SYMBOL_OF = {v: k for k, v in PATTERN_SYMBOLS.items()}
# The only block-type names SGLang's config accepts; transformers reads them too (as legacy names).
SERVING_NAMES = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}


def parse_block_pattern(pattern: str | Sequence[str]) -> tuple[str, ...]:
    """Sublayer types of one depth from a legacy pattern (``"*E"``) or a list of HF 5.23 names."""
    if isinstance(pattern, str):
        if not pattern:
            raise ConfigError(
                "empty MTP block pattern: give at least one of M (mamba), * (attention), - (mlp), E (moe)"
            )
        bad = sorted({c for c in pattern if c not in PATTERN_SYMBOLS})
        if bad:
            raise ConfigError(
                f"unknown symbol(s) {bad} in MTP block pattern {pattern!r}: use M (mamba), * (attention), "
                "- (mlp), E (moe)"
            )
        return tuple(PATTERN_SYMBOLS[c] for c in pattern)
    types = tuple(pattern)
    if not types:
        raise ConfigError("empty MTP block list: give at least one of " + ", ".join(SYMBOL_OF))
    bad = sorted({t for t in types if t not in SYMBOL_OF})
    if bad:
        raise ConfigError(f"unknown MTP block type(s) {bad}: use {sorted(SYMBOL_OF)}")
    return types


def block_pattern_string(types: Sequence[str]) -> str:
    return "".join(SYMBOL_OF[t] for t in types)


def _served_pattern(text_config: dict[str, Any], modules: int) -> str | None:
    """Both engines build each depth from ``mtp_hybrid_override_pattern`` with only attention and MoE sublayers."""
    pattern = text_config.get("mtp_hybrid_override_pattern")
    if not pattern:
        return "no mtp_hybrid_override_pattern: the engine builds the MTP depth's sublayers from it"
    if set(pattern) - {"*", "E"}:
        return f"mtp_hybrid_override_pattern={pattern!r}: the engine builds only '*' (attention) and 'E' (MoE)"
    return None


def _sglang_block_names(text_config: dict[str, Any], modules: int) -> str | None:
    """SGLang's config accepts only its own block names in the list fields (transformers' are refused)."""
    for key in ("layers_block_type", "mtp_layers_block_type"):
        names = text_config.get(key)
        if isinstance(names, list) and set(names) - set(SERVING_NAMES.values()):
            bad = sorted(set(names) - set(SERVING_NAMES.values()))
            return f"{key} holds {bad}: SGLang's config accepts only {sorted(set(SERVING_NAMES.values()))}"
    return None


_ONE_DEPTH = at_most("num_nextn_predict_layers", 1, "the engine builds exactly one Nemotron-H MTP depth")


class NemotronH(Family):
    name = "nemotron_h"
    model_types = ("nemotron_h",)
    head = "shared"
    # Both engines feed depth 1 the backbone state after norm_f and recycle the state after final_layernorm.
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/nemotron_h_mtp.py (NemotronHMultiTokenPredictor: one MTP layer asserted, "
            "sublayers '*' and 'E' from mtp_hybrid_override_pattern), vllm/config/speculative.py",
            NORMED_CHAIN,
            config_rules=(_ONE_DEPTH, _served_pattern),
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/nemotron_h_mtp.py (NemotronHMultiTokenPredictor), vllm/config/speculative.py",
            NORMED_CHAIN,
            multi_module_field="num_nextn_predict_layers",
            config_rules=(_ONE_DEPTH, _served_pattern),
            fails_on_missing=False,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/nemotron_h_mtp.py (NemotronHMultiTokenPredictor: one MTP layer asserted), "
            "sglang/srt/configs/nemotron_h.py (block type names)",
            NORMED_CHAIN,
            config_rules=(_ONE_DEPTH, _served_pattern, _sglang_block_names),
            fails_on_missing=False,
        ),
    )
    configurable_blocks = True
    # mamba_ssm's fused Mamba2 kernel reads the mixer's out_proj weight directly (peft refuses these too)
    lora_skipped = ("out_proj",)

    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        if overrides.get("block_types") is not None:
            overrides["block_types"] = parse_block_pattern(overrides["block_types"])
        base = MTPConfig(
            num_layers=int(hf_config.num_nextn_predict_layers or 0),
            block_types=parse_block_pattern(hf_config.mtp_layers_block_type or ["full_attention", "moe"]),
        )
        return base.with_overrides(**overrides)

    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        # vLLM, SGLang and transformers all parse the pattern string; SGLang rejects transformers' list
        # names (full_attention, linear_attention), so the list is left out.
        fields = {
            "num_nextn_predict_layers": mtp.num_physical_layers,
            "mtp_layers_block_type": None,
            "mtp_hybrid_override_pattern": block_pattern_string(mtp.block_types),
        }
        set_fields(config_json, fields)
        # A backbone list in transformers' names (configs transformers wrote) is renamed for SGLang.
        layers = config_json.get("layers_block_type")
        if isinstance(layers, list):
            config_json["layers_block_type"] = [SERVING_NAMES.get(t, t) for t in layers]

    def serving_limits(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> list[ServingLimit]:
        lines = []
        if mtp.num_physical_layers > 1:
            lines.append(
                f"vLLM and SGLang serve Nemotron-H MTP with one physical depth; this layout has "
                f"{mtp.num_physical_layers} (mtp.use_repeated_layer=true keeps one)"
            )
        pattern = block_pattern_string(mtp.block_types)
        if set(pattern) - {"*", "E"}:
            lines.append(
                f"vLLM and SGLang build Nemotron-H MTP sublayers of attention (*) and MoE (E) only; "
                f"this pattern is {pattern!r}"
            )
        return [ServingLimit(("vllm", "sglang"), line) for line in lines]

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        backbone = super().build_backbone(hf_config)
        use_boundary_aware_mamba(backbone)
        return backbone

    def describe_backend(self, device: torch.device) -> str | None:
        return kernels.describe_scan(torch.empty(0, device=device))

    def packing_kwargs(self, seq_idx: torch.Tensor | None) -> dict[str, Any]:
        # The boundary-aware Mamba2 mixers read seq_idx from the forward kwargs.
        return {} if seq_idx is None else {"seq_idx": seq_idx}

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        # NemotronHBlock picks its mixer from config.layers_block_type[layer_idx], so the sublayers are
        # built from a config whose layer list is the MTP pattern.
        cfg = sub_config(hf_config, layers_block_type=list(mtp.block_types))
        blocks = [hf.NemotronHBlock(cfg, layer_idx=i) for i in range(len(mtp.block_types))]
        for block in blocks:
            use_boundary_aware_mamba(block)

        norm = functools.partial(hf.NemotronHRMSNorm, hf_config.hidden_size, eps=hf_config.layer_norm_epsilon)
        return MTPDepth.with_norms(hf_config.hidden_size, norm, blocks)

    def block_runner(
        self,
        backbone: PreTrainedModel,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        seq_idx: torch.Tensor | None,
    ) -> BlockRunner:
        # The same masks the backbone builds: causal (block-diagonal when position_ids restart per
        # document) for attention, none for Mamba/MLP/MoE.
        attention_mask = packed_mask(backbone.config, hidden, position_ids)

        packing = self.packing_kwargs(seq_idx)

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            mask = attention_mask if block.block_type == "full_attention" else None
            return block(x, attention_mask=mask, position_ids=position_ids, **packing)

        return run

    def block_kind(self, block: nn.Module) -> Any:
        return block.block_type

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        p = len(mtp.block_types)
        first, last = index * p, index * p + p - 1
        pairs = [(f"{n}.", f"mtp.layers.{first}.{n}.") for n in ("enorm", "hnorm", "eh_proj")]
        pairs += [(f"blocks.{i}.", f"mtp.layers.{first + i}.") for i in range(p)]
        pairs.append(("final_norm.", f"mtp.layers.{last}.final_layernorm."))
        return pairs


register(NemotronH())
