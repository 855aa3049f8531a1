"""mtp_recipes: fine-tune LLMs with Multi-Token Prediction heads and keep the MTP weights servable."""

from mtp_recipes.hf_compat import warn_if_untested_transformers
from mtp_recipes.model import MTPModel, MTPOutput
from mtp_recipes.mtp.config import MTPConfig

warn_if_untested_transformers()

__all__ = ["MTPConfig", "MTPModel", "MTPOutput"]
