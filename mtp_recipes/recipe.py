"""FinetuneRecipe: setup / train / step / validate / save / cleanup, readable top to bottom.

Every component is built from the config; nothing here knows which model family it trains. The run directory's
rules, the resume policy, the schedules, the metrics log and the signal handling live in :mod:`mtp_recipes.train`.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtp_recipes.checkpoint.resume import save_resume
from mtp_recipes.config import model_kwargs, to_schema
from mtp_recipes.data import build_train_and_eval, load_tokenizer
from mtp_recipes.data.tokenizer import check_vocab, tokenizer_location
from mtp_recipes.distributed.mesh import all_reduce_sum, init_world, shutdown
from mtp_recipes.distributed.parallelize import clip_grad_norm, parallelize
from mtp_recipes.export_check import log_checks
from mtp_recipes.memory_plan import refuse_unfitting
from mtp_recipes.metrics import StepTotals, flops_per_token
from mtp_recipes.model import MTPModel, MTPOutput
from mtp_recipes.mtp.roll import count_depth_targets
from mtp_recipes.train.guards import non_finite_error
from mtp_recipes.train.launcher_env import foreign_launcher_settings
from mtp_recipes.train.metrics_log import MetricsLog, log_setup
from mtp_recipes.train.resume_policy import data_position, optim_settings, resume_from
from mtp_recipes.train.run_dir import prepare_run_dir, share_run_dir
from mtp_recipes.train.schedules import lambda_at, learning_rate
from mtp_recipes.train.signals import GracefulStop

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
        self.world = init_world(cfg.trainer.device, cfg.trainer.dp_replicate, cfg.trainer.ep)
        self.run_dir = share_run_dir(self.run_dir, self.world)
        if not self.world.is_main:
            log.setLevel(logging.WARNING)
        resume = prepare_run_dir(self.run_dir, cfg.trainer, self.world)
        torch.manual_seed(cfg.trainer.seed)
        self.device = self.world.device
        self.compute_dtype = _compute_dtype(cfg.trainer.precision, self.device)
        refuse_unfitting(cfg, self.world.world_size, self.device)  # before any of it is allocated

        self.model = self._build_model(load_weights=resume is None)
        backend = self.model.family.describe_backend(self.device)  # a kernel choice that cannot run stops here
        if backend is not None:
            log.info(backend)
        for limit in self.model.serving_limits():
            log.warning("serving: %s", limit)
        self.tokenizer = load_tokenizer(tokenizer_location(cfg.model))
        check_vocab(self.tokenizer, self.model.text_config.vocab_size)
        world = self.world
        self.data, self.heldout = build_train_and_eval(cfg.data, self.tokenizer, world.rank, world.world_size)

        trainable = [p for p in self.model.parameters() if p.requires_grad]  # never empty: MTPConfig checks
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            trainable, lr=learning_rate(cfg, 0), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        if resume is not None:
            self.step = resume_from(resume, cfg, self.model, self.optimizer, self.data, self.world)
        if world.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self.metrics = MetricsLog(cfg, self.run_dir, self.step, world, flops_per_token(self.model, cfg.data.seq_len))
        for line in foreign_launcher_settings(cfg.trainer) if world.is_main else []:
            log.warning(line)
        log_setup(self.run_dir, self.model, self.device, world.world_size, sum(p.numel() for p in trainable))

    def _build_model(self, load_weights: bool = True) -> MTPModel:
        mcfg = self.cfg.model
        # what nothing trains (mtp.train_only's backbone, the weights LoRA adapts) is held in the compute dtype
        kwargs = model_kwargs(self.cfg, frozen_dtype=self.compute_dtype)
        shard = functools.partial(
            parallelize, world=self.world, trainer=self.cfg.trainer, compute_dtype=self.compute_dtype
        )
        if mcfg.path is not None:
            # Built on the meta device and sharded before any memory is allocated; then filled from the files,
            # or, on a resume, from the resume checkpoint only.
            return MTPModel.from_pretrained(
                mcfg.path, shard=shard, device=self.device, load_weights=load_weights, **kwargs
            )
        model = MTPModel.from_config(OmegaConf.to_container(mcfg.config, resolve=True), **kwargs).to(self.device)
        shard(model)
        return model

    # ---- train ------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train to ``trainer.max_steps`` and export ``final/``; True when SIGTERM or Ctrl-C stopped it early.

        A stop request is honoured at the next step boundary: a resume checkpoint is written (unless one was
        just written for that step) and training returns. A request during the last step or the final export
        lets it finish.
        """
        cfg = self.cfg.trainer
        self._batches = iter(self.data)
        stop = GracefulStop(announce=self.world.is_main)
        self.metrics.start(self.step)
        try:
            if self.step == cfg.max_steps:
                log.info("the checkpoint is at trainer.max_steps=%d: nothing to train", self.step)
            while self.step < cfg.max_steps:
                stop_requested = self.train_step(stop)
                checkpointed = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
                if checkpointed:
                    self.save_resume_checkpoint()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:06d}")
                due = self.step == cfg.max_steps or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)
                if self.heldout is not None and due:
                    self.validate()
                if self.step < cfg.max_steps and stop_requested:
                    path = self.last_checkpoint if checkpointed else self.save_resume_checkpoint()
                    log.warning(
                        "%s: stopped after step %d with a resume checkpoint in %s; continue with "
                        "trainer.resume=auto and the same hydra.run.dir",
                        stop.received,
                        self.step,
                        path,
                    )
                    return True
            if cfg.save_final:
                self.save_checkpoint(self.run_dir / "final")
            return False
        finally:
            self.metrics.stop_bar()
            stop.restore()

    def train_step(self, stop: GracefulStop) -> bool:
        """One optimizer step and its metrics record; whether any rank was asked to stop (the request travels in
        the metrics' collective). Metrics stay on the device until one host copy per step."""
        depths, lam = self.model.mtp.num_layers, lambda_at(self.cfg, self.step)
        lr = learning_rate(self.cfg, self.step)
        start = time.perf_counter()
        micro = [_to(next(self._batches), self.device) for _ in range(self.cfg.trainer.grad_accum_steps)]
        # Exact global normalisation: every micro-batch on every rank is divided by the step's total target
        # counts (main and per depth), so gradients add up to the global mean's.
        counts = sum(count_depth_targets(b["labels"], depths, b["seq_idx"]).to(self.device) for b in micro)
        counts = all_reduce_sum(counts, self.world)
        totals = StepTotals.zeros(depths, self.device)
        for i, batch in enumerate(micro):
            self._sync_gradients(last=i == len(micro) - 1)
            out = self._forward(batch, counts, lam)
            out.loss.backward()
            totals.add(out)
        totals.stop += float(stop.received is not None)
        record = totals.all_reduce(lambda t: all_reduce_sum(t, self.world)).record(self._clip())
        stop_requested = record.pop("stop") > 0
        error = non_finite_error(record, self.step + 1, self.last_checkpoint)
        if error is not None:
            self.optimizer.zero_grad(set_to_none=True)  # nothing of this step is applied
            raise error
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens_per_s = (
            sum(b["input_ids"].numel() for b in micro) * self.world.world_size / (time.perf_counter() - start)
        )
        self.metrics.train(self.step, record, lr, lam, tokens_per_s)
        return stop_requested

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Main CE, each depth's CE, accuracies and expected acceptance length on the held-out rows.

        Every rank evaluates its own held-out batches (the same number on each); the sums are reduced over
        ranks before dividing, so the numbers are global. Logged with ``split: eval``.
        """
        depths, lam = self.model.mtp.num_layers, lambda_at(self.cfg, self.step)
        counts = sum(count_depth_targets(b["labels"], depths, b["seq_idx"]) for b in self.heldout)
        counts = all_reduce_sum(counts.to(self.device), self.world)
        totals = StepTotals.zeros(depths, self.device)
        training = self.model.training
        self.model.eval()
        for batch in map(lambda b: _to(b, self.device), self.heldout):
            totals.add(self._forward(batch, counts, lam))
        self.model.train(training)
        record = totals.all_reduce(lambda t: all_reduce_sum(t, self.world)).record(torch.zeros(()))
        del record["stop"], record["grad_norm"]
        self.metrics.validation(self.step, record)
        return record

    def _forward(self, batch: dict[str, torch.Tensor], counts: torch.Tensor, lam: float) -> MTPOutput:
        """The model on one packed batch, its losses divided by the global target counts ``counts``.

        Positions come from ``seq_idx`` inside the model (the packer's own rule), so no per-batch host check
        of user-given positions runs.
        """
        with self._autocast():
            return self.model(
                batch["input_ids"],
                batch["labels"],
                seq_idx=batch["seq_idx"],
                num_label_tokens=counts[0],
                num_depth_tokens=counts[1:],
                loss_scaling_factor=lam,
                return_accuracy=self.model.mtp.num_layers > 0,
            )

    def _sync_gradients(self, last: bool) -> None:
        """Under FSDP2, reduce-scatter gradients only after the step's last micro-batch."""
        if self.world.distributed and self.cfg.trainer.grad_accum_steps > 1:
            self.model.set_requires_gradient_sync(last)

    def _autocast(self):
        # Under FSDP its mixed-precision policy casts the gathered parameters: no autocast on top.
        if self.compute_dtype is None or self.world.distributed:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _clip(self) -> torch.Tensor:
        """Clip to ``optim.max_grad_norm`` (0: measure only); the global norm, on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.max_grad_norm
        return clip_grad_norm(params, max_norm if max_norm > 0 else float("inf"))

    # ---- save ---------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> Path:
        """A Hugging Face export (MTP tensors included): gathered tensor by tensor, written by rank 0."""
        self.model.save_pretrained(directory, tokenizer=self.tokenizer, writer=self.world.is_main)
        log.info("saved Hugging Face checkpoint to %s", directory)
        if self.world.is_main and (directory / "config.json").exists():  # an adapter export has none
            log_checks(directory, self.cfg.serving.engine)  # python -m mtp_recipes.check gives the details
        self.last_checkpoint = directory
        return directory

    def save_resume_checkpoint(self) -> Path:
        """An exact-resume checkpoint (sharded model + optimizer, data position, RNG, what an export needs).

        It also records the settings that fix the data position and the optimizer's, so a resume can refuse
        the former when they changed and say which of the latter it applies anew. Its duration is logged: a
        launcher's grace period after SIGTERM must cover a step plus this.
        """
        start = time.perf_counter()
        trainer_state = {
            "data": self.data.state_dict(),
            "data_position": data_position(self.cfg, len(self.data.dataset), self.world.world_size),
            "optim": optim_settings(self.cfg),
            "max_steps": self.cfg.trainer.max_steps,
            "export_source": self.model.provenance.export_json(),
        }
        keep = self.cfg.trainer.keep_last
        path = save_resume(
            self.run_dir / "resume", self.step, self.model, self.optimizer, trainer_state, self.world, keep
        )
        self.last_checkpoint = path
        log.info("wrote resume checkpoint %s in %.1f s", path, time.perf_counter() - start)
        return path

    # ---- cleanup ------------------------------------------------------------------------------------
    def cleanup(self, finished: bool = True) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "world", None) is not None:
            shutdown(self.world, wait=finished)

    def run(self) -> bool:
        """setup, train, cleanup; True when a signal stopped training early (a resume checkpoint was written)."""
        finished = False
        try:
            self.setup()
            interrupted = self.train()
            finished = True
        finally:
            self.cleanup(finished)
        return interrupted


def _compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
