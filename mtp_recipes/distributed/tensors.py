"""Row arithmetic of sharded tensors: which rows a rank holds, filling them, gathering them to one writer.

Checkpoint loading reads a rank's own rows of each tensor straight from the file, and the export gathers each
tensor to the writer only; both need to know how FSDP2 (and expert parallelism) split a tensor's first
dimension. Plain tensors pass through every function unchanged.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def shard_dim(param: torch.Tensor) -> int | None:
    """The mesh dimension a DTensor's dim 0 is split over, all others replicating it (FSDP, HSDP); else None."""
    if not isinstance(param, DTensor) or param.dim() == 0:
        return None
    shards = [i for i, p in enumerate(param.placements) if p == Shard(0)]
    if len(shards) != 1 or not all(p.is_replicate() for i, p in enumerate(param.placements) if i != shards[0]):
        return None
    return shards[0]


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows ``[a, b)`` of a DTensor held here when it is split by rows only (FSDP2, HSDP, expert
    parallelism with FSDP over the experts); ``None`` for any other tensor.

    The offsets are the DTensor's own (the chunk torch.distributed.checkpoint saves for this rank).
    """
    if not isinstance(param, DTensor) or param.dim() == 0:
        return None
    (chunk,) = param.__create_chunk_list__()
    if any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != tuple(param.shape[1:]):
        return None
    return chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter; a sharded DTensor keeps only its own shard of it."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def copy_rows(param: torch.Tensor, value: torch.Tensor, rows: tuple[int, int] | None) -> None:
    """Fill ``param`` from ``value``: the whole tensor (``rows`` None), or this rank's rows ``[a, b)`` of it."""
    if rows is None:
        copy_into(param, value)
    else:
        param.to_local().copy_(value)


def gather_to_writer(value: DTensor, writer: bool) -> torch.Tensor | None:
    """The full tensor on the writer (the mesh's first rank), ``None`` elsewhere: a gather, not an all-gather.

    Under HSDP only the writer's replica takes part. Rows split over several mesh dimensions (experts over
    ``ep``, each rank's experts then over ``efsdp`` by FSDP) are first made whole over all of them but
    ``ep`` (each rank then holds its share of the experts), then gathered over ``ep`` to the writer. Other
    placements fall back to ``full_tensor()``.
    """
    if shard_dim(value) is None and any(p.is_shard(0) for p in value.placements):
        keep = max(i for i, p in enumerate(value.placements) if p.is_shard(0))  # a plain split: ep
        placements = [Shard(0) if i == keep else Replicate() for i in range(value.device_mesh.ndim)]
        value = value.redistribute(placements=placements)
    mesh, dim = value.device_mesh, shard_dim(value)
    if dim is None:
        return value.full_tensor()
    coordinate = mesh.get_coordinate()
    if writer != all(c == 0 for c in coordinate):
        raise ValueError("the writer must be the first rank of the mesh")
    if any(c != 0 for i, c in enumerate(coordinate) if i != dim):
        return None  # another replica: the writer's own replica holds every row
    ranks, rows = mesh.size(dim), value.shape[0]
    size = -(-rows // ranks)  # torch.chunk's split, as FSDP2 shards; the last shards may be short or empty
    local = value.to_local()
    if local.shape[0] < size:  # gather needs equal sizes: pad this rank's rows
        local = torch.cat([local, local.new_zeros((size - local.shape[0], *local.shape[1:]))])
    full = local.new_empty((ranks * size, *local.shape[1:])) if writer else None
    torch.distributed.gather(
        local.contiguous(), list(full.chunk(ranks)) if writer else None, group=mesh.get_group(dim), group_dst=0
    )
    return full[:rows] if writer else None


def gather_full(value: torch.Tensor, writer: bool) -> torch.Tensor | None:
    """A tensor whole on the writer: sharded DTensors are gathered (a collective every rank joins)."""
    return gather_to_writer(value, writer) if isinstance(value, DTensor) else value
