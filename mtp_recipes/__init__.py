"""mtp_recipes: fine-tune LLMs with Multi-Token Prediction heads and keep the MTP weights servable.

The public names are imported on first use, so that ``python -m mtp_recipes.finetune`` can check its
config before torch and transformers are loaded (a bad value is reported in about a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtp_recipes.model import MTPModel, MTPOutput
    from mtp_recipes.mtp.config import MTPConfig

_PUBLIC = {"MTPModel": "mtp_recipes.model", "MTPOutput": "mtp_recipes.model", "MTPConfig": "mtp_recipes.mtp.config"}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mtp_recipes' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


__all__ = ["MTPConfig", "MTPModel", "MTPOutput"]
