"""FSDP2 for an MTPModel: shard each decoder block (backbone and MTP), then the root.

Everything else stays in the root group, gathered once per step: the embeddings and the LM head (the
backbone and every MTP depth use them; the head weight feeds the main loss and all depths from one
gather), and each depth's fusion, norms and own head (Step-3.5), because the loss projects with a
per-depth head after the depth's forward, where a depth-sized unit would have resharded it. Plain
functions that take a model and a mesh, as in torchtitan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from mtp_recipes.distributed.expert_parallel import apply_expert_parallel
from mtp_recipes.distributed.mesh import World
from mtp_recipes.hf_compat import enable_block_checkpointing
from mtp_recipes.model import MTPModel

log = logging.getLogger("mtp_recipes")


def parallelize(model: MTPModel, world: World, trainer: DictConfig, compute_dtype: torch.dtype | None) -> None:
    """What ``trainer.*`` asks of ``model`` on ``world``: activation checkpointing, per-block compile, then under
    torchrun expert parallelism and FSDP2 over the data-parallel mesh (``compute_dtype`` gathered)."""
    if trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    if trainer.compile:
        apply_compile(model)
    if not world.distributed:
        return
    experts = apply_expert_parallel(model, world.ep_mesh) if world.ep_mesh is not None else []
    if experts:
        rows = next(experts[0].parameters()).shape[0]
        log.info(
            "expert parallelism: ep=%d, %d MoE layers, %d of %d experts per rank and layer",
            world.ep_mesh.size(),
            len(experts),
            rows // world.ep_mesh.size(),
            rows,
        )
    apply_fsdp(model, world.mesh, param_dtype=compute_dtype, experts=experts, expert_mesh=world.expert_mesh)


def apply_activation_checkpointing(model: MTPModel) -> None:
    """Recompute each backbone block and each MTP block in backward instead of storing its activations.

    Uses transformers' own per-layer switch (``GradientCheckpointingLayer``), so state-dict keys do not
    change.
    """
    func = partial(checkpoint, use_reentrant=False)
    for block in model.blocks():
        enable_block_checkpointing(block, func)


def apply_compile(model: MTPModel, backend: str = "inductor") -> None:
    """``torch.compile`` each block in place (GPU); keys and module structure stay the same."""
    for block in model.blocks():
        block.compile(backend=backend)


def apply_fsdp(
    model: MTPModel,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    experts: Sequence[nn.Module] = (),
    expert_mesh: DeviceMesh | None = None,
) -> MTPModel:
    """Shard ``model`` over ``mesh`` with FSDP2.

    ``param_dtype`` (bf16 on GPU) is the compute dtype of the gathered parameters; gradients are reduced in
    float32.
    Every rank divides its loss by the *global* target counts, so gradients are summed over ranks, not
    averaged. ``experts`` (already split over an ``ep`` group, :func:`apply_expert_parallel`) are sharded
    on their own, over ``expert_mesh``: their gradients are summed over the ranks holding the same experts
    only, and each already holds the gradients of every token its ``ep`` group routed to it.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    extra = {"mp_policy": mp} if mp else {}
    for module in experts:
        fully_shard(module, mesh=expert_mesh, **extra)
    for block in model.blocks():
        fully_shard(block, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **extra)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` to a global norm of at most ``max_norm``; return the norm before.

    The squared norm is summed from every rank's local shards in one all-reduce, each counted once per
    copy (a shard replicated over ``dp_replicate`` is held by R ranks), so every rank gets the same norm
    whatever mesh a gradient lives on. ``torch.nn.utils.clip_grad_norm_`` would stack per-tensor norms,
    which DTensor refuses across meshes (expert-parallel experts live on their own).
    """
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    squares = [torch.linalg.vector_norm(_local(g)).float().square() / _copies(g) for g in grads]
    total = torch.stack(squares).sum()
    if any(isinstance(g, DTensor) for g in grads):
        torch.distributed.all_reduce(total)
    total = total.sqrt()
    by_mesh: dict[object, list[nn.Parameter]] = {}
    for p in params:  # one clip per mesh: DTensor's foreach ops do not mix meshes either
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _copies(grad: torch.Tensor) -> int:
    """How many ranks hold each shard of ``grad``: the sizes of the mesh dimensions it is replicated over."""
    if not isinstance(grad, DTensor):
        return 1
    mesh = grad.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(grad.placements) if p.is_replicate())
