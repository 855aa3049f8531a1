"""FinetuneRecipe: setup / train / save_checkpoint / cleanup, readable top to bottom.

Every component is built from the config; nothing here knows which model family it trains.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mtp_recipes.checkpoint.hf import resolve_model_dir
from mtp_recipes.config import lambda_at, to_schema
from mtp_recipes.data import build_data, load_tokenizer
from mtp_recipes.errors import ConfigError, TrainingError
from mtp_recipes.model import MTPModel
from mtp_recipes.mtp.roll import count_depth_targets

log = logging.getLogger("mtp_recipes")


class FinetuneRecipe:
    """Fine-tune backbone + MTP depths on packed data and export Hugging Face checkpoints."""

    def __init__(self, cfg: DictConfig | dict[str, Any], run_dir: str | Path) -> None:
        self.cfg = to_schema(cfg)
        self.run_dir = Path(run_dir)
        self.step = 0
        self.last_checkpoint: Path | None = None

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.trainer.seed)
        self.device = _device(cfg.trainer.device)
        self.autocast_dtype = _autocast_dtype(cfg.trainer.precision, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

        self.model = self._build_model().to(self.device)
        self.tokenizer = self._build_tokenizer()
        vocab = self.model.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}; "
                "use the checkpoint's own tokenizer (model.tokenizer=null) or a larger vocab_size"
            )
        self.data = build_data(cfg.data, self.tokenizer)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        n_params = sum(p.numel() for p in trainable)
        log.info("run dir %s | %s | %.2fM trainable parameters | MTP %s",
                 self.run_dir, self.device, n_params / 1e6, self.model.mtp_config)

    def _build_model(self) -> MTPModel:
        mcfg = self.cfg.model
        mtp = OmegaConf.to_container(self.cfg.mtp, resolve=True)
        mtp.pop("loss_scaling_schedule")
        kwargs = {
            "dtype": mcfg.dtype,
            "attn_implementation": mcfg.attn_implementation,
            "experts_implementation": mcfg.experts_implementation,
            **mtp,
        }
        if mcfg.path is not None:
            return MTPModel.from_pretrained(mcfg.path, **kwargs)
        return MTPModel.from_config(OmegaConf.to_container(mcfg.config, resolve=True), **kwargs)

    def _build_tokenizer(self):
        name = self.cfg.model.tokenizer
        if name is None:
            if self.cfg.model.path is None:
                raise ConfigError("model.tokenizer is required for a model built from scratch (e.g. builtin:debug)")
            name = str(resolve_model_dir(self.cfg.model.path))
        return load_tokenizer(name)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
        o, total = self.cfg.optim, self.cfg.trainer.max_steps
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # ---- train ------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg.trainer
        depths = self.model.mtp.num_depths
        data = iter(self.data)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress_bar, desc="train")
        while self.step < cfg.max_steps:
            self.model.mtp_config = replace(self.model.mtp_config, loss_scaling_factor=lambda_at(self.cfg, self.step))
            start = time.perf_counter()
            micro = [_to(next(data), self.device) for _ in range(cfg.grad_accum_steps)]
            # Exact global normalisation: divide every micro-batch by the step's total target counts.
            counts = sum(count_depth_targets(b["labels"], depths, b["seq_idx"]) for b in micro)
            totals = {"loss": 0.0, "main_ce": 0.0, "mtp_ce": [0.0] * depths}
            for batch in micro:
                with self._autocast():
                    out = self.model(**batch, num_label_tokens=counts[0], num_depth_tokens=counts[1:])
                out.loss.backward()
                totals["loss"] += out.loss.item()
                totals["main_ce"] += out.main_loss.item()
                for k, ce in enumerate(out.mtp_losses):
                    totals["mtp_ce"][k] += ce.item()
            if not math.isfinite(totals["loss"]):
                self.optimizer.zero_grad(set_to_none=True)
                kept = self.last_checkpoint or "none written yet"
                raise TrainingError(
                    f"non-finite loss at step {self.step + 1} (main CE {totals['main_ce']}, MTP CE {totals['mtp_ce']}): "
                    f"lower optim.lr or check the data; last good checkpoint: {kept}"
                )
            grad_norm = self._clip()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            elapsed = time.perf_counter() - start
            tokens = sum(b["input_ids"].numel() for b in micro)
            self._log(totals, grad_norm, tokens / elapsed, bar)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:06d}")
        bar.close()
        if cfg.save_final:
            self.save_checkpoint(self.run_dir / "final")

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm)

    def _log(self, totals: dict[str, Any], grad_norm: float, tokens_per_s: float, bar: tqdm) -> None:
        record = {
            "step": self.step,
            "loss": totals["loss"],
            "main_ce": totals["main_ce"],
            **{f"mtp_ce_{k + 1}": v for k, v in enumerate(totals["mtp_ce"])},
            "lambda": self.model.mtp_config.loss_scaling_factor,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
        }
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        bar.update(1)
        if self.step % self.cfg.trainer.log_every == 0:
            mtp = " ".join(f"ce{k + 1}={v:.3f}" for k, v in enumerate(totals["mtp_ce"]))
            bar.set_postfix_str(f"loss={record['loss']:.3f} main={record['main_ce']:.3f} {mtp}".strip())
            log.info("step %d loss %.4f main %.4f %s lr %.2e %.0f tok/s", self.step, record["loss"],
                     record["main_ce"], mtp, record["lr"], tokens_per_s)

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> Path:
        """A Hugging Face export (MTP tensors included), written atomically."""
        self.last_checkpoint = self.model.save_pretrained(directory, tokenizer=self.tokenizer)
        log.info("saved Hugging Face checkpoint to %s", directory)
        return self.last_checkpoint

    def cleanup(self) -> None:
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()

    def run(self) -> None:
        try:
            self.setup()
            self.train()
        finally:
            self.cleanup()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
