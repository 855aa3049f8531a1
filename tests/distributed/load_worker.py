"""Run under torchrun: load a checkpoint sharded (meta build -> FSDP2 -> fill), report each rank's memory.

``--ep=N`` first: split the routed experts over ``ep`` groups of N ranks before FSDP2 (expert parallelism).

Rank 0 prints one JSON line per rank: the peak RSS growth during the load, the bytes of the rank's own shards,
the bytes it read from the checkpoint (counted by wrapping the reader), the largest tensor it holds unsharded,
whether every gathered tensor equals the single-process load, the peak RSS growth of its export (rank 0
writes) against the largest tensor, and whether that export equals the single-process one file by file.
"""

from __future__ import annotations

import filecmp
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from mtp_recipes import model_checkpoint
from mtp_recipes.checkpoint.hf import TensorReader
from mtp_recipes.distributed.expert_parallel import apply_expert_parallel
from mtp_recipes.distributed.mesh import init_world
from mtp_recipes.distributed.parallelize import apply_fsdp
from mtp_recipes.model import MTPModel


def rss() -> int:
    """Anonymous resident memory: what the process allocated (safetensors' mmap'd file pages excluded)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class PeakRSS(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = rss()
        self.peak = self.base
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.0005)


class CountingReader(TensorReader):
    """Counts the bytes every read returns (each is read from the file, nothing else is)."""

    read_bytes = 0

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        value = super().get(key, rows)
        CountingReader.read_bytes += value.numel() * value.element_size()
        return value


def shard(model: MTPModel, world) -> None:
    """FSDP2, with the experts split over ``ep`` first when the world has an ``ep`` mesh."""
    experts = apply_expert_parallel(model, world.ep_mesh) if world.ep_mesh is not None else []
    apply_fsdp(model, world.mesh, experts=experts, expert_mesh=world.expert_mesh)


def measure(path: str, world) -> dict:
    """This rank's figures for one sharded load of ``path``."""
    CountingReader.read_bytes = 0
    model_checkpoint.TensorReader = CountingReader  # what load_checkpoint constructs
    sampler = PeakRSS()
    sampler.start()
    model = MTPModel.from_pretrained(path, shard=lambda m: shard(m, world), device="cpu")
    sampler.running = False
    sampler.join()
    model_checkpoint.TensorReader = TensorReader
    read = CountingReader.read_bytes
    unsharded = max(t.numel() * t.element_size() for t in model.state_dict().values() if not hasattr(t, "to_local"))
    own = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    reference = MTPModel.from_pretrained(path) if world.rank == 0 else None
    equal = True
    refs = reference.state_dict() if reference is not None else {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value  # collective: every rank
        if reference is not None:
            equal &= torch.equal(full, refs[name])
    # Export: shards gathered to rank 0 only; one tensor per file, so the writer buffers one at a time.
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    del reference, refs
    exporting = PeakRSS()
    exporting.start()
    out = model.save_pretrained(f"{path}-export2", writer=world.rank == 0, max_shard_size=1)
    exporting.running = False
    exporting.join()
    same_export = True
    if world.rank == 0:
        one = MTPModel.from_pretrained(path).save_pretrained(f"{path}-export1", max_shard_size=1)
        files = sorted(f.name for f in one.iterdir())
        same_export = files == sorted(f.name for f in out.iterdir()) and all(
            filecmp.cmp(one / f, out / f, shallow=False) for f in files
        )
    return {
        "path": path,
        "rank": world.rank,
        "growth": sampler.peak - sampler.base,
        "own": own,
        "equal": equal,
        "read": read,
        "unsharded": unsharded,
        "export_growth": exporting.peak - exporting.base,
        "largest": largest,
        "same_export": same_export,
    }


def main(paths: list[str]) -> None:
    ep = int(paths.pop(0).split("=")[1]) if paths[0].startswith("--ep=") else 1
    world = init_world("cpu", ep=ep)
    for path in paths:
        everyone = [None] * world.world_size
        dist.all_gather_object(everyone, measure(path, world))
        if world.rank == 0:  # one writer: lines from two processes would interleave
            for line in everyone:
                print(json.dumps(line), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # The measurement is printed; skip interpreter teardown, where gloo's threads have once aborted
    # the process (std::terminate) after everything was done.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
