"""Exact-resume checkpoints: model, optimizer, schedule, step, data position and RNG states.

Model and optimizer go through ``torch.distributed.checkpoint`` (each rank writes its own shards; the
same code serves one process and N). Small state is JSON (no pickle). A checkpoint is written into a
hidden temporary directory and renamed to ``step_NNNNNN`` only when every rank has finished, so a kill
during the write leaves the previous checkpoint as the newest complete one. Resuming takes the newest
checkpoint that is complete *and readable* (every file its metadata names present at full length, the
JSON state parseable), warning about each newer one it skips.
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
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from mtp_recipes.checkpoint.atomic import free_mb, is_disk_full
from mtp_recipes.distributed.mesh import World, barrier, broadcast_object
from mtp_recipes.errors import CheckpointError

TRAINER_STATE = "trainer_state.json"
METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shard files
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
    """Write ``root/step_{step}`` atomically on every rank; keep the newest ``keep`` checkpoints.

    A full disk removes the partial checkpoint and raises one line saying how much space to free.
    """
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        with _quiet_single_process(world):
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        (tmp / f"rng_rank{world.rank}.json").write_text(json.dumps(_rng_state()))
        if world.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
    except BaseException as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_disk_full(e):
            need = _state_bytes([model_state, optim_state]) * world.world_size // 2**20 + 1
            free = free_mb(root)
            previous = latest_resume(root, quiet=True) if world.is_main else None
            raise CheckpointError(
                f"no space left on device: free {max(need - free, 1)} MB under {root} (a resume checkpoint takes "
                f"about {need} MB, {free} MB are free); the partial checkpoint was removed, "
                + (f"{previous} is kept" if previous else "no earlier one exists")
            ) from None
        raise
    barrier(world)
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _by_step(root.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def remove_unfinished(root: Path) -> list[Path]:
    """Delete the temporary directories of checkpoint writes that never finished (a killed run's)."""
    stale = sorted(root.glob(".step_*.tmp"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or ``None`` when it is complete and readable.

    Complete means: ``trainer_state.json`` parses and holds the step, torch.distributed.checkpoint's
    metadata parses, every shard file it names is there at full length, and each rank's RNG file parses.
    """
    if not path.is_dir():
        return f"{path} is not a directory"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError) as e:  # a JSON or UTF-8 decoding error is a ValueError
        return f"{TRAINER_STATE} is unreadable ({str(e).splitlines()[0]})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{TRAINER_STATE} holds no step"
    if not (path / METADATA).is_file():
        return f"no {METADATA} file"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged file can fail to unpickle in many ways
        return f"{METADATA} is unreadable ({type(e).__name__})"
    for info in metadata.storage_data.values():
        file = path / info.relative_path
        if not file.is_file():
            return f"{info.relative_path} is missing"
        if file.stat().st_size < info.offset + info.length:
            return f"{info.relative_path} is truncated ({file.stat().st_size} of {info.offset + info.length} bytes)"
    for rng in sorted(path.glob("rng_rank*.json")):
        try:
            json.loads(rng.read_text())
        except (OSError, ValueError):
            return f"{rng.name} is unreadable"
    return None


def latest_resume(root: Path, quiet: bool = False) -> Path | None:
    """The newest complete and readable checkpoint under ``root``; each newer one skipped is warned about.

    Temporary directories are hidden and never picked.
    """
    for path in reversed(_by_step(root.glob("step_*"))):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if not quiet:
            logger.warning("skipping resume checkpoint %s: %s", path, problem)
    return None


def find_resume(setting: str | None, root: Path, world: World) -> Path | None:
    """Resolve ``trainer.resume`` (null | auto | a path) to a checkpoint directory, the same on every rank."""
    if setting is None:
        return None
    path, problem = None, None
    if world.is_main:
        path = latest_resume(root) if setting == "auto" else Path(setting)
        problem = checkpoint_problem(path) if setting != "auto" else None
    path, problem = broadcast_object((path, problem), world)
    if problem is not None:
        raise CheckpointError(f"trainer.resume={setting} cannot be used: {problem}; point it at a complete checkpoint")
    if path is None:
        logger.warning(
            "trainer.resume=auto: no complete checkpoint under %s; starting from step 0 "
            "(set hydra.run.dir to the run to continue)",
            root,
        )
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (step, schedule, data position, the run's settings)."""
    return json.loads((path / TRAINER_STATE).read_text())


def _by_step(paths: Any) -> list[Path]:
    """``step_N`` directories in step order (a name sort breaks past 999999 steps)."""
    return sorted((p for p in paths if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def _state_bytes(states: list[Any]) -> int:
    """Bytes of this rank's tensors in nested state dicts (a sharded tensor counts its local shard)."""
    total, stack = 0, list(states)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, (list, tuple)):
            stack += list(item)
        elif isinstance(item, torch.Tensor):
            local = item.to_local() if isinstance(item, DTensor) else item
            total += local.numel() * local.element_size()
    return total


def load_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; return the trainer state (step, schedule, data position)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with _quiet_single_process(world):
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as e:  # damaged shards and a changed model fail in many ways
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"resume checkpoint {path} could not be loaded ({type(e).__name__}: {reason}); it does not match "
            "this model, or it is damaged: delete it to resume from the one before"
        ) from None
    rng = path / f"rng_rank{world.rank}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return read_trainer_state(path)
