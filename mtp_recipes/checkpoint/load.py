"""Checking a checkpoint against the tensors a model expects, and filling them, one in-memory tensor at a time.

Everything here works on names and tensors: the expected tensors by their in-memory HF name, the checkpoint's
tensors as meta tensors (shape and dtype from the file headers) and a reader. A parameter sharded on dim 0
reads only its own rows from the file (merged experts: only its experts' on-disk tensors), so each process
reads about its share of the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from mtp_recipes.checkpoint.convert import disk_groups, from_disk, renamed_only
from mtp_recipes.checkpoint.hf import TensorReader
from mtp_recipes.checkpoint.nesting import Nesting
from mtp_recipes.distributed.tensors import copy_rows, local_rows
from mtp_recipes.errors import CheckpointError

logger = logging.getLogger(__name__)

# ``read(hf_key, rows)``: an in-memory tensor from the checkpoint, whole or only its rows ``[a, b)``
ReadRows = Callable[[str, "tuple[int, int] | None"], torch.Tensor]


def examples(keys: list[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(
    params: dict[str, torch.Tensor],
    hf_meta: dict[str, torch.Tensor],
    *,
    tied: set[str],
    is_mtp: Callable[[str], bool],
    depth_of: Callable[[str], int | None],
    init: str,
    layout: str,
    where: str,
) -> set[int]:
    """One CheckpointError for missing, unexpected or mis-shaped tensors; the MTP depths ``mtp.init=extend``
    initialises (those the checkpoint has none of). ``params`` are the expected tensors by in-memory HF name,
    ``tied`` the ones aliasing another (never stored), ``layout`` describes the model's MTP depths for the
    message. With ``init == "from_scratch"`` the checkpoint's MTP tensors are dropped from ``hf_meta``."""
    if init == "from_scratch":
        for key in [k for k in hf_meta if is_mtp(k)]:
            del hf_meta[key]
    missing = [k for k in params if k not in hf_meta and k not in tied]
    if init == "from_scratch":
        missing = [k for k in missing if not is_mtp(k)]
    unexpected = [k for k in hf_meta if k not in params]
    mtp_missing = [k for k in missing if is_mtp(k)]
    new_depths: set[int] = set()
    if init == "extend":
        # Depths the checkpoint has none of are initialised; a partly present depth is still an error.
        depth = {k: depth_of(k) for k in params if depth_of(k) is not None}
        new_depths = {j for j in set(depth.values()) if all(k not in hf_meta for k, i in depth.items() if i == j)}
        mtp_missing = [k for k in mtp_missing if depth.get(k) not in new_depths]
        missing = [k for k in missing if depth.get(k) not in new_depths]
    if mtp_missing:
        raise CheckpointError(
            f"{where} lacks {len(mtp_missing)} MTP tensor(s) the model needs for {layout} "
            f"(e.g. {examples(mtp_missing)}): set mtp.init=extend to keep the checkpoint's depths and "
            "initialise the missing ones, or mtp.init=from_scratch to initialise every depth anew"
        )
    mtp_unexpected = [k for k in unexpected if is_mtp(k)]
    if mtp_unexpected:
        raise CheckpointError(
            f"{where} has MTP tensor(s) the model does not expect ({examples(mtp_unexpected)}); "
            f"the model has {layout}: make the mtp settings match the checkpoint, or set mtp.init=from_scratch "
            "to discard them"
        )
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model config: missing {examples(missing) or 'nothing'}; "
            f"unexpected {examples(unexpected) or 'nothing'}"
        )
    return new_depths


def check_shapes(
    hf_meta: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    copies: dict[str, torch.Tensor],
    copy_sources: dict[str, str],
    where: str,
) -> None:
    """One CheckpointError naming the tensors whose shape differs from the model's parameter (``params`` by HF
    name) or, for an export copy, from its source."""
    bad_shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in hf_meta.items()
        if v.shape != params[k].shape
    ]
    bad_shapes += [
        f"{k} {tuple(v.shape)} vs {copy_sources[k]} {tuple(hf_meta[copy_sources[k]].shape)}"
        for k, v in copies.items()
        if copy_sources[k] in hf_meta and v.shape != hf_meta[copy_sources[k]].shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{where} has tensors of the wrong shape: {examples(bad_shapes, 3)}")


def row_reader(
    backbone: nn.Module,
    reader: TensorReader,
    nesting: Nesting,
    meta: dict[str, torch.Tensor],
    hf_meta: dict[str, torch.Tensor],
    expert_index: Callable[[str], int | None],
) -> ReadRows:
    """``read(hf_key, rows)``: the in-memory tensor ``hf_key``, or only its rows ``[a, b)``, reading only the
    bytes they need. ``backbone``'s weight conversions turn on-disk tensors into in-memory ones;
    ``expert_index`` names the expert an on-disk key holds (the family's layout), ``None`` for other keys."""
    groups = disk_groups(backbone, list(meta))
    renamed = renamed_only(backbone, list(meta))

    def read(hf_key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        keys = groups[hf_key]
        if rows is None:
            return from_disk(backbone, {k: reader.get(nesting.to_disk(k)) for k in keys})[hf_key]
        if rows[0] == rows[1]:  # more ranks than rows: this one holds none
            return torch.empty((0, *hf_meta[hf_key].shape[1:]), dtype=hf_meta[hf_key].dtype)
        if hf_key in renamed:
            return from_disk(backbone, {keys[0]: reader.get(nesting.to_disk(keys[0]), rows)})[hf_key]
        # Merged experts (rows = experts): convert only this rank's experts' on-disk tensors.
        experts = [expert_index(k) for k in keys]
        num_rows = hf_meta[hf_key].shape[0]
        if None not in experts and set(experts) == set(range(num_rows)):
            mine = [k for k, e in zip(keys, experts, strict=True) if rows[0] <= e < rows[1]]
            value = from_disk(backbone, {k: reader.get(nesting.to_disk(k)) for k in mine})[hf_key]
            if value.shape[0] == rows[1] - rows[0]:
                return value
        return read(hf_key)[rows[0] : rows[1]]  # any other conversion: whole tensor, then this rank's rows

    return read


def fill(
    params: dict[str, torch.Tensor],
    hf_meta: dict[str, torch.Tensor],
    read: ReadRows,
    copy_sources: dict[str, str],
    where: str,
) -> None:
    """Copy every checkpoint tensor into its parameter (``params`` by HF name; each rank its own rows); the
    export copies (``copy_sources``: copy -> source) are compared with their source while it is in hand."""
    copies_of: dict[str, list[str]] = {}
    for name, source in copy_sources.items():
        copies_of.setdefault(source, []).append(name)
    differing = []
    with torch.no_grad():
        for hf_key in hf_meta:
            param = params[hf_key]
            rows = local_rows(param)
            value = read(hf_key, rows)
            copy_rows(param, value, rows)
            differing += [name for name in copies_of.get(hf_key, []) if not torch.equal(read(name, rows), value)]
    if differing:
        logger.warning(
            "%s: %s differ from the tensors they copy (%s); they are tied in training and will be "
            "re-written from them on save",
            where,
            examples(differing),
            examples(sorted({copy_sources[k] for k in differing})),
        )
