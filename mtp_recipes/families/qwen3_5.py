"""Qwen3.5 (transformers ``qwen3_5`` dense and ``qwen3_5_moe``), text part: Gated DeltaNet linear attention with
gated full attention every ``full_attention_interval`` layers, a dense MLP or MoE with a shared expert, MTP layers.

The MTP module is laid out as Qwen3-Next's (:class:`~mtp_recipes.families.qwen3_next.Qwen3Next`, this family's
base): ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.fc``, ``mtp.layers.{i}`` and ``mtp.norm``
at the checkpoint's root, one physical depth; D is ``mtp_num_hidden_layers``, 1 when absent, as vLLM reads it. The
Gated DeltaNet projections are four separate linears (Qwen3-Next fuses them). The backbone is transformers' text
causal LM; the published checkpoints are the VL model's, which nests the decoder under ``model.language_model.``
(the text model's ``model.``), keeps ``lm_head`` and ``mtp`` at the root, and holds the vision tower under
``model.visual.``, copied through verbatim.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as dense
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as moe

from mtp_recipes.checkpoint.nesting import Nesting
from mtp_recipes.engines import NORMED_CHAIN, EngineRule
from mtp_recipes.families.base import register
from mtp_recipes.families.gated_deltanet import PackedForward
from mtp_recipes.families.qwen3_next import Qwen3Next


def separate_inputs(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(mixed_qkv, z, b, a)`` from Qwen3.5's four input projections."""
    batch, length, _ = hidden.shape
    z = layer.in_proj_z(hidden).reshape(batch, length, layer.num_v_heads, layer.head_v_dim)
    return layer.in_proj_qkv(hidden), z, layer.in_proj_b(hidden), layer.in_proj_a(hidden)


class PackedQwen35GatedDeltaNet(PackedForward, dense.Qwen3_5GatedDeltaNet):
    """transformers' Qwen3.5 linear-attention layer (same parameters) with the packed training forward."""

    projections = separate_inputs


class PackedQwen35MoeGatedDeltaNet(PackedForward, moe.Qwen3_5MoeGatedDeltaNet):
    """transformers' Qwen3.5-MoE linear-attention layer (same parameters) with the packed training forward."""

    projections = separate_inputs


class Qwen35(Qwen3Next):
    name = "qwen3_5"
    title = "Qwen3.5"
    model_types = ("qwen3_5", "qwen3_5_text")
    decoder_layer = dense.Qwen3_5DecoderLayer
    rms_norm = dense.Qwen3_5RMSNorm
    deltanet = dense.Qwen3_5GatedDeltaNet
    packed_deltanet = PackedQwen35GatedDeltaNet
    depth_field = "mtp_num_hidden_layers"
    checkpoint_nestings = (Nesting("model.language_model.", "model.", ("lm_head.", "mtp.")),)
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/qwen3_5_mtp.py (Qwen3_5MultiTokenPredictor: mtp_num_hidden_layers layers, "
            "one fc and pre-fc norms, layer step % n, mtp.norm output drafted and recycled; no position-0 zeroing)",
            NORMED_CHAIN,
            modules_field="mtp_num_hidden_layers",
            default_modules=1,
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/qwen3_5_mtp.py (the same drafting math; every step runs layer 0)",
            NORMED_CHAIN,
            modules_field="mtp_num_hidden_layers",
            default_modules=1,
            multi_module=False,
            fails_on_missing=False,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/qwen3_5_mtp.py (fc + pre-fc norms, a one-layer text model whose norm output is "
            "drafted and recycled; no position-0 zeroing)",
            NORMED_CHAIN,
            builds=1,
            multi_module=False,
        ),
    )


class Qwen35Moe(Qwen35):
    name = "qwen3_5_moe"
    title = "Qwen3.5-MoE"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    decoder_layer = moe.Qwen3_5MoeDecoderLayer
    rms_norm = moe.Qwen3_5MoeRMSNorm
    deltanet = moe.Qwen3_5MoeGatedDeltaNet
    packed_deltanet = PackedQwen35MoeGatedDeltaNet


register(Qwen35())
register(Qwen35Moe())
