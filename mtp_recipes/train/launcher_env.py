"""What a launcher other than torchrun asked for that this trainer does not take from it.

``accelerate launch`` starts the processes as torchrun does (the trainer reads the same RANK / WORLD_SIZE
variables), and passes the settings of its config file to them as environment variables that only accelerate's
``Accelerator`` reads. The trainer drives FSDP2 itself (docs/decisions.md says why), so each such setting gets one
line naming the ``trainer.*`` field that does it here, never silence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from omegaconf import DictConfig


def foreign_launcher_settings(trainer: DictConfig, env: Mapping[str, str] = os.environ) -> list[str]:
    """One line per accelerate setting in ``env`` that this run does not take, naming what does it here."""
    lines = []
    said = "accelerate launch asked for"
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", ""):
        supported = "" if precision == "bf16" else " (it takes bf16 or fp32)"
        lines.append(
            f"{said} mixed_precision={precision}, which is not read here: trainer.precision sets the compute dtype"
            f"{supported}; this run uses trainer.precision={trainer.precision}"
        )
    if _true(env.get("ACCELERATE_USE_FSDP")):
        lines.append(
            f"{said} its FSDP plugin (FSDP_* settings), which is not read here: training always shards with FSDP2 "
            f"over every rank; trainer.dp_replicate (HSDP, now {trainer.dp_replicate}), trainer.ep (now "
            f"{trainer.ep}) and trainer.activation_checkpointing (now {trainer.activation_checkpointing}) set it"
        )
        if _true(env.get("FSDP_OFFLOAD_PARAMS")):
            lines.append(f"{said} fsdp_offload_params=true: CPU offload of parameters is not supported here")
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        lines.append(
            f"{said} DeepSpeed, which is not used here: training shards with FSDP2 (trainer.dp_replicate, trainer.ep, "
            "trainer.activation_checkpointing) and accumulates with trainer.grad_accum_steps"
        )
    if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") not in ("1", ""):
        steps = env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]
        lines.append(
            f"{said} gradient_accumulation_steps={steps}, which is not read here: trainer.grad_accum_steps sets it "
            f"(now {trainer.grad_accum_steps})"
        )
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() not in ("NO", ""):
        lines.append(
            f"{said} dynamo_backend={env['ACCELERATE_DYNAMO_BACKEND']}, which is not read here: trainer.compile=true "
            f"compiles each block (now {trainer.compile})"
        )
    if _true(env.get("ACCELERATE_USE_MEGATRON_LM")) or _true(env.get("ACCELERATE_USE_PARALLELISM_CONFIG")):
        lines.append(
            f"{said} tensor/context parallelism, which is not used here: trainer.dp_replicate and trainer.ep are the "
            "parallel dimensions"
        )
    return lines


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1", "yes")
