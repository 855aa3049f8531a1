"""Step-3.5 (model_type ``step3p5``, transformers package ``step3p7``): sliding/full GQA attention with
head-wise gates, (1 + w) RMSNorms, MoE with a shared expert, D MTP layers with their own output heads.

The causal LM is :class:`Step3p5TextForCausalLM` (transformers ships the text model and the VL model
only), loading and saving the published names through transformers' ``step3p7`` conversions. Depth d is
decoder layer ``model.layers.{N+d}`` with a dense MLP and attention type ``mtp_layer_types[d]``; its
fusion sits beside the block's keys, its head under ``.transformer.shared_head.{norm,output}``. Each depth
takes its own per-layer entries (rope, SwiGLU limits) from the source config.json's lists, which
transformers trims (:class:`SourceLists`). docs/decisions.md records the key layout and the fallbacks.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.models.step3p7 import Step3p7TextConfig
from transformers.models.step3p7 import modeling_step3p7 as hf

from mtp_recipes import hf_compat
from mtp_recipes.engines import Conventions, EngineRule, ServingLimit, at_most
from mtp_recipes.errors import ConfigError
from mtp_recipes.families.base import (
    Family,
    KeyPrefixes,
    ignore_trailing_layers,
    num_nextn_layers,
    packed_mask,
    register,
    set_fields,
    sub_config,
)
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import BlockRunner, MTPDepth


class Step3p5TextForCausalLM(hf.Step3p7PreTrainedModel, GenerationMixin):
    """transformers' Step-3.5 text model + ``lm_head``: the text-only causal LM transformers lacks."""

    config: Step3p7TextConfig
    input_modalities = ("text",)

    def __init__(self, config: Step3p7TextConfig) -> None:
        super().__init__(config)
        self.model = hf.Step3p7TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        """The text model, then ``lm_head`` on the last ``logits_to_keep`` positions (0: all), as ``generate`` needs."""
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return hf_compat.causal_lm_output(self.lm_head(hidden), outputs)


hf_compat.declare_tied_weights(Step3p5TextForCausalLM, {"lm_head.weight": "model.embed_tokens.weight"})


def _text_conversions() -> list:
    """transformers' ``step3p7`` conversions without the renames that move text/vision under the VL model."""
    nested = ("language_model", "vision_model", "multi_modal_projector")
    return [
        t
        for t in hf_compat.checkpoint_conversions("step3p7")
        if not (isinstance(t, hf_compat.WeightRenaming) and any(n in str(t.target_patterns) for n in nested))
    ]


hf_compat.register_checkpoint_conversions(Step3p5TextForCausalLM.__name__, _text_conversions())


def _gate_without_flag(text_config: dict[str, Any], key: str) -> str | None:
    """vLLM builds the attention gate ``g_proj`` only when the config says ``use_head_wise_attn_gate: true``
    (transformers' field is ``gating``) and skips the tensor otherwise."""
    if key.endswith(".g_proj.weight") and not text_config.get("use_head_wise_attn_gate"):
        return "the config has no use_head_wise_attn_gate: true, so vLLM builds no g_proj and skips it"
    return None


def _sglang_layer_45(text_config: dict[str, Any], modules: int) -> str | None:
    """SGLang builds its one MTP block with the per-layer entries (rope, SwiGLU limits) of layer 45."""
    layers = text_config.get("num_hidden_layers")
    if layers != 45:
        return f"num_hidden_layers={layers}: SGLang builds the MTP block with layer 45's per-layer entries"
    return None


_PRE_NORM = Conventions(h0="pre_norm", passes_on="pre_norm", zero_first_embedding=False)


class Step3p5(Family):
    name = "step3p5"
    model_types = ("step3p5",)
    head = "per_depth"
    # Both engines feed depth 1 the backbone state before model.norm and recycle the block output before
    # shared_head.norm.
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/step3p5_mtp.py (Step3p5AMultiTokenPredictor: layers N .. N+n-1, module "
            "step % n; load_weights: '.transformer.' stripped, shared_head.output -> head), "
            "vllm/model_executor/models/step3p5.py (g_proj only with use_head_wise_attn_gate)",
            _PRE_NORM,
            skipped=_gate_without_flag,
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/step3p5_mtp.py (load_weights: is_mtp_completeness_check_enabled), "
            "vllm/model_executor/models/step3p5.py",
            _PRE_NORM,
            multi_module_field="num_nextn_predict_layers",
            skipped=_gate_without_flag,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/step3p5_mtp.py (Step3p5AMultiTokenPredictor: one block, layer_id = 45, reused "
            "every step; hidden_states_before_norm recycled; load_weights raises on a missing parameter)",
            _PRE_NORM,
            multi_module=False,
            config_rules=(
                at_most("num_nextn_predict_layers", 1, "SGLang builds one Step-3.5 MTP block"),
                _sglang_layer_45,
            ),
        ),
    )

    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        mtp = MTPConfig(num_layers=num_nextn_layers(hf_config)).with_overrides(**overrides)
        if source is None:
            return mtp
        # The per-layer lists give each depth its own entries and are resized on export.
        return replace(mtp, family_options={**mtp.family_options, _LISTS: SourceLists.of(hf_config, source)})

    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        # transformers builds every attention's per-head gate g_proj (gating true or "per-head", its default);
        # vLLM builds and loads g_proj only when the config says use_head_wise_attn_gate: true.
        per_head = config_json.get("gating", True) in (True, "per-head")
        fields: dict[str, Any] = {"num_nextn_predict_layers": mtp.num_physical_layers}
        fields["use_head_wise_attn_gate"] = per_head
        lists = mtp.family_options.get(_LISTS)
        if lists is not None:
            fields.update(lists.resized(mtp.num_physical_layers))
        set_fields(config_json, fields)

    def serving_limits(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> list[ServingLimit]:
        # SGLang builds one MTP block, with the per-layer entries (rope, SwiGLU limits) of layer 45 (the
        # first MTP layer of Step-3.5-Flash), and reuses it for every draft step.
        if hf_config.num_hidden_layers != 45 or mtp.num_physical_layers > 1:
            line = (
                "SGLang builds one Step-3.5 MTP block with layer 45's per-layer config entries and reuses it "
                f"for every draft step; this layout has {hf_config.num_hidden_layers} backbone layers and "
                f"{mtp.num_physical_layers} physical MTP depth(s)"
            )
            return [ServingLimit(("sglang",), line)]
        return []

    def build_backbone(self, hf_config: PretrainedConfig) -> PreTrainedModel:
        backbone = Step3p5TextForCausalLM(hf_config)
        ignore_trailing_layers(backbone, hf_config.num_hidden_layers)
        return backbone

    @staticmethod
    def attention_type(hf_config: PretrainedConfig, index: int) -> str:
        """``mtp_layer_types[index]``; depths beyond the list (a larger D than the checkpoint's) reuse the last."""
        types = hf_config.mtp_layer_types or ["full_attention"]
        return types[min(index, len(types) - 1)]

    @classmethod
    def layer_entries(cls, hf_config: PretrainedConfig, index: int, source: SourceLists | None) -> dict[str, Any]:
        """The per-layer config values of physical depth ``index`` (layer N+index; see docs/families.md).

        Entry N+index of each source list with N+D entries; else the last backbone layer of the same
        attention type (``source`` is None when the config was not read from a dict).
        """
        n, d_src = hf_config.num_hidden_layers, num_nextn_layers(hf_config)
        raw = source.lists if source is not None else {}
        kind = cls.attention_type(hf_config, index)
        donor = next((i for i in reversed(range(n)) if hf_config.layer_types[i] == kind), None)
        rope = (hf_config.rope_parameters or {}).get(kind) or {}

        def pick(field: str, default: Any) -> Any:
            value = raw.get(field, default)
            if not isinstance(value, list):
                return value
            if d_src and len(value) == n + d_src:
                return value[n + min(index, d_src - 1)]
            return value[donor] if donor is not None and len(value) >= n else None

        return {
            "layer_type": kind,
            "swiglu_limit": pick("swiglu_limits", hf_config.swiglu_limits),
            "swiglu_limit_shared": pick("swiglu_limits_shared", hf_config.swiglu_limits_shared),
            "rope_theta": pick("rope_theta", rope.get("rope_theta")),
            "partial_rotary_factor": pick("partial_rotary_factors", rope.get("partial_rotary_factor")),
        }

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        # Step3p7DecoderLayer reads its attention type, MLP type, clamps and head count at layer_idx, so
        # the block is built as layer 0 of a one-layer copy of the config holding the MTP entries; its
        # rope (the backbone's of that type with this layer's theta and partial factor) rides on that copy.
        entries = self.layer_entries(hf_config, index, mtp.family_options.get(_LISTS))
        kind = entries["layer_type"]
        rope = dict((hf_config.rope_parameters or {}).get(kind) or {"rope_type": "default"})
        if entries["rope_theta"] is not None:
            rope["rope_theta"] = entries["rope_theta"]
        if entries["partial_rotary_factor"] is not None:
            rope["partial_rotary_factor"] = entries["partial_rotary_factor"]
        cfg = sub_config(
            hf_config,
            layer_types=[kind],
            mlp_layer_types=["dense"],
            swiglu_limits=[entries["swiglu_limit"]],
            swiglu_limits_shared=[entries["swiglu_limit_shared"]],
            rope_parameters={kind: rope},
        )
        # Sliding layers may have more heads (``num_sliding_attention_heads``); full ones use the default.
        sliding = kind == "sliding_attention"
        cfg.per_layer_config = {0: {"num_attention_heads": hf_config.num_sliding_attention_heads}} if sliding else {}
        block = hf.Step3p7DecoderLayer(cfg, layer_idx=0)

        norm = functools.partial(hf.Step3p7RMSNorm, hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        return MTPDepth.with_norms(hf_config.hidden_size, norm, [block], head)

    def block_runner(
        self,
        backbone: PreTrainedModel,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        seq_idx: torch.Tensor | None,
    ) -> BlockRunner:
        # The masks and per-type (cos, sin) Step3p7TextModel.forward builds, for the unrolled positions.
        decoder = backbone.get_decoder()
        backbone_rotary = hf_compat.rotary_embedding(decoder)
        masks = {
            "full_attention": packed_mask(backbone.config, hidden, position_ids),
            "sliding_attention": packed_mask(backbone.config, hidden, position_ids, "sliding"),
        }
        rotary: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

        def position_embeddings(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            # The block's own rope (its one-layer config, see build_depth); the backbone's table when equal.
            kind, cfg = block.attention_type, block.self_attn.config
            params = cfg.rope_parameters.get(kind) or {}
            key = (kind, json.dumps(params, sort_keys=True, default=str))
            if key not in rotary:
                backbone_kinds = hf_compat.rotary_layer_types(backbone_rotary)
                if params == decoder.config.rope_parameters.get(kind) and kind in backbone_kinds:
                    rotary[key] = hf_compat.rotary_cos_sin(backbone_rotary, hidden, position_ids, kind)
                elif params.get("rope_theta") is None:
                    raise ConfigError(
                        f"MTP layer type {kind!r} has no rope parameters: the backbone has only "
                        f"{sorted(backbone_kinds)} layers and the config no per-layer rope_theta"
                    )
                else:
                    own = hf.Step3p7RotaryEmbedding(cfg, device=hidden.device)
                    rotary[key] = hf_compat.rotary_cos_sin(own, hidden, position_ids, kind)
            return rotary[key]

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            kind = block.attention_type
            return block(
                x, attention_mask=masks[kind], position_ids=position_ids, position_embeddings=position_embeddings(block)
            )

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


_LISTS = "step3p5_source_lists"
# config.json lists with one entry per decoder layer that hub configs pad with the MTP layers' entries.
_PER_LAYER = (
    "layer_types",
    "mlp_layer_types",
    "swiglu_limits",
    "swiglu_limits_shared",
    "rope_theta",
    "partial_rotary_factors",
)
# Lists transformers writes itself (a from-scratch export), one entry per MTP layer.
_PER_MTP_LAYER = ("mtp_layer_types", "mtp_mlp_layer_types")


class SourceLists:
    """The per-layer lists of the config.json a config was read from (transformers trims or drops them)."""

    def __init__(self, n: int, d_src: int, lists: dict[str, Any]) -> None:
        self.n, self.d_src, self.lists = n, d_src, lists

    @classmethod
    def of(cls, hf_config: PretrainedConfig, source: dict[str, Any]) -> SourceLists:
        lists = {k: source[k] for k in (*_PER_LAYER, *_PER_MTP_LAYER) if k in source}
        return cls(hf_config.num_hidden_layers, num_nextn_layers(hf_config), lists)

    def padded(self) -> dict[str, list]:
        """The lists that carry MTP entries: N + D entries per layer, or D entries for ``mtp_*`` lists."""
        n, d = self.n, self.d_src
        return {
            k: v
            for k, v in self.lists.items()
            if isinstance(v, list) and len(v) == (n + d if k in _PER_LAYER else d) and d
        }

    def resized(self, d: int) -> dict[str, list]:
        """Each padded list for ``d`` depths (unchanged when ``d`` is the source's): depth k keeps its own
        entry, and depths beyond the source's D repeat the last one, as :meth:`Step3p5.layer_entries` does."""
        if d == self.d_src:
            return {}
        out = {}
        for key, value in self.padded().items():
            head, tail = (value[: self.n], value[self.n :]) if key in _PER_LAYER else ([], value)
            out[key] = head + [tail[min(k, self.d_src - 1)] for k in range(d)]
        return out

    def __repr__(self) -> str:  # MTPConfig is logged: keep it short
        return f"SourceLists(N={self.n}, D={self.d_src}, {sorted(self.lists)})"


register(Step3p5())
