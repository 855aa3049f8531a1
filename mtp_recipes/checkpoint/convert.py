"""On-disk <-> in-memory tensor names and layouts, through transformers' own weight conversions.

transformers 5 keeps some tensors in a different form in memory than on disk (Nemotron-H's per-expert
``mixer.experts.{e}.up_proj.weight`` become one ``mixer.experts.up_proj`` tensor; ``backbone.`` becomes
``model.``). Its loader applies these conversions only to keys the backbone knows, so the MTP tensors
it drops would stay unconverted. Running the same conversion objects over the *whole* state dict, MTP
keys included, gives one exact mapping for both directions.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from transformers import PreTrainedModel

from mtp_recipes import hf_compat
from mtp_recipes.hf_compat import WeightConverter, WeightRenaming, dot_natural_key


def to_disk(backbone: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory HF names/layouts -> the names and layouts transformers writes on disk."""
    return hf_compat.revert_conversions(backbone, state_dict)


def _load_conversions(backbone: PreTrainedModel) -> tuple[list[WeightRenaming], list[WeightConverter]]:
    # Conversions attached to the backbone win, as in transformers' own revert_weight_conversion (to_disk).
    attached = hf_compat.attached_weight_conversions(backbone)
    conversions = deepcopy(attached) if attached is not None else hf_compat.model_weight_conversions(backbone)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    return renamings, converters


def keep_source_conversions(backbone: PreTrainedModel, source_keys: list[str]) -> None:
    """Make :func:`to_disk` revert only the conversions that match one of ``source_keys`` (the on-disk names of the
    checkpoint the model was loaded from), as transformers saves a model it loaded: a tensor the source already
    kept in the in-memory layout (experts stacked on disk) is written back in that layout, not split."""
    renamings, converters = _load_conversions(backbone)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    used: set[int] = set()
    for key in source_keys:
        for renaming in renamings:  # they chain, in order
            renamed = hf_compat.rename_key(key, [renaming], [])[0]
            if renamed != key:
                used.add(id(renaming))
                key = renamed
        pattern = hf_compat.rename_key(key, [], converters)[1]
        if pattern is not None:
            used.add(id(by_pattern[pattern]))
    # transformers' saver reverts the renamings and the converters apart, each kind in its own order
    hf_compat.attach_weight_conversions(backbone, [c for c in (*renamings, *converters) if id(c) in used])


def disk_groups(backbone: PreTrainedModel, keys: list[str]) -> dict[str, list[str]]:
    """Which on-disk keys make up each in-memory tensor (e.g. E per-expert tensors -> one stacked tensor).

    Lets a loader read one in-memory tensor's worth of data at a time. The group of a converted tensor
    is keyed by the converter's target name; pass the group to :func:`from_disk` to build it.
    """
    renamings, converters = _load_conversions(backbone)
    groups: dict[str, list[str]] = {}
    for key in sorted(keys, key=dot_natural_key):
        groups.setdefault(hf_compat.rename_key(key, renamings, converters)[0], []).append(key)
    return groups


def renamed_only(backbone: PreTrainedModel, keys: list[str]) -> set[str]:
    """The in-memory names whose tensor is one on-disk tensor under another name (same layout and rows)."""
    renamings, converters = _load_conversions(backbone)
    targets: dict[str, list[str | None]] = {}
    for key in keys:
        target, pattern = hf_compat.rename_key(key, renamings, converters)
        targets.setdefault(target, []).append(pattern)
    return {t for t, patterns in targets.items() if patterns == [None]}


def from_disk(backbone: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk names/layouts -> transformers' in-memory names/layouts (the inverse of :func:`to_disk`)."""
    renamings, converters = _load_conversions(backbone)
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    pending: dict[str, WeightRenaming | WeightConverter] = {}
    for key, tensor in sorted(state_dict.items(), key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = hf_compat.rename_key(key, renamings, converters)
        if pattern is None:
            transform = pending.setdefault(target, WeightRenaming(key, target))
            pattern = key
        else:
            transform = pending.setdefault(target, deepcopy(by_pattern[pattern]))
        transform.add_tensor(target, key, pattern, tensor)

    out: dict[str, torch.Tensor] = {}
    for target, transform in pending.items():
        for name, value in transform.convert(target, model=backbone, config=backbone.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out
