"""Rank 0's record of a run: one ``metrics.jsonl`` line per step and per validation, mirrored to Weights & Biases,
the progress bar and the log."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mtp_recipes.distributed.mesh import World
from mtp_recipes.errors import ConfigError
from mtp_recipes.metrics import mfu, peak_flops

log = logging.getLogger("mtp_recipes")


class MetricsLog:
    """Writes the records of the main rank; on the others every method does nothing.

    ``metrics.jsonl`` is opened for appending with every record past ``step`` dropped (a resumed run writes
    them again), and a line cut by a kill counts as past every step.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, step: int, world: World, flops_per_token: float) -> None:
        self.cfg, self.main = cfg, world.is_main
        self.file = _open_metrics(run_dir / "metrics.jsonl", step) if self.main else None
        self.wandb = _start_wandb(cfg, run_dir) if self.main else None
        peak = peak_flops(world.device)
        self.flops_per_token, self.peak_flops = flops_per_token, peak * world.world_size if peak else None
        self.bar: tqdm | None = None
        self.validation_text = ""  # the latest held-out numbers, shown in the progress bar

    def start(self, step: int) -> None:
        """The progress bar from ``step`` to ``trainer.max_steps``."""
        t = self.cfg.trainer
        self.bar = tqdm(total=t.max_steps, initial=step, disable=not (t.progress_bar and self.main), desc="train")

    def train(self, step: int, numbers: dict[str, float], lr: float, lam: float, tokens_per_s: float) -> None:
        """A training step's record: total, main CE, each depth's unscaled CE, accuracies, acceptance, λ, lr,
        tokens/s and MFU (null without a known GPU)."""
        if not self.main:
            return
        record = {"step": step, "split": "train", **numbers, "lambda": lam, "lr": lr, "tokens_per_s": tokens_per_s}
        record["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.peak_flops)
        self._write(record, step, prefix="")
        self.bar.update(1)
        if step % self.cfg.trainer.log_every == 0:
            mtp = " ".join(f"ce{k}={v:.3f}" for k, v in enumerate(depth_ces(record), start=1))
            text = f"loss={record['loss']:.3f} main={record['main_ce']:.3f} {mtp} {self.validation_text}"
            self.bar.set_postfix_str(text.strip())
            log.info(
                "step %d loss %.4f main %.4f %s accept %.3f lr %.2e %.0f tok/s",
                step,
                record["loss"],
                record["main_ce"],
                mtp,
                record["acceptance_length"],
                lr,
                tokens_per_s,
            )

    def validation(self, step: int, numbers: dict[str, float]) -> None:
        """The held-out record: ``split: eval`` in metrics.jsonl, ``eval/`` in wandb, the log and the bar."""
        if not self.main:
            return
        self._write({"step": step, "split": "eval", **numbers}, step, prefix="eval/")
        ce = " ".join(f"ce{k}={v:.3f}" for k, v in enumerate(depth_ces(numbers), start=1))
        self.validation_text = f"| held-out main={numbers['main_ce']:.3f}"
        log.info(
            "held-out step %d main %.4f %s accept %.3f", step, numbers["main_ce"], ce, numbers["acceptance_length"]
        )

    def _write(self, record: dict[str, Any], step: int, prefix: str) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            fields = {k: v for k, v in record.items() if k not in ("step", "split")} if prefix else record
            self.wandb.log({f"{prefix}{k}": v for k, v in fields.items()}, step=step)

    def stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        self.stop_bar()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def log_setup(run_dir: Path, model: Any, device: Any, world_size: int, trainable: int) -> None:
    """The run's first lines: where it writes, what trains, the MTP layout and λ, and LoRA's settings."""
    log.info("run dir %s", run_dir)
    m = model.mtp_config
    # the sublayers of a depth: the family's pattern where it offers a choice, else the block classes
    blocks = [type(b).__name__ for b in model.mtp.depths[0].blocks] if len(model.mtp.depths) else []
    pattern = "/".join(m.block_types) or "/".join(blocks)
    log.info(
        "%s x%d | %.2fM trainable parameters | MTP D=%d%s λ=%g",
        device,
        world_size,
        trainable / 1e6,
        m.num_layers,
        f" {pattern}" if pattern else "",
        m.loss_scaling_factor,
    )
    lora = model.lora
    if lora is not None:
        log.info(
            "LoRA r=%d alpha=%g on %d linear layers; MTP depths: %s; export: %s",
            lora.rank,
            lora.alpha,
            len(model.lora_targets),
            "every weight" if lora.mtp == "full" else "LoRA",
            lora.export,
        )


def depth_ces(record: dict[str, float]) -> list[float]:
    return [v for k, v in record.items() if k.startswith("mtp_ce_")]


def _open_metrics(path: Path, step: int) -> Any:
    """``path`` for appending, holding no record past ``step`` (a resumed run recomputes them)."""
    if path.exists():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
            log.info("metrics.jsonl: dropped %d records after step %d", len(lines) - len(kept), step)
    return path.open("a")


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; a damaged line (a write cut by a kill) counts as past every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _start_wandb(cfg: DictConfig, run_dir: Path) -> Any:
    """A Weights & Biases run mirroring metrics.jsonl, when ``trainer.wandb_project`` is set."""
    if cfg.trainer.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "trainer.wandb_project is set but wandb is not installed: pip install 'mtp_recipes[wandb]'"
        ) from None
    return wandb.init(
        project=cfg.trainer.wandb_project,
        dir=str(run_dir),
        name=run_dir.name,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
