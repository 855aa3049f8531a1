"""How the ranks of a run are laid out, in one place: the trainer's meshes, expert parallelism and the memory
plan all derive from :class:`ParallelDims`."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtp_recipes.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """``world_size = dp_replicate × dp_shard`` and, for the routed experts, ``dp_shard = efsdp × ep``.

    Every rank is a data-parallel rank with its own rows. Non-expert parameters are sharded over ``dp_shard``
    and replicated over ``dp_replicate`` (HSDP); routed experts are split over ``ep`` consecutive ranks of one
    ``dp_shard`` group, and each rank's experts sharded over ``efsdp`` (and replicated over ``dp_replicate``).
    """

    world_size: int
    dp_replicate: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.dp_replicate < 1 or self.world_size % self.dp_replicate:
            raise ConfigError(f"trainer.dp_replicate={self.dp_replicate} does not divide the {self.world_size} ranks")
        if self.ep < 1 or self.dp_shard % self.ep:
            raise ConfigError(
                f"trainer.ep={self.ep} does not divide the {self.dp_shard} ranks of a replica ({self.world_size} "
                f"ranks / trainer.dp_replicate={self.dp_replicate}): expert-parallel groups lie within one replica"
            )

    @property
    def dp_shard(self) -> int:
        """The ranks one replica shards each non-expert parameter over."""
        return self.world_size // self.dp_replicate

    @property
    def efsdp(self) -> int:
        """The ranks one rank's share of the experts is sharded over."""
        return self.dp_shard // self.ep

    def mesh(self, device_type: str) -> DeviceMesh:
        """The data-parallel mesh: ``("dp",)``, or ``("dp_replicate", "dp_shard")`` for HSDP."""
        if self.dp_replicate > 1:
            return init_device_mesh(
                device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
            )
        return init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))

    def expert_meshes(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """``(ep group, experts' data-parallel mesh)`` of this rank, from ``("dp_replicate", "efsdp", "ep")``."""
        names = ("dp_replicate", "efsdp", "ep")
        experts = init_device_mesh(device_type, (self.dp_replicate, self.efsdp, self.ep), mesh_dim_names=names)
        data_parallel = experts["dp_replicate", "efsdp"] if self.dp_replicate > 1 else experts["efsdp"]
        return experts["ep"], data_parallel
