"""What a model is built from: the transformers config of a config.json dict (never remote code) and the MTP
settings its family reads from it, with the user's overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import CONFIG_MAPPING, PretrainedConfig

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.hf import read_config_dict
from mtp_recipes.errors import ConfigError
from mtp_recipes.families import Family, get_family, registered_model_types
from mtp_recipes.mtp.config import MTPConfig


def config_from_dict(raw: dict[str, Any]) -> PretrainedConfig:
    """A transformers config from a config.json dict, without remote code."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(
            f"the model config has no model_type; set model.config.model_type to one of {registered_model_types()}"
        )
    raw = get_family(model_type).read_config(raw)
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(hf_compat.decode_special_floats(raw))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {model_type} config: {str(e).splitlines()[0]}") from None
    return config


def checkpoint_text_config(model_dir: Path) -> PretrainedConfig:
    """The language model's config of a checkpoint directory, read from config.json without loading weights."""
    hf_config = config_from_dict(read_config_dict(model_dir))
    return get_family(hf_config.model_type).text_config(hf_config)


def family_mtp_config(
    family: Family, hf_config: PretrainedConfig, source: dict[str, Any] | None, overrides: dict[str, Any]
) -> MTPConfig:
    """The MTP settings: the family's reading of the config, the user's overrides, and what the family
    needs from the config.json dict ``source`` that transformers' config object no longer holds."""
    if overrides.get("block_types") is not None and not family.configurable_blocks:
        raise ConfigError(
            f"mtp.block_types={overrides['block_types']!r}: {family.name} MTP depths have one fixed layout; "
            "leave mtp.block_types null"
        )
    return family.mtp_config(family.text_config(hf_config), source, **overrides)
