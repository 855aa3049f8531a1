"""Run under torchrun: load a checkpoint sharded (meta build -> FSDP2 -> fill), report each rank's memory.

Rank 0 prints one JSON line per rank: the peak RSS growth during the load, the bytes of the rank's own shards,
and whether every gathered tensor equals the single-process load.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

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


def main(path: str) -> None:
    world = init_world("cpu")
    sampler = PeakRSS()
    sampler.start()
    model = MTPModel.from_pretrained(path, shard=lambda m: apply_fsdp(m, world.mesh), device="cpu")
    sampler.running = False
    sampler.join()
    own = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    reference = MTPModel.from_pretrained(path) if world.rank == 0 else None
    equal = True
    refs = reference.state_dict() if reference is not None else {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value  # collective: every rank
        if reference is not None:
            equal &= torch.equal(full, refs[name])
    mine = {"rank": world.rank, "growth": sampler.peak - sampler.base, "own": own, "equal": equal}
    everyone = [None] * world.world_size
    dist.all_gather_object(everyone, mine)
    if world.rank == 0:  # one writer: lines from two processes would interleave
        for line in everyone:
            print(json.dumps(line), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # The measurement is printed; skip interpreter teardown, where gloo's threads have once aborted
    # the process (std::terminate) after everything was done.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
