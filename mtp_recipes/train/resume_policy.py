"""What a resume may change: the data position must be the checkpoint's, the optimizer settings are the
config's (each change said in one line), and the schedules follow from the step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from mtp_recipes.checkpoint.resume import load_resume, read_trainer_state
from mtp_recipes.distributed.mesh import World
from mtp_recipes.errors import ConfigError
from mtp_recipes.train.schedules import learning_rate

log = logging.getLogger("mtp_recipes")

# Data settings that fix the packed rows and their order: a resume must see the same ones.
DATA_POSITION_FIELDS = (
    "source", "split", "format", "text_field", "messages_field", "text_sample_by", "max_documents",
    "seq_len", "packing", "packing_buffer", "shuffle", "seed", "eval_fraction", "eval_source", "eval_split",
)  # fmt: skip
OPTIM_FIELDS = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "min_lr_ratio")


def data_position(cfg: DictConfig, packed_rows: int, world_size: int) -> dict[str, Any]:
    """What fixes the order of the batches: data settings, packed rows, ranks and batch split."""
    d, t = cfg.data, cfg.trainer
    return {
        **{f"data.{k}": d[k] for k in DATA_POSITION_FIELDS},
        "packed rows": packed_rows,
        "world size": world_size,
        "data.batch_size": d.batch_size,
        "trainer.grad_accum_steps": t.grad_accum_steps,
    }


def check_data_position(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """One ConfigError line naming every setting that moved the data position since ``path`` was written."""
    old = saved.get("data_position")
    if old is None:  # written before checkpoints recorded it
        return
    diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in now.items() if old.get(k) != v]
    if diffs:
        raise ConfigError(
            f"cannot resume {path}: {'; '.join(diffs)}; the data position would not carry over: resume with "
            "the checkpoint's settings, or start afresh (trainer.overwrite=true or another hydra.run.dir)"
        )


def optim_settings(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer settings a resume checkpoint records (JSON values)."""
    o = cfg.optim
    return {k: list(o[k]) if k == "betas" else o[k] for k in OPTIM_FIELDS}


def changed_settings(saved: dict[str, Any], cfg: DictConfig) -> list[str]:
    """``optim.*`` and ``trainer.max_steps`` changes since the checkpoint, one ``"key old -> new"`` each: they
    apply from the resumed step on."""
    old, now = saved.get("optim", {}), optim_settings(cfg)
    changed = [f"optim.{k} {old[k]} -> {now[k]}" for k in now if k in old and old[k] != now[k]]
    max_steps = cfg.trainer.max_steps
    if saved.get("max_steps", max_steps) != max_steps:
        changed.append(f"trainer.max_steps {saved['max_steps']} -> {max_steps}")
    return changed


def resume_from(
    path: Path, cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, world: World
) -> int:
    """Load the resume checkpoint ``path`` into model, optimizer, data position and RNG; return its step.

    The data position must be the checkpoint's; the optimizer settings and the schedules are this config's,
    applied from the resumed step on, each change said in one warning line.
    """
    check_data_position(read_trainer_state(path), data_position(cfg, len(data.dataset), world.world_size), path)
    state = load_resume(path, model, optimizer, world)
    if "export_source" in state:
        model.provenance.restore_export_json(state["export_source"])
    else:  # written before checkpoints recorded it
        log.warning("resume: %s does not record the source's on-disk dtypes; exports use the config's", path)
    step = state["step"]
    data.load_state_dict(state["data"])
    o = cfg.optim
    for group in optimizer.param_groups:
        group.update(lr=learning_rate(cfg, step), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    log.info("resumed from %s at step %d", path, step)
    changed = changed_settings(state, cfg)
    if changed:
        log.warning("resume: %s since the checkpoint; applied from step %d on", ", ".join(changed), step + 1)
    return step
