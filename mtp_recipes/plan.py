"""``python -m mtp_recipes.plan --config-name RECIPE [--world-size N] [key=value ...]``: memory per GPU.

Counts the parameters of the configured model (backbone + MTP depths) on the meta device, without
allocating them, and prints what each GPU holds under FSDP2 over ``N`` ranks (``N / trainer.dp_replicate``
per replica under HSDP): the sharded master weights, gradients and AdamW moments, what is gathered at once
(the root group, held for the whole step, plus the largest block and the next one prefetched, in the
compute dtype; with ``trainer.ep`` a block gathers only its rank's ``1/ep`` of the routed experts), and an
activation estimate at the recipe's ``data.seq_len``. Recipe setup on CUDA refuses, in one line, a plan over
``trainer.gpu_memory_gb``: better than an out-of-memory error an hour into loading 600 GB.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtp_recipes.errors import ConfigError, MTPRecipesError

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
    dp_replicate: int
    ep: int
    gpu_memory_gb: float
    parameters: int
    trainable: int
    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GIB

    def table(self) -> str:
        """A Markdown table in GiB per GPU."""
        rows = [
            ("parameters (sharded master weights)", self.params),
            ("gradients (sharded)", self.grads),
            ("optimizer (AdamW moments, sharded)", self.optimizer),
            ("largest all-gather (root + 2 blocks, compute dtype; experts: 1/ep)", self.gathered),
            ("activations (estimate)", self.activations),
            ("**total**", self.total),
        ]
        layout = f" (dp_replicate={self.dp_replicate}, ep={self.ep})" if self.dp_replicate * self.ep > 1 else ""
        head = (
            f"{self.parameters / 1e9:.1f}B parameters ({self.trainable / 1e9:.1f}B trained) on {self.world_size} "
            f"GPUs{layout} of {self.gpu_memory_gb:g} GB: {'fits' if self.fits else 'does NOT fit'}\n\n"
        )
        lines = ["| per GPU | GiB |", "|---|---:|", *(f"| {name} | {value / GIB:.1f} |" for name, value in rows)]
        return head + "\n".join(lines)


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments ``MTPModel.from_config``/``from_pretrained`` get from a recipe config."""
    mcfg = cfg.model
    mtp = OmegaConf.to_container(cfg.mtp, resolve=True)
    mtp.pop("loss_scaling_schedule")
    return {
        "dtype": mcfg.dtype,
        "attn_implementation": mcfg.attn_implementation,
        "experts_implementation": mcfg.experts_implementation,
        **mtp,
    }


def _config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The model's config.json dict: ``model.config``, or the checkpoint's config.json (only that file is
    fetched from the Hub: a plan must not download the weights)."""
    from mtp_recipes.checkpoint.hf import CONFIG_NAME, read_config_dict

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


def memory_plan(cfg: DictConfig, world_size: int) -> MemoryPlan:
    """The per-GPU plan of ``cfg`` over ``world_size`` ranks (the model is built on meta: nothing allocated)."""
    from mtp_recipes.distributed.parallelize import shardable_blocks
    from mtp_recipes.model import MTPModel

    t = cfg.trainer
    if world_size % t.dp_replicate or (world_size // t.dp_replicate) % t.ep:
        raise ConfigError(
            f"trainer.dp_replicate={t.dp_replicate} and trainer.ep={t.ep} must divide the {world_size} ranks in turn"
        )
    with torch.device("meta"):
        model = MTPModel.from_config(_config_dict(cfg), **model_kwargs(cfg))
    shards = world_size // t.dp_replicate  # every parameter, experts too, is split over one replica's ranks
    master = next(model.parameters()).element_size()
    compute = 4 if t.precision == "fp32" else 2  # bf16 on GPU unless fp32 is asked for
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks, gathered = [], []
    for block in shardable_blocks(model):
        size = sum(p.numel() for p in block.parameters())
        experts = sum(p.numel() for m in model.family.expert_modules(block) for p in m.parameters())
        blocks.append(size)
        gathered.append(size - experts + experts / t.ep)  # a rank gathers its own experts only
    root = total - sum(blocks)
    hidden = model.text_config.hidden_size
    tokens = cfg.data.batch_size * cfg.data.seq_len
    if t.activation_checkpointing:
        activations = tokens * hidden * (CHECKPOINTED_BYTES * len(blocks) + ACTIVATION_BYTES)
    else:
        activations = tokens * hidden * ACTIVATION_BYTES * len(blocks)
    return MemoryPlan(
        world_size=world_size,
        dp_replicate=t.dp_replicate,
        ep=t.ep,
        gpu_memory_gb=t.gpu_memory_gb,
        parameters=total,
        trainable=trainable,
        params=master * total / shards,
        grads=master * trainable / shards,
        optimizer=2 * master * trainable / shards,
        gathered=compute * (root + 2 * max(gathered, default=0)),
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


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir

    from mtp_recipes.config import to_schema
    from mtp_recipes.finetune import CONFIG_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    name, world_size, overrides = "finetune", int(os.environ.get("WORLD_SIZE", "8")), []
    while args:
        arg = args.pop(0)
        if arg in ("--config-name", "-cn", "--world-size"):
            value = args.pop(0) if args else ""
            name, world_size = (value, world_size) if arg != "--world-size" else (name, int(value))
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("--world-size="):
            world_size = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = to_schema(compose(config_name=name, overrides=overrides))
        print(memory_plan(cfg, world_size).table())
    except MTPRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
