"""FinetuneRecipe: setup / train / save_checkpoint / cleanup, readable top to bottom.

Every component is built from the config; nothing here knows which model family it trains.
"""

from __future__ import annotations

import json
import logging
import math
import os
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

from mtp_recipes.checkpoint.atomic import recover_interrupted_writes
from mtp_recipes.checkpoint.hf import resolve_model_dir
from mtp_recipes.checkpoint.resume import (
    find_resume,
    load_resume,
    read_trainer_state,
    remove_unfinished,
    save_resume,
)
from mtp_recipes.config import lambda_at, model_kwargs, to_schema
from mtp_recipes.data import build_train_and_eval, load_tokenizer
from mtp_recipes.distributed.expert_parallel import apply_expert_parallel
from mtp_recipes.distributed.mesh import all_reduce_sum, barrier, broadcast_object, init_world, shutdown
from mtp_recipes.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    clip_grad_norm,
)
from mtp_recipes.errors import ConfigError, TrainingError
from mtp_recipes.metrics import StepTotals, flops_per_token, mfu, peak_flops
from mtp_recipes.model import MTPModel, MTPOutput
from mtp_recipes.mtp.roll import count_depth_targets
from mtp_recipes.plan import refuse_unfitting

log = logging.getLogger("mtp_recipes")

# What a run writes into its directory; a directory holding any of them holds a previous run.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "final", "checkpoints", "resume")
# Data settings that fix the packed rows and their order: a resume must see the same ones.
DATA_POSITION_FIELDS = (
    "source", "split", "format", "text_field", "messages_field", "text_sample_by", "max_documents",
    "seq_len", "packing", "packing_buffer", "shuffle", "seed", "eval_fraction", "eval_source", "eval_split",
)  # fmt: skip
OPTIM_FIELDS = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "min_lr_ratio")


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
        self._share_run_dir()
        if not self.world.is_main:
            log.setLevel(logging.WARNING)
        resume = self._prepare_run_dir()
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
        self.tokenizer = self._build_tokenizer()
        vocab = self.model.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}; "
                "use the checkpoint's own tokenizer (model.tokenizer=null) or a larger vocab_size"
            )
        self.data, self.heldout = build_train_and_eval(cfg.data, self.tokenizer, self.world.rank, self.world.world_size)
        self.validation_text = ""  # the latest held-out numbers, shown in the progress bar

        trainable = [p for p in self.model.parameters() if p.requires_grad]  # never empty: MTPConfig checks
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if resume is not None:
            self._resume(resume)
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        peak = peak_flops(self.device)
        self.peak_flops = peak * self.world.world_size if peak else None
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self.metrics_file = self._open_metrics() if self.world.is_main else None
        self.wandb = _start_wandb(cfg, self.run_dir) if self.world.is_main else None
        self._log_setup(sum(p.numel() for p in trainable))

    def _log_setup(self, trainable: int) -> None:
        log.info("run dir %s", self.run_dir)
        m = self.model.mtp_config
        log.info(
            "%s x%d | %.2fM trainable parameters | MTP D=%d %s λ=%g",
            self.device,
            self.world.world_size,
            trainable / 1e6,
            m.num_layers,
            "/".join(m.block_types),
            m.loss_scaling_factor,
        )
        if self.model.lora is not None:
            self._log_lora()

    def _log_lora(self) -> None:
        lora = self.model.lora
        log.info(
            "LoRA r=%d alpha=%g on %d linear layers; MTP depths: %s; export: %s",
            lora.rank,
            lora.alpha,
            len(self.model.lora_targets),
            "every weight" if lora.mtp == "full" else "LoRA",
            lora.export,
        )

    def _prepare_run_dir(self) -> Path | None:
        """Undo unfinished writes, pick the resume checkpoint, and refuse to clobber a previous run.

        Returns the checkpoint to resume from (or None). Rank 0 decides; every rank raises the same error.
        """
        if self.world.is_main:
            undone = recover_interrupted_writes(self.run_dir) + recover_interrupted_writes(self.run_dir / "checkpoints")
            undone += [f"removed the unfinished write {p}" for p in remove_unfinished(self.run_dir / "resume")]
            for line in undone:
                log.warning("%s (left by an interrupted run)", line)
        barrier(self.world)
        resume = find_resume(self.cfg.trainer.resume, self.run_dir / "resume", self.world)
        error = self._refuse_clobbering(resume) if self.world.is_main else None
        error = broadcast_object(error, self.world)
        if error is not None:
            raise ConfigError(error)
        return resume

    def _refuse_clobbering(self, resume: Path | None) -> str | None:
        """Why this run must not start in its run dir, or None (after ``trainer.overwrite`` cleared it)."""
        t, run_dir = self.cfg.trainer, self.run_dir
        previous = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if not previous:
            return None
        if t.overwrite:
            for name in previous:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.warning("trainer.overwrite=true: deleted the previous run's %s in %s", ", ".join(previous), run_dir)
            return None
        final = run_dir / "final"
        if resume is not None:
            step = read_trainer_state(resume)["step"]
            if step > t.max_steps or (step == t.max_steps and final.exists()):
                return (
                    f"trainer.max_steps={t.max_steps} but {resume} is at step {step}: nothing to train, "
                    f"{final} is left as it is; raise trainer.max_steps to train on"
                )
            return None
        if t.resume == "auto":
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

    def _resume(self, path: Path) -> None:
        """Load a resume checkpoint made by the same run settings; the config's optimizer settings win."""
        saved = read_trainer_state(path)
        self._check_same_data_position(saved, path)
        state = load_resume(path, self.model, self.optimizer, self.world)
        if "export_source" in state:
            self.model.restore_export_source(state["export_source"])
        else:  # written before checkpoints recorded it
            log.warning("resume: %s does not record the source's on-disk dtypes; exports use the config's", path)
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        old = state.get("optim", {})
        now = self._optim_settings()
        changed = [f"optim.{k} {old[k]} -> {now[k]}" for k in now if k in old and old[k] != now[k]]
        if state.get("max_steps", self.cfg.trainer.max_steps) != self.cfg.trainer.max_steps:
            changed.append(f"trainer.max_steps {state['max_steps']} -> {self.cfg.trainer.max_steps}")
        # The schedule is always this config's: base LR, betas, eps, weight decay, and the factor for the next step.
        o = self.cfg.optim
        factor = self._lr_factor(self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(
                initial_lr=o.lr, lr=o.lr * factor, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        log.info("resumed from %s at step %d", path, self.step)
        if changed:
            log.warning("resume: %s since the checkpoint; applied from step %d on", ", ".join(changed), self.step + 1)

    def _data_position(self) -> dict[str, Any]:
        """What fixes the order of the batches: data settings, packed rows, ranks and batch split."""
        d, t = self.cfg.data, self.cfg.trainer
        return {
            **{f"data.{k}": d[k] for k in DATA_POSITION_FIELDS},
            "packed rows": len(self.data.dataset),
            "world size": self.world.world_size,
            "data.batch_size": d.batch_size,
            "trainer.grad_accum_steps": t.grad_accum_steps,
        }

    def _check_same_data_position(self, saved: dict[str, Any], path: Path) -> None:
        old = saved.get("data_position")
        if old is None:  # written before checkpoints recorded it
            return
        now = self._data_position()
        diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in now.items() if old.get(k) != v]
        if diffs:
            raise ConfigError(
                f"cannot resume {path}: {'; '.join(diffs)}; the data position would not carry over: resume with "
                "the checkpoint's settings, or start afresh (trainer.overwrite=true or another hydra.run.dir)"
            )

    def _optim_settings(self) -> dict[str, Any]:
        o = self.cfg.optim
        return {k: list(o[k]) if k == "betas" else o[k] for k in OPTIM_FIELDS}

    def _open_metrics(self):
        """metrics.jsonl for appending, holding no record past the current step (a resumed run recomputes them)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if _record_step(line) <= self.step]
            if len(kept) < len(lines):
                tmp = path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
                log.info("metrics.jsonl: dropped %d records after step %d", len(lines) - len(kept), self.step)
        return path.open("a")

    def _share_run_dir(self) -> None:
        """Every rank uses rank 0's run directory (Hydra gives each process its own timestamp)."""
        own = self.run_dir
        self.run_dir = Path(broadcast_object(str(own), self.world))
        if own != self.run_dir and own.exists():
            shutil.rmtree(own, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _build_model(self, load_weights: bool = True) -> MTPModel:
        mcfg = self.cfg.model
        # What nothing trains (the backbone under mtp.train_only, the weights LoRA adapts) is held in the
        # compute dtype.
        kwargs = model_kwargs(self.cfg, frozen_dtype=self.compute_dtype)
        if mcfg.path is not None:
            # Built on the meta device and sharded before any memory is allocated; then filled from the files,
            # or, on a resume, from the resume checkpoint only.
            return MTPModel.from_pretrained(
                mcfg.path, shard=self._parallelize, device=self.device, load_weights=load_weights, **kwargs
            )
        model = MTPModel.from_config(OmegaConf.to_container(mcfg.config, resolve=True), **kwargs).to(self.device)
        self._parallelize(model)
        return model

    def _parallelize(self, model: MTPModel) -> None:
        """Activation checkpointing, per-block compile, expert parallelism, then FSDP2 over the data-parallel mesh."""
        if self.cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.cfg.trainer.compile:
            apply_compile(model)
        if self.world.distributed:
            ep_mesh = self.world.ep_mesh
            experts = apply_expert_parallel(model, ep_mesh) if ep_mesh is not None else []
            if experts:
                rows = next(experts[0].parameters()).shape[0]
                log.info(
                    "expert parallelism: ep=%d, %d MoE layers, %d of %d experts per rank and layer",
                    ep_mesh.size(),
                    len(experts),
                    rows // ep_mesh.size(),
                    rows,
                )
            apply_fsdp(
                model,
                self.world.mesh,
                param_dtype=self.compute_dtype,
                experts=experts,
                expert_mesh=self.world.expert_mesh,
            )

    def _build_tokenizer(self):
        name = self.cfg.model.tokenizer
        if name is None:
            if self.cfg.model.path is None:
                raise ConfigError("model.tokenizer is required for a model built from scratch (e.g. builtin:debug)")
            name = str(resolve_model_dir(self.cfg.model.path))
        return load_tokenizer(name)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay reaching ``min_lr_ratio`` on the last step (0-based ``max_steps - 1``)."""
        o, total = self.cfg.optim, self.cfg.trainer.max_steps
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - 1 - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # ---- train ------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train to ``trainer.max_steps`` and export ``final/``; True when SIGTERM or Ctrl-C stopped it early.

        A stop request is honoured at the next step boundary: a resume checkpoint is written (unless one was
        just written for that step) and training returns. A request during the last step or the final export
        lets it finish.
        """
        cfg = self.cfg.trainer
        self._batches = iter(self.data)
        stop = _GracefulStop(announce=self.world.is_main)
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, disable=not (cfg.progress_bar and self.world.is_main), desc="train"
        )
        try:
            if self.step == cfg.max_steps:
                log.info("the checkpoint is at trainer.max_steps=%d: nothing to train", self.step)
            while self.step < cfg.max_steps:
                checkpointed, stop_requested = self._train_step(bar, stop)
                due = self.step == cfg.max_steps or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)
                if self.heldout is not None and due:
                    self.validate()
                if self.step < cfg.max_steps and stop_requested:
                    path = self.last_checkpoint if checkpointed else self.save_resume_checkpoint()
                    log.warning(
                        "%s: stopped after step %d with a resume checkpoint in %s; continue with trainer.resume=auto "
                        "and the same hydra.run.dir",
                        stop.received,
                        self.step,
                        path,
                    )
                    return True
            if cfg.save_final:
                self.save_checkpoint(self.run_dir / "final")
            return False
        finally:
            bar.close()
            stop.restore()

    def _train_step(self, bar: tqdm, stop: _GracefulStop) -> tuple[bool, bool]:
        """One optimizer step, its metrics record and the checkpoints due.

        Returns ``(checkpointed, stop_requested)``: whether a resume checkpoint was written, and whether any
        rank was asked to stop (the request travels in the metrics' collective). Metrics stay on the device
        until one host copy per step.
        """
        cfg = self.cfg.trainer
        depths = self.model.mtp.num_depths
        self.model.mtp_config = replace(self.model.mtp_config, loss_scaling_factor=lambda_at(self.cfg, self.step))
        start = time.perf_counter()
        micro = [_to(next(self._batches), self.device) for _ in range(cfg.grad_accum_steps)]
        # Exact global normalisation: every micro-batch on every rank is divided by the step's
        # total target counts (main and per depth), so gradients add up to the global mean's.
        counts = sum(count_depth_targets(b["labels"], depths, b["seq_idx"]).to(self.device) for b in micro)
        counts = all_reduce_sum(counts, self.world)
        totals = StepTotals.zeros(depths, self.device)
        for i, batch in enumerate(micro):
            self._sync_gradients(last=i == len(micro) - 1)
            out = self._forward(batch, counts)
            out.loss.backward()
            totals.add(out)
        totals.stop += float(stop.received is not None)
        totals = totals.all_reduce(lambda t: all_reduce_sum(t, self.world))
        record = totals.record(self._clip())
        stop_requested = record.pop("stop") > 0
        self._check_finite(record)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(b["input_ids"].numel() for b in micro) * self.world.world_size
        self._log(record, lr, tokens / (time.perf_counter() - start), bar)
        checkpointed = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
        if checkpointed:
            self.save_resume_checkpoint()
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
            self.save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:06d}")
        return checkpointed, stop_requested

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Main CE, each depth's CE, accuracies and expected acceptance length on the held-out rows.

        Every rank evaluates its own held-out batches (the same number on each); the sums are reduced over
        ranks before dividing, so the numbers are global. Logged with ``split: eval``.
        """
        depths = self.model.mtp.num_depths
        counts = sum(count_depth_targets(b["labels"], depths, b["seq_idx"]) for b in self.heldout)
        counts = all_reduce_sum(counts.to(self.device), self.world)
        totals = StepTotals.zeros(depths, self.device)
        training = self.model.training
        self.model.eval()
        for batch in map(lambda b: _to(b, self.device), self.heldout):
            totals.add(self._forward(batch, counts))
        self.model.train(training)
        record = totals.all_reduce(lambda t: all_reduce_sum(t, self.world)).record(torch.zeros(()))
        del record["stop"], record["grad_norm"]
        self._log_validation(record)
        return record

    def _forward(self, batch: dict[str, torch.Tensor], counts: torch.Tensor) -> MTPOutput:
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
                return_accuracy=self.model.mtp.num_depths > 0,
            )

    def _sync_gradients(self, last: bool) -> None:
        """Under FSDP2, reduce-scatter gradients only after the step's last micro-batch."""
        if self.world.distributed and self.cfg.trainer.grad_accum_steps > 1:
            self.model.set_requires_gradient_sync(last)

    def _check_finite(self, record: dict[str, float]) -> None:
        """A non-finite loss or gradient norm stops the run before the optimizer applies anything."""
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            return
        self.optimizer.zero_grad(set_to_none=True)
        kept = self.last_checkpoint or "none written yet"
        if not math.isfinite(record["loss"]):
            mtp = [round(v, 4) for k, v in record.items() if k.startswith("mtp_ce_")]
            raise TrainingError(
                f"non-finite loss at step {self.step + 1} (main CE {record['main_ce']:.4g}, MTP CE {mtp}): "
                f"lower optim.lr or check the data; last good checkpoint: {kept}"
            )
        raise TrainingError(
            f"non-finite gradient norm at step {self.step + 1} (loss {record['loss']:.4g} is finite); nothing was "
            "applied: lower optim.lr, check the data, or train in fp32 (trainer.precision=fp32); "
            f"last good checkpoint: {kept}"
        )

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

    def _log(self, step: dict[str, float], lr: float, tokens_per_s: float, bar: tqdm) -> None:
        """One metrics.jsonl record per step (rank 0): total, main CE, each depth's unscaled CE, λ, lr,
        per-depth top-1 accuracy, cumulative accuracy, expected acceptance length and self-agreement."""
        if not self.world.is_main:
            return
        record = {
            "step": self.step,
            "split": "train",
            **step,
            "lambda": self.model.mtp_config.loss_scaling_factor,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops),  # null without a known GPU
        }
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)
        bar.update(1)
        if self.step % self.cfg.trainer.log_every == 0:
            mtp = " ".join(f"ce{k}={v:.3f}" for k, v in enumerate(_depth_ces(record), start=1))
            text = f"loss={record['loss']:.3f} main={record['main_ce']:.3f} {mtp} {self.validation_text}"
            bar.set_postfix_str(text.strip())
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

    def _log_validation(self, numbers: dict[str, float]) -> None:
        """The held-out record (rank 0): metrics.jsonl with ``split: eval``, wandb under ``eval/``, the log and bar."""
        if not self.world.is_main:
            return
        record = {"step": self.step, "split": "eval", **numbers}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in numbers.items()}, step=self.step)
        ce = " ".join(f"ce{k}={v:.3f}" for k, v in enumerate(_depth_ces(numbers), start=1))
        self.validation_text = f"| held-out main={numbers['main_ce']:.3f}"
        log.info(
            "held-out step %d main %.4f %s accept %.3f", self.step, numbers["main_ce"], ce, numbers["acceptance_length"]
        )

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> Path:
        """A Hugging Face export (MTP tensors included): gathered tensor by tensor, written by rank 0."""
        self.model.save_pretrained(directory, tokenizer=self.tokenizer, writer=self.world.is_main)
        log.info("saved Hugging Face checkpoint to %s", directory)
        self.last_checkpoint = directory
        return directory

    def save_resume_checkpoint(self) -> Path:
        """An exact-resume checkpoint (sharded model + optimizer, schedule, data position, RNG).

        It also records the settings that fix the data position and the optimizer's, so a resume can refuse
        the former when they changed and say which of the latter it applies anew. Its duration is logged: a
        launcher's grace period after SIGTERM must cover a step plus this.
        """
        start = time.perf_counter()
        trainer_state = {
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "data_position": self._data_position(),
            "optim": self._optim_settings(),
            "max_steps": self.cfg.trainer.max_steps,
            "export_source": self.model.export_source(),
        }
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
        log.info("wrote resume checkpoint %s in %.1f s", path, time.perf_counter() - start)
        return path

    def cleanup(self, finished: bool = True) -> None:
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
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


class _GracefulStop:
    """SIGTERM and Ctrl-C (SIGINT) become a flag read at step boundaries, so the run can checkpoint and exit 0.

    A second Ctrl-C raises KeyboardInterrupt at once (the command line prints one line for it); a repeated
    SIGTERM changes nothing (a launcher's final word is SIGKILL anyway).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool) -> None:
        self.received: str | None = None
        self.announce = announce
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signal.Signals(signum).name
        if self.announce:  # os.write: safe inside a signal handler, unlike logging or print
            hint = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{self.received}: stopping after this step with a resume checkpoint{hint}\n".encode())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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


def _compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _depth_ces(record: dict[str, float]) -> list[float]:
    return [v for k, v in record.items() if k.startswith("mtp_ce_")]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
