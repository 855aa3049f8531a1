"""mtp_recipes: fine-tune LLMs with Multi-Token Prediction heads and keep the MTP weights servable."""

from mtp_recipes.model import MTPModel, MTPOutput
from mtp_recipes.mtp.config import MTPConfig

__all__ = ["MTPConfig", "MTPModel", "MTPOutput"]
