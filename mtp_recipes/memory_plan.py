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
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtp_recipes.checkpoint.hf import read_config_dict
from mtp_recipes.checkpoint.locate import CONFIG_NAME, resolve_model_dir
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
# Attention that is not fused (``model.attn_implementation=eager``) also keeps its score matrices: 5·a·s²·b bytes
# per layer (the same paper; a heads).
EAGER_SCORE_BYTES = 5


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by what holds them."""

    world_size: int
    shard_group: int
    expert_parallel: int
    gpu_memory_gb: float
    activation_checkpointing: bool
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
    directory = resolve_model_dir(cfg.model.path, [CONFIG_NAME])
    raw = read_config_dict(directory)
    return {k: v for k, v in raw.items() if k != "quantization_config"}


@dataclass(frozen=True)
class ModelCounts:
    """What the plan needs from the model, counted once on meta: every layout is arithmetic over it."""

    parameters: int
    trainable: int
    param_bytes: int
    trained_bytes: int
    buffer_bytes: int
    root: int  # elements outside the blocks (embeddings, head, norms): gathered for the whole step
    blocks: tuple[tuple[int, int], ...]  # per block: (elements but routed experts, routed-expert elements)
    routed_experts: int  # experts per MoE layer (0: a dense model); trainer.ep must divide it
    hidden_size: int
    attention_heads: int


def count_model(cfg: DictConfig) -> ModelCounts:
    """Count ``cfg``'s model (backbone + MTP depths) on the meta device: nothing is allocated."""
    fp32 = cfg.trainer.precision == "fp32"  # else a GPU run computes (and holds a frozen backbone) in bf16
    raw = _config_dict(cfg)
    with torch.device("meta"):
        model = MTPModel.from_config(raw, **model_kwargs(cfg, frozen_dtype=None if fp32 else "bfloat16"))
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    blocks = []
    for block in model.blocks():
        experts = list(routed_expert_weights(block, model.family))
        routed = sum(p.numel() for p in experts)
        total = sum(p.numel() for p in block.parameters())
        blocks.append((total - routed, routed, experts[0].shape[0] if experts else 0))
    return ModelCounts(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trained),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        trained_bytes=sum(p.numel() * p.element_size() for p in trained),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        root=sum(p.numel() for p in params) - sum(dense + routed for dense, routed, _ in blocks),
        blocks=tuple((dense, routed) for dense, routed, _ in blocks),
        routed_experts=max((n for _, _, n in blocks), default=0),
        hidden_size=model.text_config.hidden_size,
        # config.json's value: configs with per-layer head counts (Step-3.5) refuse the global one in memory
        attention_heads=int(raw.get("text_config", raw).get("num_attention_heads") or 0),
    )


def memory_plan(cfg: DictConfig, world_size: int, counts: ModelCounts | None = None) -> MemoryPlan:
    """The per-GPU plan of ``cfg`` over ``world_size`` ranks (``counts``: the model's, counted once)."""
    counts = counts or count_model(cfg)
    dims = ParallelDims(world_size, cfg.trainer.dp_replicate, cfg.trainer.ep)
    shard, ep = dims.dp_shard, dims.ep
    if ep > 1 and not counts.routed_experts:
        raise ConfigError(f"trainer.ep={ep} but the model has no routed experts to split; set trainer.ep=1")
    if ep > 1 and counts.routed_experts % ep:
        raise ConfigError(
            f"trainer.ep={ep} does not divide the {counts.routed_experts} routed experts of each MoE layer"
        )
    fp32 = cfg.trainer.precision == "fp32"
    tokens = cfg.data.batch_size * cfg.data.seq_len * counts.hidden_size
    layer = tokens * ACTIVATION_BYTES
    if cfg.model.attn_implementation == "eager":
        layer += EAGER_SCORE_BYTES * counts.attention_heads * cfg.data.seq_len**2 * cfg.data.batch_size
    n_blocks = len(counts.blocks)
    if cfg.trainer.activation_checkpointing:
        activations = tokens * CHECKPOINTED_BYTES * n_blocks + layer
    else:
        activations = layer * n_blocks
    largest = max((dense + routed / ep for dense, routed in counts.blocks), default=0)
    return MemoryPlan(
        world_size=world_size,
        shard_group=shard,
        expert_parallel=ep,
        gpu_memory_gb=cfg.trainer.gpu_memory_gb,
        activation_checkpointing=cfg.trainer.activation_checkpointing,
        parameters=counts.parameters,
        trainable=counts.trainable,
        params=counts.param_bytes / shard,
        grads=counts.trained_bytes / shard,
        optimizer=2 * counts.trained_bytes / shard,
        buffers=counts.buffer_bytes,
        gathered=(4 if fp32 else 2) * (counts.root + 2 * largest),
        activations=activations,
    )


def smallest_fitting(cfg: DictConfig, counts: ModelCounts, max_world_size: int = 1024) -> MemoryPlan | None:
    """The layout with the fewest GPUs that fits: 1, 2, 4, then whole 8-GPU nodes; at a given size, expert
    parallelism before activation checkpointing (which costs a recomputed forward), and the smallest ``ep``.
    ``trainer.dp_replicate`` is kept; None when nothing up to ``max_world_size`` fits."""
    sizes = [1, 2, 4, *range(8, max_world_size + 1, 8)]
    checkpointing = [False, True] if not cfg.trainer.activation_checkpointing else [True]
    for world in sizes:
        if world % cfg.trainer.dp_replicate:
            continue
        shard = world // cfg.trainer.dp_replicate
        # ep > 1 only splits routed experts: a dense model has none to split
        splits = [ep for ep in range(2, shard + 1) if counts.routed_experts and counts.routed_experts % ep == 0]
        eps = [1, *(ep for ep in splits if shard % ep == 0)]
        for ac in checkpointing:
            for ep in eps:
                plan = memory_plan(_with(cfg, ep=ep, activation_checkpointing=ac), world, counts)
                if plan.fits:
                    return plan
    return None


def _with(cfg: DictConfig, **trainer: Any) -> DictConfig:
    changed = OmegaConf.create(OmegaConf.to_container(cfg))
    changed.trainer.update(trainer)
    return changed


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
