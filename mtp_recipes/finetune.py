"""``python -m mtp_recipes.finetune [--config-name RECIPE] [key=value ...]``: run a fine-tuning recipe.

Configs live in ``configs/`` (shipped inside the package as ``mtp_recipes/configs``), so the command
works from any directory. Errors caused by input print one line and exit with status 2; the config is
checked before torch and transformers load, so a bad value is reported within a second or two. In a
multirun sweep a job with a bad value is reported in one line and the other jobs still run (exit status
2 at the end). During training the first Ctrl-C stops at the next step boundary with a resume checkpoint
(see ``recipe.py``); a second one, or one before training starts, aborts at once with one line and exit
status 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mtp_recipes.command_line import check_command_line, discard_unused_run_dir
from mtp_recipes.config import CONFIG_DIR, to_schema
from mtp_recipes.errors import MTPRecipesError
from mtp_recipes.input_checks import check_inputs

_failed_jobs: list[str] = []


class RunDirCheck(Callback):
    """Refuse, in one line, a run (or sweep) directory that cannot be created or written.

    Hydra creates the directory itself and would otherwise fail with a traceback (a file in the way, no
    permission). Registered in ``configs/finetune.yaml`` under ``hydra.callbacks``.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _check_writable(directory: Path, key: str) -> None:
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    try:
        if blocker is not None:
            raise NotADirectoryError(f"{blocker} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        print(f"error: {key}={directory} cannot be used ({reason}); set {key} to a writable directory", file=sys.stderr)
        sys.exit(2)


class _CtrlC:
    """Ctrl-C before training starts: remember it, then raise KeyboardInterrupt as Python would.

    Libraries may turn the KeyboardInterrupt into another error (an import interrupted inside transformers'
    lazy loader becomes ModuleNotFoundError), so the flag, not the exception type, says it was Ctrl-C. While
    torch and transformers import (:meth:`deferred`) it is only remembered: a KeyboardInterrupt inside torch's
    extension loading aborted the process (SIGABRT and a stack dump, observed), not one line.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.deferring = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.pressed = True
        if not self.deferring:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Remember a Ctrl-C inside the block; raise it as KeyboardInterrupt once the block is done."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pressed:
            raise KeyboardInterrupt

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")
def main(cfg: DictConfig) -> None:
    logging.getLogger("mtp_recipes").setLevel(logging.INFO)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    ctrl_c = _CtrlC()
    try:
        schema = to_schema(cfg)
        check_inputs(schema)
        with ctrl_c.deferred():  # torch and transformers load only for a valid config
            from mtp_recipes.recipe import FinetuneRecipe

        interrupted = FinetuneRecipe(schema, run_dir).run()
    except MTPRecipesError as e:
        discard_unused_run_dir(run_dir, "finetune")
        if not multirun:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        job = f"job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname})"
        print(f"error: {job}: {e}", file=sys.stderr)
        _failed_jobs.append(job)
        return
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or ctrl_c.pressed):
            raise
        discard_unused_run_dir(run_dir, "finetune")
        print(
            "error: interrupted (Ctrl-C): stopped at once, without a checkpoint of the current step; continue from "
            f"the newest one in {run_dir / 'resume'} (if any) with trainer.resume=auto",
            file=sys.stderr,
        )
        # Not sys.exit: CPython re-sends SIGINT to itself at exit when it saw a KeyboardInterrupt leave code
        # that C evaluated, even one caught since (observed: an import interrupted midway, status -2).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        ctrl_c.restore()
    if interrupted and multirun:
        print(f"sweep stopped after job {hydra_cfg.job.num} (interrupted)", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    check_command_line(sys.argv[1:], "finetune", "finetune")
    main()
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} sweep job(s) failed: {', '.join(_failed_jobs)}", file=sys.stderr)
        sys.exit(2)
