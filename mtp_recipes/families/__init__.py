"""Model families; importing this package registers the built-in ones."""

from mtp_recipes.families import deepseek_v3, minimax_m3, nemotron_h, step3p5  # noqa: F401
from mtp_recipes.families.base import Family, get_family, register, registered_model_types

__all__ = ["Family", "get_family", "register", "registered_model_types"]
