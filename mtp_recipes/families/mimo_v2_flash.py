"""MiMo-V2-Flash (transformers ``mimo_v2_flash``): hybrid full / sliding-window GQA attention (sliding layers with
attention sinks and twice the KV heads), value scaling, partial RoPE per layer type, MoE without shared experts,
D MTP modules.

Depth d is stored at ``model.mtp.layers.{d}``: ``enorm``, ``hnorm``, ``eh_proj``, one decoder block (sliding-window
attention with sinks, a dense MLP) whose keys sit directly under that prefix, and ``final_layernorm`` in front of
the shared ``lm_head``. The block is transformers' own ``MiMoV2FlashDecoderLayer`` built as a sliding, dense layer;
the checkpoint names its second norm ``pre_mlp_layernorm`` (transformers' block: ``post_attention_layernorm``).

The published config.json does not declare D; its checkpoint holds three MTP layers, so D defaults to 3 unless the
config says ``num_nextn_predict_layers``. Both engines draft with one module: vLLM 0.34 builds only
``model.mtp.layers.0`` and runs it at every step; SGLang 0.5.23's EAGLE drafter builds one module too. Both feed the
first step the final-normed backbone state, recycle the state after ``final_layernorm`` and keep the embedding at
position 0. They read the hub config's own field names (``hybrid_layer_pattern``, ``swa_*``, ``sliding_window_size``,
``layernorm_epsilon``, ...), which transformers' config does not keep: an export writes them from transformers'
fields where config.json lacks them.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.mimo_v2_flash import MiMoV2FlashConfig
from transformers.models.mimo_v2_flash import modeling_mimo_v2_flash as hf

from mtp_recipes.engines import NORMED_CHAIN, EngineRule, ServingLimit, at_most
from mtp_recipes.errors import ConfigError
from mtp_recipes.families.base import Family, KeyPrefixes, register, set_fields, sub_config
from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import MTPDepth

# MiMo-V2-Flash's published checkpoint holds model.mtp.layers.0-2; its config.json has no field saying so.
PUBLISHED_DEPTHS = 3
SLIDING = "sliding_attention"


class MiMoV2Flash(Family):
    name = "mimo_v2_flash"
    model_types = ("mimo_v2_flash",)
    head = "shared"
    mtp_layer_type = SLIDING  # the MTP block's mask and rotary table are the sliding layers' (default block_runner)
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/mimo_v2_mtp.py (MiMoV2MultiTokenPredictor: one layer, model.mtp.layers.0, "
            "run at every step; final_layernorm output drafted and recycled; no position-0 zeroing), "
            "vllm/config/speculative.py (n_predict = 1 for MiMoV2FlashForCausalLM)",
            NORMED_CHAIN,
            builds=1,
            multi_module=False,
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/mimo_v2_mtp.py (the same as 0.34's), vllm/config/speculative.py",
            NORMED_CHAIN,
            builds=1,
            multi_module=False,
            fails_on_missing=False,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/mimo_v2_nextn.py (MiMoV2ModelNextN: one block; load_weights maps every "
            "model.mtp.layers.N onto it; final_layernorm output recycled by the EAGLE worker), "
            "sglang/srt/configs/model_config.py (num_nextn_predict_layers = 1 for the draft model)",
            NORMED_CHAIN,
            multi_module=False,
            config_rules=(
                at_most(
                    "num_nextn_predict_layers",
                    1,
                    "SGLang's EAGLE drafter reads every model.mtp.layers.N into its one module (the last read wins)",
                ),
            ),
        ),
    )

    def read_config(self, raw: dict[str, Any]) -> dict[str, Any]:
        # transformers >= 5.20 sets sliding_window = sliding_window_size + 1 (the query counted, as SGLang attends);
        # 5.19 reads the published sliding_window (the window without the query) as is.
        if raw.get("sliding_window_size") is None:
            return raw
        return {**raw, "sliding_window": raw["sliding_window_size"] + 1}

    def mtp_config(
        self, hf_config: PretrainedConfig, source: dict[str, Any] | None = None, **overrides: Any
    ) -> MTPConfig:
        if source is not None:
            differ = [
                f"{k}={source[k]} (transformers builds {v})"
                for k, v in hub_fields(hf_config).items()
                if k in source and source[k] != v
            ]
            if differ:
                raise ConfigError(
                    f"config.json's own fields disagree with the model transformers builds from it: "
                    f"{', '.join(differ)}; vLLM and SGLang read the former, so the trained model would not be the "
                    "served one"
                )
        declared = getattr(hf_config, "num_nextn_predict_layers", None)
        depths = PUBLISHED_DEPTHS if declared is None else int(declared)
        return MTPConfig(num_layers=depths).with_overrides(**overrides)

    def write_export_fields(self, config_json: dict[str, Any], mtp: MTPConfig) -> None:
        built = MiMoV2FlashConfig.from_dict(self.read_config(config_json))
        fields = {k: v for k, v in hub_fields(built).items() if k not in config_json}
        # A published config.json says nothing of D (three): it stays as it was unless D changed.
        if "num_nextn_predict_layers" in config_json or mtp.num_physical_layers != PUBLISHED_DEPTHS:
            fields["num_nextn_predict_layers"] = mtp.num_physical_layers
        set_fields(config_json, fields)

    def serving_limits(self, hf_config: PretrainedConfig, mtp: MTPConfig) -> list[ServingLimit]:
        if mtp.num_physical_layers <= 1:
            return []
        line = (
            f"vLLM 0.34 and SGLang 0.5.23 draft MiMo-V2-Flash with one MTP module at every step: vLLM loads "
            f"model.mtp.layers.0 only, SGLang's EAGLE drafter reads all {mtp.num_physical_layers} layers into one "
            "module, and SGLang's --enable-multi-layer-eagle runs layer k at step k but feeds every step the "
            "backbone's state (not the previous depth's); mtp.use_repeated_layer=true trains one module for every step"
        )
        return [ServingLimit(("vllm", "sglang"), line)]

    def build_depth(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> MTPDepth:
        # MiMoV2FlashDecoderLayer reads its attention and MLP type at layer_idx: layer 0 of a copy of the config
        # whose only layer is sliding and dense, as the MTP block is.
        cfg = sub_config(hf_config, layer_types=[SLIDING], mlp_layer_types=["dense"])
        block = hf.MiMoV2FlashDecoderLayer(cfg, layer_idx=0)
        norm = functools.partial(hf.MiMoV2FlashRMSNorm, hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        return MTPDepth.with_norms(hf_config.hidden_size, norm, [block])

    def block_kind(self, block: nn.Module) -> Any:
        return (block.self_attn.layer_type, type(block.mlp))

    def donor_block(self, block: nn.Module, backbone: PreTrainedModel) -> nn.Module | None:
        """No backbone layer is both sliding and dense like the MTP block: its attention (with the norm before it)
        starts from the last sliding layer's, its MLP (with the norm before it) from the last dense layer's."""
        layers = self.backbone_blocks(backbone)
        sliding = next((b for b in reversed(layers) if b.self_attn.layer_type == SLIDING), None)
        dense = next((b for b in reversed(layers) if isinstance(b.mlp, hf.MiMoV2FlashMLP)), None)
        if sliding is None or dense is None:
            return None
        if sliding is dense:
            return sliding
        donor = nn.Module()
        donor.self_attn, donor.input_layernorm = sliding.self_attn, sliding.input_layernorm
        donor.mlp, donor.post_attention_layernorm = dense.mlp, dense.post_attention_layernorm
        return donor

    def key_prefixes(self, hf_config: PretrainedConfig, mtp: MTPConfig, index: int) -> KeyPrefixes:
        base = f"model.mtp.layers.{index}."
        pairs = [(f"{n}.", f"{base}{n}.") for n in ("enorm", "hnorm", "eh_proj")]
        pairs += [
            ("blocks.0.", base),
            ("blocks.0.post_attention_layernorm.", f"{base}pre_mlp_layernorm."),
            ("final_norm.", f"{base}final_layernorm."),
        ]
        return pairs


def hub_fields(cfg: PretrainedConfig) -> dict[str, Any]:
    """The published config.json's own fields, which vLLM and SGLang read, from transformers' config ``cfg`` (built
    from a config.json, so the defaults a config saved by transformers leaves out are filled in).

    transformers doubles the key/value heads of sliding layers, gives them sinks, and attends to ``sliding_window``
    tokens counting the query (the hub's ``sliding_window_size`` plus one).
    """
    full, sliding = cfg.rope_parameters["full_attention"], cfg.rope_parameters[SLIDING]
    return {
        "hybrid_layer_pattern": [int(t == SLIDING) for t in cfg.layer_types],
        "moe_layer_freq": [int(t == "sparse") for t in cfg.mlp_layer_types],
        "layernorm_epsilon": cfg.rms_norm_eps,
        "swa_num_attention_heads": cfg.num_attention_heads,
        "swa_num_key_value_heads": 2 * cfg.num_key_value_heads,
        "swa_head_dim": cfg.head_dim,
        "swa_v_head_dim": cfg.v_head_dim,
        "sliding_window_size": cfg.sliding_window - 1,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "rope_theta": full["rope_theta"],
        "swa_rope_theta": sliding["rope_theta"],
        # transformers' rotary module rotates 0.334 of each head when the rope parameters do not say
        "partial_rotary_factor": sliding.get("partial_rotary_factor", 0.334),
    }


register(MiMoV2Flash())
