"""The tensors of a Hugging Face export, in on-disk names, layouts and dtypes, one at a time.

Works on a state dict under in-memory HF names: each tensor is gathered to the writer (a collective every rank
joins, in the same order), transformed (e.g. LoRA merged into its weight), written under extra names where the
layout keeps copies, converted to the on-disk layout and cast to its on-disk dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mtp_recipes.checkpoint.hf import TensorReader
from mtp_recipes.checkpoint.nesting import TEXT, Nesting
from mtp_recipes.distributed.tensors import gather_full

# (full tensor on the writer or None elsewhere, writer) -> the tensor to export (None off the writer); may run
# collectives, so every rank calls it
Transform = Callable[[torch.Tensor | None, bool], torch.Tensor | None]


def export_tensors(
    state: dict[str, torch.Tensor],
    *,
    to_disk: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    dtype_of: Callable[[str, torch.Tensor], torch.dtype],
    writer: bool,
    copies: dict[str, list[str]] | None = None,
    transforms: dict[str, Transform] | None = None,
    select: Callable[[str], bool] | None = None,
    nesting: Nesting = TEXT,
    passthrough: dict[str, Path] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(on-disk name, tensor)`` of every tensor the export writes (on the writer only; other ranks only join the
    gathers). ``state`` holds each tensor once, by in-memory HF name; ``copies`` names extra tensors written as
    copies of one of them; ``transforms`` change a tensor before it is written; ``select`` (in-memory names)
    keeps only some tensors, the others not even gathered, and then no ``passthrough`` tensor (copied verbatim
    from its source file) is written."""
    copies, transforms = copies or {}, transforms or {}
    for hf_key, value in state.items():
        names = [name for name in (hf_key, *copies.get(hf_key, [])) if select is None or select(name)]
        if not names:
            continue
        full = gather_full(value, writer)  # collective
        if hf_key in transforms:
            full = transforms[hf_key](full, writer)  # collective too
        if not writer:
            continue
        # own storage for export copies: safetensors refuses aliases
        group = {name: full.detach() if name == hf_key else full.detach().clone() for name in names}
        for disk_key, tensor in to_disk(group).items():
            yield nesting.to_disk(disk_key), tensor.to(dtype_of(disk_key, tensor)).contiguous().cpu()
    if writer and select is None and passthrough:
        reader = TensorReader(passthrough)
        for key in passthrough:
            yield key, reader.get(key)
