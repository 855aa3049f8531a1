"""Losses: chunked linear cross-entropy, the main next-token loss and the MTP loss."""

from mtp_recipes.loss.linear_ce import linear_cross_entropy
from mtp_recipes.loss.mtp import (
    AcceptanceStats,
    MTPLossOutput,
    acceptance_stats,
    main_loss,
    mtp_loss,
)

__all__ = [
    "AcceptanceStats",
    "MTPLossOutput",
    "acceptance_stats",
    "linear_cross_entropy",
    "main_loss",
    "mtp_loss",
]
