"""Model families: importing this package registers the built-in ones; :func:`get_family` finds one."""

from __future__ import annotations

import functools
import importlib.metadata

from packaging.version import Version

from mtp_recipes.errors import ConfigError
from mtp_recipes.families import (  # noqa: F401  (they register)
    deepseek_v3,
    deepseek_v32,
    glm4_moe,
    mimo_v2_flash,
    minimax_m3,
    nemotron_h,
    qwen3_5,
    qwen3_next,
    step3p5,
)
from mtp_recipes.families.base import REGISTRY, Family, register


def registered_model_types() -> list[str]:
    return sorted(REGISTRY)


def get_family(model_type: str) -> Family:
    """The family serving ``model_type``; one line lists the supported ones, or names the transformers release
    the family needs when the installed one is older."""
    try:
        family = REGISTRY[model_type]
    except KeyError:
        raise ConfigError(
            f"unknown model family '{model_type}': supported model_type values are "
            f"{registered_model_types()} (set model.config.model_type or use a checkpoint of one of them)"
        ) from None
    installed = _transformers_version()
    if family.min_transformers is not None and installed < Version(family.min_transformers):
        raise ConfigError(
            f"{family.name} ({model_type}) needs transformers>={family.min_transformers}, but {installed} is "
            f"installed: pip install 'transformers>={family.min_transformers}'"
        )
    return family


@functools.cache
def _transformers_version() -> Version:
    return Version(importlib.metadata.version("transformers"))


__all__ = ["Family", "get_family", "register", "registered_model_types"]
