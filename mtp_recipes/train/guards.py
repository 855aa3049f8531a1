"""What stops a training step before the optimizer applies it."""

from __future__ import annotations

import math
from pathlib import Path

from mtp_recipes.errors import TrainingError


def non_finite_error(record: dict[str, float], step: int, last_checkpoint: Path | None) -> TrainingError | None:
    """``None`` when step ``step``'s loss and gradient norm are finite; else the one-line error naming what is
    not, how to go on, and the last good checkpoint."""
    if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
        return None
    kept = last_checkpoint or "none written yet"
    if not math.isfinite(record["loss"]):
        mtp = [round(v, 4) for k, v in record.items() if k.startswith("mtp_ce_")]
        return TrainingError(
            f"non-finite loss at step {step} (main CE {record['main_ce']:.4g}, MTP CE {mtp}): "
            f"lower optim.lr or check the data; last good checkpoint: {kept}"
        )
    return TrainingError(
        f"non-finite gradient norm at step {step} (loss {record['loss']:.4g} is finite); nothing was "
        "applied: lower optim.lr, check the data, or train in fp32 (trainer.precision=fp32); "
        f"last good checkpoint: {kept}"
    )
