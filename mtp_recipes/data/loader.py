"""Batches of packed rows: seeded shuffling, data-parallel sharding, exact resume, epochs.

**Decision:** sources are tokenised and packed eagerly, in memory, at startup (see
`build.build_data`); every rank does the same deterministic work and keeps only its
shard of rows. The corpora this project fine-tunes on are small; for large ones the
tokenisation step would move to ``datasets.map(num_proc=...)`` with cached shards.

Epoch e shuffles all rows with a generator seeded from ``(seed, e)``, drops the tail
that does not fill a batch on every rank (a different tail each epoch, so no row is
lost for good), and gives rank r rows ``r, r + world_size, ...``. Every rank therefore
sees the same number of batches and distinct rows. The position is one integer — the
number of batches consumed — so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DataError
from .packing import IGNORE_INDEX, PackedRows, PackingStats

BATCH_KEYS = ("input_ids", "labels", "position_ids", "seq_idx")


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows as a map-style dataset; item i is a dict of ``[seq_len]`` tensors."""

    def __init__(self, packed: PackedRows) -> None:
        self.tensors = {key: getattr(packed, key) for key in BATCH_KEYS}
        self.stats: PackingStats = packed.stats

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: tensor[index] for key, tensor in self.tensors.items()}

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices`` stacked into ``[len(indices), seq_len]`` tensors."""
        return {key: tensor[indices] for key, tensor in self.tensors.items()}


class PackedDataLoader:
    """Endless iterator of ``[batch_size, seq_len]`` batches for one data-parallel rank.

    Iteration never ends: the caller stops at its ``max_steps``; ``epoch`` tells which
    pass over the data the next batch belongs to.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{len(dataset)} packed rows cannot fill one batch of {batch_size} on each of "
                f"{world_size} ranks; lower data.batch_size / data.seq_len or add data"
            )
        self.batches_consumed = 0
        self._epoch_rows: tuple[int, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return self.batches_consumed // self.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            epoch, step = divmod(self.batches_consumed, self.batches_per_epoch)
            rows = self._rank_rows(epoch)
            batch = self.dataset.batch(rows[step * self.batch_size : (step + 1) * self.batch_size])
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_consumed = int(state["batches_consumed"])

    def _rank_rows(self, epoch: int) -> torch.Tensor:
        """This rank's rows of ``epoch``, in order (cached: the shuffle is O(rows))."""
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, self._shard(epoch))
        return self._epoch_rows[1]

    def _shard(self, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        return order[:used][self.rank :: self.world_size]


def eval_batches(
    packed: PackedRows, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """This rank's batches of held-out rows ``rank, rank + world_size, ...``, in order, every row once overall.

    Every rank gets the same number of batches (collectives under FSDP need that): the last ones are filled
    with rows of padding (label -100 everywhere), which add nothing to any loss or count.
    """
    dataset = PackedDataset(packed)
    n = len(dataset)
    per_rank = math.ceil(n / world_size)
    padded = math.ceil(per_rank / batch_size) * batch_size * world_size
    rows = [min(i, n) for i in range(rank, padded, world_size)]  # index n: the padding row
    seq_len = packed.input_ids.shape[1]
    padding = {
        "input_ids": torch.full((1, seq_len), pad_id, dtype=torch.long),
        "labels": torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(seq_len)[None],
        "seq_idx": torch.zeros(1, seq_len, dtype=torch.int32),
    }
    tensors = {key: torch.cat([dataset.tensors[key], padding[key]]) for key in BATCH_KEYS}
    return [
        {key: tensor[torch.tensor(rows[i : i + batch_size])] for key, tensor in tensors.items()}
        for i in range(0, len(rows), batch_size)
    ]


def build_dataloader(
    packed: PackedRows,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> PackedDataLoader:
    """Wrap packed rows in a sharded, resumable loader for one rank."""
    return PackedDataLoader(PackedDataset(packed), batch_size, seed, rank, world_size, shuffle)
