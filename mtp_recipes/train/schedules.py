"""The learning rate and λ of each optimizer step, as pure functions of the step and the config.

Nothing here holds state: a resumed run computes the same values from the step it resumes at, whatever the
checkpoint recorded.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig


def lr_factor(step: int, warmup_steps: int, min_lr_ratio: float, max_steps: int) -> float:
    """Linear warmup, then cosine decay reaching ``min_lr_ratio`` on the last step (0-based ``max_steps - 1``)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(cfg: DictConfig, step: int) -> float:
    """``optim.lr`` times the schedule's factor at 0-based ``step`` of ``trainer.max_steps``."""
    o = cfg.optim
    return o.lr * lr_factor(step, o.warmup_steps, o.min_lr_ratio, cfg.trainer.max_steps)


def lambda_at(cfg: DictConfig, step: int) -> float:
    """λ for ``step``: the last ``mtp.loss_scaling_schedule`` entry whose step has been reached, else the base."""
    value = cfg.mtp.loss_scaling_factor
    for entry in sorted(cfg.mtp.loss_scaling_schedule, key=lambda s: s.step):
        if step >= entry.step:
            value = entry.value
    return float(value)
