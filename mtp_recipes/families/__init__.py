"""Model families; importing this package registers the built-in ones."""

from mtp_recipes.families import minimax_m3, nemotron_h  # noqa: F401
from mtp_recipes.families.base import Family, get_family, register, registered_model_types

__all__ = ["Family", "get_family", "register", "registered_model_types"]
