"""FinetuneRecipe: setup / train / save_checkpoint / cleanup, readable top to bottom.

Every component is built from the config; nothing here knows which model family it trains.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mtp_recipes.checkpoint.hf import resolve_model_dir
from mtp_recipes.checkpoint.resume import find_resume, load_resume, save_resume
from mtp_recipes.config import lambda_at, to_schema
from mtp_recipes.data import build_data, load_tokenizer
from mtp_recipes.distributed.mesh import World, all_reduce_sum, broadcast_object, init_world, shutdown
from mtp_recipes.distributed.parallelize import apply_activation_checkpointing, apply_compile, apply_fsdp
from mtp_recipes.errors import ConfigError, TrainingError
from mtp_recipes.mamba.kernels import scan_backend
from mtp_recipes.metrics import flops_per_token, mfu, peak_flops
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
        self.world = init_world(cfg.trainer.device)
        self._share_run_dir()
        if not self.world.is_main:
            log.setLevel(logging.WARNING)
        torch.manual_seed(cfg.trainer.seed)
        self.device = self.world.device
        self.autocast_dtype = _autocast_dtype(cfg.trainer.precision, self.device)
        scan_backend(torch.empty(0, device=self.device))  # a bad MTP_RECIPES_MAMBA_SCAN stops the run here
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

        self.model = self._build_model()
        for limit in self.model.serving_limits():
            log.warning("serving: %s", limit)
        if self.world.distributed:
            self.autocast_dtype = None  # FSDP's mixed-precision policy casts the gathered parameters
        self.tokenizer = self._build_tokenizer()
        vocab = self.model.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}; "
                "use the checkpoint's own tokenizer (model.tokenizer=null) or a larger vocab_size"
            )
        self.data = build_data(cfg.data, self.tokenizer, self.world.rank, self.world.world_size)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        resume = find_resume(cfg.trainer.resume, self.run_dir / "resume", self.world)
        if resume is not None:
            state = load_resume(resume, self.model, self.optimizer, self.world)
            self.step = state["step"]
            self.scheduler.load_state_dict(state["scheduler"])
            self.data.load_state_dict(state["data"])
            log.info("resumed from %s at step %d", resume, self.step)
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        peak = peak_flops(self.device)
        self.peak_flops = peak * self.world.world_size if peak else None
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a") if self.world.is_main else None
        self.wandb = _start_wandb(cfg, self.run_dir) if self.world.is_main else None
        n_params = sum(p.numel() for p in trainable)
        log.info(
            "run dir %s | %s x%d | %.2fM trainable parameters | MTP %s",
            self.run_dir,
            self.device,
            self.world.world_size,
            n_params / 1e6,
            self.model.mtp_config,
        )

    def _share_run_dir(self) -> None:
        """Every rank uses rank 0's run directory (Hydra gives each process its own timestamp)."""
        own = self.run_dir
        self.run_dir = Path(broadcast_object(str(own), self.world))
        if own != self.run_dir and own.exists():
            shutil.rmtree(own, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

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
            # Built on the meta device and sharded before any memory is allocated; then filled from the files.
            return MTPModel.from_pretrained(mcfg.path, shard=self._parallelize, device=self.device, **kwargs)
        model = MTPModel.from_config(OmegaConf.to_container(mcfg.config, resolve=True), **kwargs).to(self.device)
        self._parallelize(model)
        return model

    def _parallelize(self, model: MTPModel) -> None:
        """Activation checkpointing, per-block compile, then FSDP2 over the data-parallel mesh."""
        if self.cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.cfg.trainer.compile:
            apply_compile(model)
        if self.world.distributed:
            apply_fsdp(model, self.world.mesh, param_dtype=self.autocast_dtype)

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
        stop = _StopOnSigterm()
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, disable=not (cfg.progress_bar and self.world.is_main), desc="train"
        )
        while self.step < cfg.max_steps:
            self.model.mtp_config = replace(self.model.mtp_config, loss_scaling_factor=lambda_at(self.cfg, self.step))
            start = time.perf_counter()
            micro = [_to(next(data), self.device) for _ in range(cfg.grad_accum_steps)]
            # Exact global normalisation: every micro-batch on every rank is divided by the step's
            # total target counts (main and per depth), so gradients add up to the global mean's.
            counts = sum(count_depth_targets(b["labels"], depths, b["seq_idx"]) for b in micro)
            counts = all_reduce_sum(counts.to(self.device), self.world).cpu()
            # loss, main CE, CE_1..CE_D, then per depth: hits, valid, cumulative hits, cumulative valid, agreement
            totals = torch.zeros(2 + 6 * depths, dtype=torch.float64)
            for batch in micro:
                with self._autocast():
                    out = self.model(
                        **batch, num_label_tokens=counts[0], num_depth_tokens=counts[1:], return_accuracy=depths > 0
                    )
                out.loss.backward()
                totals += torch.cat(
                    [
                        torch.tensor([out.loss.item(), out.main_loss.item(), *(c.item() for c in out.mtp_losses)]),
                        *(
                            (
                                s.cpu()
                                for s in (
                                    out.acceptance.correct,
                                    out.acceptance.valid,
                                    out.acceptance.cum_correct,
                                    out.acceptance.cum_valid,
                                    out.agreement,
                                )
                            )
                            if depths
                            else ()
                        ),
                    ]
                ).to(torch.float64)
            totals = all_reduce_sum(totals.to(self.device), self.world).cpu()
            if not math.isfinite(totals[0]):
                self.optimizer.zero_grad(set_to_none=True)
                kept = self.last_checkpoint or "none written yet"
                raise TrainingError(
                    f"non-finite loss at step {self.step + 1} (main CE {totals[1]:.4g}, MTP CE "
                    f"{[round(float(x), 4) for x in totals[2 : 2 + depths]]}): lower optim.lr or check the data; "
                    f"last good checkpoint: {kept}"
                )
            grad_norm = self._clip()
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens = sum(b["input_ids"].numel() for b in micro) * self.world.world_size
            self._log(totals, grad_norm, lr, tokens / (time.perf_counter() - start), bar)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_resume_checkpoint()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:06d}")
            if stop.requested(self.world):
                path = self.save_resume_checkpoint()
                log.warning("SIGTERM: wrote %s; continue with trainer.resume=auto", path)
                bar.close()
                stop.restore()
                return
        bar.close()
        stop.restore()
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
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _log(self, totals: torch.Tensor, grad_norm: float, lr: float, tokens_per_s: float, bar: tqdm) -> None:
        """One metrics.jsonl record per step (rank 0): total, main CE, each depth's unscaled CE, λ, lr,
        per-depth top-1 accuracy, cumulative accuracy, expected acceptance length and self-agreement."""
        if not self.world.is_main:
            return
        d = self.model.mtp.num_depths
        ce = totals[2 : 2 + d]
        correct, valid, cum_correct, cum_valid, agree = totals[2 + d :].view(5, d) if d else [torch.zeros(0)] * 5
        cumulative = cum_correct / cum_valid.clamp_min(1)
        record = {
            "step": self.step,
            "loss": float(totals[0]),
            "main_ce": float(totals[1]),
            **{f"mtp_ce_{k}": float(v) for k, v in enumerate(ce, start=1)},
            **{f"mtp_acc_{k}": float(v) for k, v in enumerate(correct / valid.clamp_min(1), start=1)},
            **{f"mtp_cum_acc_{k}": float(v) for k, v in enumerate(cumulative, start=1)},
            **{f"mtp_agree_{k}": float(v) for k, v in enumerate(agree / valid.clamp_min(1), start=1)},
            "acceptance_length": 1 + float(cumulative.sum()),
            "lambda": self.model.mtp_config.loss_scaling_factor,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops),  # null without a known GPU
        }
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)
        bar.update(1)
        if self.step % self.cfg.trainer.log_every == 0:
            mtp = " ".join(f"ce{k}={float(v):.3f}" for k, v in enumerate(ce, start=1))
            bar.set_postfix_str(f"loss={record['loss']:.3f} main={record['main_ce']:.3f} {mtp}".strip())
            log.info(
                "step %d loss %.4f main %.4f %s accept %.3f lr %.2e %.0f tok/s",
                self.step,
                record["loss"],
                record["main_ce"],
                mtp,
                record["acceptance_length"],
                record["lr"],
                tokens_per_s,
            )

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> Path:
        """A Hugging Face export (MTP tensors included): gathered tensor by tensor, written by rank 0."""
        self.model.save_pretrained(directory, tokenizer=self.tokenizer, writer=self.world.is_main)
        log.info("saved Hugging Face checkpoint to %s", directory)
        self.last_checkpoint = directory
        return directory

    def save_resume_checkpoint(self) -> Path:
        """An exact-resume checkpoint (sharded model + optimizer, schedule, data position, RNG)."""
        trainer_state = {"scheduler": self.scheduler.state_dict(), "data": self.data.state_dict()}
        path = save_resume(
            self.run_dir / "resume",
            self.step,
            self.model,
            self.optimizer,
            trainer_state,
            self.world,
            self.cfg.trainer.keep_last,
        )
        self.last_checkpoint = path
        return path

    def cleanup(self, finished: bool = True) -> None:
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
        if getattr(self, "world", None) is not None:
            shutdown(self.world, wait=finished)

    def run(self) -> None:
        finished = False
        try:
            self.setup()
            self.train()
            finished = True
        finally:
            self.cleanup(finished)


class _StopOnSigterm:
    """Turn SIGTERM into a flag checked at step boundaries, so the run can checkpoint before exiting."""

    def __init__(self) -> None:
        self.flag = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True

    def requested(self, world: World) -> bool:
        """True on every rank as soon as any rank got SIGTERM (all ranks must stop at the same step)."""
        return bool(all_reduce_sum(torch.tensor([float(self.flag)], device=world.device), world).item())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


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


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
