"""The process group and device mesh, set up from torchrun's environment.

The meshes come from :class:`~mtp_recipes.distributed.parallel_dims.ParallelDims`: one data-parallel dimension
``("dp",)`` (FSDP over every rank) or, with ``trainer.dp_replicate = R > 1``, ``("dp_replicate", "dp_shard")``
of shape ``(R, N / R)``, which FSDP2 turns into HSDP (each replica sharded within, gradients all-reduced across
replicas). With ``trainer.ep = E > 1`` (expert parallelism) a second mesh ``("dp_replicate", "efsdp", "ep")`` of
shape ``(R, N / R / E, E)`` lays the same ranks out for the routed experts. Every rank still trains on its own
batch: EP changes where expert weights live and where tokens are computed, not the data parallelism.

``python -m mtp_recipes.finetune`` (one process) and ``torchrun --nproc_per_node N -m
mtp_recipes.finetune`` (N processes) run the same code: without torchrun's variables the world has
one rank and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from mtp_recipes.distributed.parallel_dims import ParallelDims
from mtp_recipes.errors import ConfigError


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, the world size, its device and the data-parallel mesh.

    With expert parallelism, ``ep_mesh`` is this rank's ``ep`` group (experts split over it) and
    ``expert_mesh`` the data-parallel mesh of its experts (``efsdp``, or ``dp_replicate`` x ``efsdp``).
    """

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    ep_mesh: DeviceMesh | None = None
    expert_mesh: DeviceMesh | None = None
    owns_group: bool = False  # this run created the process group (a caller's group is left to the caller)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None


def init_world(device: str = "auto", dp_replicate: int = 1, ep: int = 1) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU), or stay a single process."""
    dims = ParallelDims(int(os.environ.get("WORLD_SIZE", "1")), dp_replicate, ep)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dims.world_size == 1:
        return World(0, 1, dev, None)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    mesh = dims.mesh(dev.type)
    experts = dims.expert_meshes(dev.type) if ep > 1 else (None, None)
    return World(dist.get_rank(), dims.world_size, dev, mesh, *experts, owns_group=owns_group)


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks (in place on a copy); a no-op for a single process."""
    if not world.distributed:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: object, world: World) -> object:
    """Rank 0's value of ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World, *, wait: bool = True) -> None:
    """Leave the process group the run created; with ``wait`` only once every rank is done (none tears down
    mid-collective). A group the caller created (several runs in one launch) stays for the next run.

    After an error on this rank the others may never reach the barrier, so then it is skipped.
    """
    if world.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        if world.owns_group:
            dist.destroy_process_group()
