"""Expert parallelism: each rank of an ``ep`` group holds 1/ep of every MoE layer's routed experts.

The router, shared experts and everything else stay as the family computes them; only the experts
module's call changes (through transformers' experts-implementation seam, :func:`hf_compat.route_experts`).
Per call, each rank sends every (token, expert) pair to the rank owning the expert with ``all_to_all``,
runs its own experts on what it received with the implementation the module used before (so the family's
activation, gate and clamps are untouched), sends the results back with the reverse ``all_to_all``, and
combines them with the routing weights. Both exchanges carry gradients (their backward is the reverse
exchange), so the router and the token states get theirs on the rank that owns the tokens, and each
rank's experts get the gradients of every token routed to them from its whole ``ep`` group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mtp_recipes import hf_compat
from mtp_recipes.errors import ConfigError
from mtp_recipes.model import MTPModel

# The name the dispatch is registered under among transformers' experts implementations.
EXPERTS_IMPLEMENTATION = "mtp_recipes_expert_parallel"


@dataclass(frozen=True)
class ExpertParallel:
    """What an expert-parallel experts module needs at each call: its ``ep`` group and local compute."""

    group: dist.ProcessGroup
    size: int
    compute: hf_compat.ExpertsFunction  # the module's own implementation, run on this rank's experts


def apply_expert_parallel(model: MTPModel, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Split the experts of every block (backbone and MTP; the family finds them) over ``ep_mesh``.

    Returns the experts modules, which FSDP then shards on their own mesh (:func:`apply_fsdp`).
    """
    modules = [m for block in model.blocks() for m in model.family.expert_modules(block)]
    if not modules:
        raise ConfigError(f"trainer.ep={ep_mesh.size()} but the model has no routed experts to split; set trainer.ep=1")
    shard_experts(modules, ep_mesh)
    return modules


def shard_experts(modules: list[nn.Module], ep_mesh: DeviceMesh) -> None:
    """Make ``modules`` (experts modules) expert-parallel over ``ep_mesh``.

    Each merged ``[num_experts, ...]`` parameter becomes a DTensor sharded on dim 0 over ``ep_mesh``, taken
    from this rank's copy (every rank built or will load the same model), so no communication happens;
    each module then computes through :func:`expert_parallel_forward`.
    """
    size = ep_mesh.size()
    for module in modules:
        rows = next(module.parameters()).shape[0]
        if rows % size:
            raise ConfigError(f"trainer.ep={size} does not divide the {rows} routed experts of each MoE layer")
    # Each module's own implementation first: routing one switches the config it shares with others.
    computes = [hf_compat.experts_function(m) for m in modules]
    for module, compute in zip(modules, computes, strict=True):
        for name, param in list(module.named_parameters(recurse=False)):
            local = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))
        module.expert_parallel = ExpertParallel(ep_mesh.get_group(), size, compute)
        hf_compat.route_experts(module, EXPERTS_IMPLEMENTATION, expert_parallel_forward)


@torch.compiler.disable  # data-dependent split sizes, read on the host once per call
def expert_parallel_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' output for ``hidden_states`` [T, H] routed to ``top_k_index`` [T, K] with ``top_k_weights``."""
    ep: ExpertParallel = module.expert_parallel
    weights = {name: _local(p) for name, p in module.named_parameters(recurse=False)}
    num_local = next(iter(weights.values())).shape[0]
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, hence by owner
    sent = torch.bincount(flat, minlength=num_local * ep.size)
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=ep.group)  # [source rank, local expert] counts
    send_splits = sent.view(ep.size, num_local).sum(1).tolist()
    recv_splits = received.view(ep.size, num_local).sum(1).tolist()
    tokens = _exchange(hidden_states[order // top_k], recv_splits, send_splits, ep.group)
    # Rows come by source rank, each source's rows by expert: renumber them as this rank's experts.
    local_ids = torch.arange(num_local, device=flat.device).repeat(ep.size).repeat_interleave(received)
    ones = top_k_weights.new_ones((tokens.shape[0], 1))
    out = ep.compute(hf_compat.LocalExperts(module, weights), tokens, local_ids[:, None], ones)
    if not tokens.shape[0]:
        # Nothing routed here, so ``out`` depends on nothing: tie it to the received rows and the experts
        # anyway, or this rank's backward would skip the first exchange's reverse (which the others run:
        # it returns the gradients of the tokens this rank sent) and its experts' (zero) gradients.
        out = out + (tokens.sum() + sum(w.sum() for w in weights.values())) * 0
    back = _exchange(out, send_splits, recv_splits, ep.group)[torch.argsort(order)]
    combined = (back.view(-1, top_k, back.shape[-1]) * top_k_weights.unsqueeze(-1)).sum(dim=1)
    return combined.to(hidden_states.dtype)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of an expert-parallel weight (differentiable: its gradient is the DTensor's)."""
    if not isinstance(param, DTensor):
        raise TypeError("an expert-parallel experts module holds DTensor weights; see apply_expert_parallel")
    return param.to_local()


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """``all_to_all`` of ``x``'s rows: ``in_splits[r]`` rows to rank ``r``, ``out_splits[r]`` from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """:func:`_all_to_all` whose backward sends each row's gradient back to the rank the row came from."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None
