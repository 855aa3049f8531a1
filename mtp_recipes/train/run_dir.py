"""A run directory's safety rules: one directory for every rank, unfinished writes undone, and no run silently
overwriting another's outputs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mtp_recipes.checkpoint.atomic import recover_interrupted_writes
from mtp_recipes.checkpoint.resume import find_resume, read_trainer_state, remove_unfinished
from mtp_recipes.distributed.mesh import World, barrier, broadcast_object
from mtp_recipes.errors import ConfigError

log = logging.getLogger("mtp_recipes")

# What a run writes into its directory; a directory holding any of them holds a previous run.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "final", "checkpoints", "resume")


def share_run_dir(run_dir: Path, world: World) -> Path:
    """Rank 0's run directory for every rank (Hydra gives each process its own timestamp), created."""
    shared = Path(broadcast_object(str(run_dir), world))
    if run_dir != shared and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    shared.mkdir(parents=True, exist_ok=True)
    return shared


def prepare_run_dir(run_dir: Path, trainer: DictConfig, world: World) -> Path | None:
    """Undo unfinished writes, pick the resume checkpoint, and refuse to clobber a previous run.

    Returns the checkpoint to resume from (or None). Rank 0 decides; every rank raises the same error.
    """
    if world.is_main:
        undone = recover_interrupted_writes(run_dir) + recover_interrupted_writes(run_dir / "checkpoints")
        undone += [f"removed the unfinished write {p}" for p in remove_unfinished(run_dir / "resume")]
        for line in undone:
            log.warning("%s (left by an interrupted run)", line)
    barrier(world)
    resume = find_resume(trainer.resume, run_dir / "resume", world)
    error = refuse_clobbering(run_dir, trainer, resume) if world.is_main else None
    error = broadcast_object(error, world)
    if error is not None:
        raise ConfigError(error)
    return resume


def refuse_clobbering(run_dir: Path, trainer: DictConfig, resume: Path | None) -> str | None:
    """Why a run must not start in ``run_dir``, or None (after ``trainer.overwrite`` cleared it)."""
    previous = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not previous:
        return None
    if trainer.overwrite:
        for name in previous:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log.warning("trainer.overwrite=true: deleted the previous run's %s in %s", ", ".join(previous), run_dir)
        return None
    final = run_dir / "final"
    if resume is not None:
        step = read_trainer_state(resume)["step"]
        if step > trainer.max_steps or (step == trainer.max_steps and final.exists()):
            return (
                f"trainer.max_steps={trainer.max_steps} but {resume} is at step {step}: nothing to train, "
                f"{final} is left as it is; raise trainer.max_steps to train on"
            )
        return None
    if trainer.resume == "auto":
        if final.exists():
            return (
                f"trainer.resume=auto: {run_dir} holds a finished run (final/) and no resume checkpoint to "
                "continue from; set trainer.overwrite=true to run it again, or choose another hydra.run.dir"
            )
        return None  # killed before its first checkpoint: it starts again from step 0
    return (
        f"{run_dir} already holds a run ({', '.join(previous)}): continue it with trainer.resume=auto, "
        "start afresh with trainer.overwrite=true (deletes it), or choose another hydra.run.dir"
    )
