"""Qwen3-Next (transformers ``qwen3_next``): Gated DeltaNet linear attention with gated full attention every
``full_attention_interval`` layers, MoE with a shared expert, one MTP layer.

The MTP module sits at the checkpoint's root: ``mtp.pre_fc_norm_embedding`` and ``mtp.pre_fc_norm_hidden`` (our
``enorm`` / ``hnorm``), ``mtp.fc`` (``eh_proj``), the decoder layers ``mtp.layers.{i}`` (full attention, the MLP the
backbone's rule gives layer 0) and ``mtp.norm`` (``final_norm``) in front of the shared ``lm_head``. The fusion and
the final norm are one set for every MTP layer in the engines' layout, so a model trains one physical depth (D > 1
with ``mtp.use_repeated_layer=true``, as the engines draft: one module at every step). Norms are the backbone's
``(1 + w)`` RMSNorm. D is ``num_nextn_predict_layers``, 1 when the config leaves it out (the published config.json
does; vLLM defaults to 1).

The backbone's Gated DeltaNet layers get the boundary-aware training forward of ``gated_deltanet.py``; a call with a
cache (generation) stays transformers'. Both engines feed the MTP layer the final-normed backbone state, recycle the
state after ``mtp.norm`` and keep the embedding at position 0.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from mtp_recipes import hf_compat
from mtp_recipes.engines import NORMED_CHAIN, EngineRule
from mtp_recipes.errors import ConfigError
from mtp_recipes.families.base import Family, KeyPrefixes, register, set_fields, sub_config
from mtp_recipes.families.gated_deltanet import PackedForward
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import MTPDepth


def qkvz_inputs(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(mixed_qkv, z, b, a)`` from Qwen3-Next's fused projections, whose rows are grouped by key head: per key
    head ``[q | k | v of its value heads | z of its value heads]`` and ``[b | a]`` of its value heads."""
    batch, length, _ = hidden.shape
    hk, dk, hv, dv = layer.num_k_heads, layer.head_k_dim, layer.num_v_heads, layer.head_v_dim
    per = hv // hk
    q, k, v, z = layer.in_proj_qkvz(hidden).view(batch, length, hk, -1).split([dk, dk, per * dv, per * dv], dim=-1)
    b, a = layer.in_proj_ba(hidden).view(batch, length, hk, 2 * per).split([per, per], dim=-1)
    mixed = torch.cat([q.reshape(batch, length, -1), k.reshape(batch, length, -1), v.reshape(batch, length, -1)], -1)
    return mixed, z.reshape(batch, length, hv, dv), b.reshape(batch, length, hv), a.reshape(batch, length, hv)


class PackedQwen3NextGatedDeltaNet(PackedForward, hf.Qwen3NextGatedDeltaNet):
    """transformers' Qwen3-Next linear-attention layer (same parameters) with the packed training forward."""

    projections = qkvz_inputs


class Qwen3Next(Family):
    """Also the base of Qwen3.5, whose MTP module is laid out the same way (its own classes as class attributes)."""

    name = "qwen3_next"
    title = "Qwen3-Next"
    model_types = ("qwen3_next",)
    head = "shared"
    decoder_layer: ClassVar[type[nn.Module]] = hf.Qwen3NextDecoderLayer
    rms_norm: ClassVar[type[nn.Module]] = hf.Qwen3NextRMSNorm
    deltanet: ClassVar[type[nn.Module]] = hf.Qwen3NextGatedDeltaNet
    packed_deltanet: ClassVar[type[nn.Module]] = PackedQwen3NextGatedDeltaNet
    depth_field: ClassVar[str] = "num_nextn_predict_layers"
    # The checkpoint's root of the MTP module (a VL checkpoint nests the language model, not the MTP module).
    mtp_root: ClassVar[str] = "mtp."
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/qwen3_next_mtp.py (Qwen3NextMultiTokenPredictor: one fc and pre-fc norms, "
            "layers mtp.layers.{i}, layer step % n, mtp.norm output drafted and recycled; no position-0 zeroing; "
            "num_nextn_predict_layers defaults to 1)",
            NORMED_CHAIN,
            default_modules=1,
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/qwen3_next_mtp.py (the same drafting math)",
            NORMED_CHAIN,
            default_modules=1,
            multi_module_field="num_nextn_predict_layers",
            fails_on_missing=False,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/qwen3_next_mtp.py (Qwen3NextForCausalLMMTP: fc + pre-fc norms, a one-layer "
            "Qwen3NextModel whose norm output is drafted and recycled; no position-0 zeroing)",
            NORMED_CHAIN,
            builds=1,
            multi_module=False,
        ),
    )

    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        declared = getattr(hf_config, self.depth_field, None)
        mtp = MTPConfig(num_layers=1 if declared is None else int(declared)).with_overrides(**overrides)
        if mtp.num_physical_layers > 1:
            raise ConfigError(
                f"mtp.num_layers={mtp.num_layers}: {self.title}'s MTP layers share one fc and its norms "
                f"({self.mtp_root}fc, {self.mtp_root}pre_fc_norm_*, {self.mtp_root}norm), so this project trains one "
                "physical depth: set mtp.use_repeated_layer=true (the engines draft every step with one module)"
            )
        return mtp

    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        # The published config.json leaves D out (1, the engines' default): it stays as it was unless it says more.
        if self.depth_field in config_json or mtp.num_physical_layers != 1:
            set_fields(config_json, {self.depth_field: mtp.num_physical_layers})

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        # The text causal LM (of a VL config: its language model).
        backbone = super().build_backbone(self.text_config(hf_config))
        for module in backbone.modules():
            if type(module) is self.deltanet:
                hf_compat.swap_class(module, self.packed_deltanet)
        return backbone

    def packing_kwargs(self, seq_idx: torch.Tensor | None) -> dict[str, Any]:
        # The boundary-aware linear-attention layers read seq_idx from the forward kwargs.
        return {} if seq_idx is None else {"seq_idx": seq_idx}

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        # The decoder layer reads its attention type at layer_idx: layer 0 of a copy whose only layer is full
        # attention, its MLP chosen by the backbone's rule for layer 0 (as vLLM builds mtp.layers.0).
        block = self.decoder_layer(sub_config(hf_config, layer_types=["full_attention"]), layer_idx=0)
        norm = functools.partial(self.rms_norm, hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        return MTPDepth.with_norms(hf_config.hidden_size, norm, [block])

    def block_kind(self, block: nn.Module) -> Any:
        return (block.block_type, type(block.mlp))

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        root = self.mtp_root
        return [
            ("enorm.", f"{root}pre_fc_norm_embedding."),
            ("hnorm.", f"{root}pre_fc_norm_hidden."),
            ("eh_proj.", f"{root}fc."),
            ("blocks.0.", f"{root}layers.{index}."),
            ("final_norm.", f"{root}norm."),
        ]


register(Qwen3Next())
