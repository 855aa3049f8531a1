"""FSDP2 for an MTPModel: shard each decoder block and each MTP depth, then the root.

Embeddings and the LM head stay in the root group: both the backbone and every MTP depth use them, so
they are gathered once per step and the head weight feeds the main loss and all depths from one
gather. Plain functions that take a model and a mesh, as in torchtitan.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from mtp_recipes.model import MTPModel


def shardable_blocks(model: MTPModel) -> list[nn.Module]:
    """The units sharded (and optionally checkpointed / compiled) one by one: backbone blocks, MTP depths."""
    return [*model.family.backbone_blocks(model.backbone), *model.mtp.depths]


def apply_activation_checkpointing(model: MTPModel) -> None:
    """Recompute each backbone block and each MTP block in backward instead of storing its activations.

    Uses transformers' own per-layer switch (``GradientCheckpointingLayer``), so state-dict keys do not
    change.
    """
    func = partial(checkpoint, use_reentrant=False)
    for block in [*model.family.backbone_blocks(model.backbone), *(b for d in model.mtp.depths for b in d.blocks)]:
        if not hasattr(block, "gradient_checkpointing"):
            raise ValueError(f"{type(block).__name__} does not support activation checkpointing")
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = func


def apply_compile(model: MTPModel) -> None:
    """``torch.compile`` each block in place (GPU); keys and module structure stay the same."""
    for block in shardable_blocks(model):
        block.compile()


def apply_fsdp(model: MTPModel, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None) -> MTPModel:
    """Shard ``model`` over ``mesh`` with FSDP2.

    ``param_dtype`` (bf16 on GPU) is the compute dtype of the gathered parameters; gradients are
    reduced in float32. Every rank divides its loss by the *global* target counts, so gradients are
    summed over ranks, not averaged.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for block in shardable_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model
