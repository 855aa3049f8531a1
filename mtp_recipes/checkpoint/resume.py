"""Exact-resume checkpoints: model, optimizer, schedule, step, data position and RNG states.

Model and optimizer go through ``torch.distributed.checkpoint`` (each rank writes its own shards; the
same code serves one process and N). Small state is JSON (no pickle). A checkpoint is written into a
hidden temporary directory and renamed to ``step_NNNNNN`` only when every rank has finished, so a kill
during the write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mtp_recipes.distributed.mesh import World, barrier, broadcast_object
from mtp_recipes.errors import CheckpointError

TRAINER_STATE = "trainer_state.json"
logger = logging.getLogger(__name__)


@contextmanager
def _quiet_single_process(world: World):
    """DCP warns that it assumes one process when there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        if not world.distributed:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_resume(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    world: World,
    keep: int,
) -> Path:
    """Write ``root/step_{step}`` atomically on every rank; keep the newest ``keep`` checkpoints."""
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process(world):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    (tmp / f"rng_rank{world.rank}.json").write_text(json.dumps(_rng_state()))
    if world.is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
    barrier(world)
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def latest_resume(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temporary directories are hidden, never picked)."""
    done = sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).exists())
    return done[-1] if done else None


def find_resume(setting: str | None, root: Path, world: World) -> Path | None:
    """Resolve ``trainer.resume`` (null | auto | a path) to a checkpoint directory, the same on every rank."""
    if setting is None:
        return None
    path = latest_resume(root) if setting == "auto" else Path(setting)
    path = broadcast_object(path, world)
    if path is None:
        logger.warning(
            "trainer.resume=auto: no complete checkpoint under %s; starting from step 0 "
            "(set hydra.run.dir to the run to continue)",
            root,
        )
    if path is not None and not (path / TRAINER_STATE).exists():
        raise CheckpointError(f"trainer.resume={setting}: {path} is not a complete resume checkpoint")
    return path


def load_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; return the trainer state (step, schedule, data position)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process(world):
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_rank{world.rank}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return json.loads((path / TRAINER_STATE).read_text())
