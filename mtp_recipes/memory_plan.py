"""Memory per GPU of a run, before anything is allocated (``python -m mtp_recipes.plan`` prints it).

Counts the parameters of the configured model (backbone + MTP depths) on the meta device, without
allocating them, and prints what each GPU holds under FSDP2 over ``N`` ranks: the master weights,
gradients and AdamW moments sharded over the shard group (``N / trainer.dp_replicate`` ranks under HSDP),
the buffers (never sharded), what is gathered at once (the root group, held for the whole step, plus the
largest block and the next one prefetched, in the compute dtype; with expert parallelism over
``trainer.ep`` ranks a block gathers only its ``1 / ep`` share of the routed experts), and an activation
estimate at the recipe's ``data.seq_len``. Recipe setup on CUDA refuses, in one line, a plan over
``trainer.gpu_memory_gb``: better than an out-of-memory error an hour into loading 600 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtp_recipes.checkpoint.hf import CONFIG_NAME, read_config_dict
from mtp_recipes.config import model_kwargs
from mtp_recipes.distributed.parallel_dims import ParallelDims
from mtp_recipes.errors import ConfigError
from mtp_recipes.metrics import routed_expert_weights
from mtp_recipes.model import MTPModel

GIB = 2**30
# Activation bytes per token and hidden unit that one transformer layer keeps for backward in 16-bit
# compute with fused attention (Korthikanti et al., 2022: 34·s·b·h); with activation checkpointing a
# layer keeps only its 16-bit input (2 bytes) and one layer at a time is recomputed in full.
ACTIVATION_BYTES = 34
CHECKPOINTED_BYTES = 2


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by what holds them."""

    world_size: int
    shard_group: int
    expert_parallel: int
    gpu_memory_gb: float
    parameters: int
    trainable: int
    params: float
    grads: float
    optimizer: float
    buffers: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.gathered + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GIB

    def table(self) -> str:
        """A Markdown table in GiB per GPU."""
        rows = [
            ("parameters (sharded master weights)", self.params),
            ("gradients (sharded)", self.grads),
            ("optimizer (AdamW moments, sharded)", self.optimizer),
            ("buffers (not sharded)", self.buffers),
            ("largest all-gather (root + 2 blocks, compute dtype)", self.gathered),
            ("activations (estimate)", self.activations),
            ("**total**", self.total),
        ]
        head = (
            f"{self.parameters / 1e9:.1f}B parameters ({self.trainable / 1e9:.1f}B trained) on {self.world_size} GPUs "
            f"of {self.gpu_memory_gb:g} GB (sharded over {self.shard_group}, expert parallel {self.expert_parallel}): "
            f"{'fits' if self.fits else 'does NOT fit'}\n\n"
        )
        lines = ["| per GPU | GiB |", "|---|---:|", *(f"| {name} | {value / GIB:.1f} |" for name, value in rows)]
        return head + "\n".join(lines)


def _config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The model's config.json dict: ``model.config``, or the checkpoint's config.json (only that file is
    fetched from the Hub: a plan must not download the weights)."""
    if cfg.model.path is None:
        return OmegaConf.to_container(cfg.model.config, resolve=True)
    directory = Path(cfg.model.path).expanduser()
    if not directory.is_dir():
        from huggingface_hub import hf_hub_download

        try:
            directory = Path(hf_hub_download(cfg.model.path, CONFIG_NAME)).parent
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
            raise ConfigError(
                f"model.path={cfg.model.path} is not a local directory and its config.json could not be fetched "
                f"({type(e).__name__}); point model.path at a directory holding its config.json"
            ) from None
    raw = read_config_dict(directory)
    return {k: v for k, v in raw.items() if k != "quantization_config"}


def _gathered_size(block: nn.Module, family: Any, ep: int) -> float:
    """Elements one rank gathers for ``block``: all of it but the routed experts, of which its ``1 / ep``."""
    experts = sum(p.numel() for p in routed_expert_weights(block, family))
    return sum(p.numel() for p in block.parameters()) - experts + experts / ep


def memory_plan(cfg: DictConfig, world_size: int) -> MemoryPlan:
    """The per-GPU plan of ``cfg`` over ``world_size`` ranks (the model is built on meta: nothing allocated)."""
    dims = ParallelDims(world_size, cfg.trainer.dp_replicate, cfg.trainer.ep)
    shard, ep = dims.dp_shard, dims.ep
    fp32 = cfg.trainer.precision == "fp32"  # else a GPU run computes (and holds a frozen backbone) in bf16
    with torch.device("meta"):
        model = MTPModel.from_config(_config_dict(cfg), **model_kwargs(cfg, frozen_dtype=None if fp32 else "bfloat16"))
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    blocks = model.blocks()
    root = sum(p.numel() for p in params) - sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    tokens = cfg.data.batch_size * cfg.data.seq_len * model.text_config.hidden_size
    if cfg.trainer.activation_checkpointing:
        activations = tokens * (CHECKPOINTED_BYTES * len(blocks) + ACTIVATION_BYTES)
    else:
        activations = tokens * ACTIVATION_BYTES * len(blocks)
    return MemoryPlan(
        world_size=world_size,
        shard_group=shard,
        expert_parallel=ep,
        gpu_memory_gb=cfg.trainer.gpu_memory_gb,
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trained),
        params=sum(p.numel() * p.element_size() for p in params) / shard,
        grads=trained_bytes / shard,
        optimizer=2 * trained_bytes / shard,
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
        gathered=(4 if fp32 else 2)
        * (root + 2 * max((_gathered_size(b, model.family, ep) for b in blocks), default=0)),
        activations=activations,
    )


def refuse_unfitting(cfg: DictConfig, world_size: int, device: torch.device) -> None:
    """On CUDA, one ConfigError line when the plan exceeds ``trainer.gpu_memory_gb``; elsewhere nothing."""
    if device.type != "cuda":
        return
    plan = memory_plan(cfg, world_size)
    if not plan.fits:
        raise ConfigError(
            f"this run needs about {plan.total / GIB:.0f} GiB per GPU on {world_size} GPUs but "
            f"trainer.gpu_memory_gb={plan.gpu_memory_gb:g}: use more nodes, trainer.activation_checkpointing=true "
            "or a smaller data.seq_len (python -m mtp_recipes.plan shows where the memory goes)"
        )
