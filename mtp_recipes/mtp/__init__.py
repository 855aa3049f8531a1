"""The family-independent MTP core: config, boundary-aware roll, depths and stack."""

from mtp_recipes.mtp.config import MTPConfig
from mtp_recipes.mtp.stack import MTPDepth, MTPStack

__all__ = ["MTPConfig", "MTPDepth", "MTPStack"]
