"""An :class:`~mtp_recipes.model.MTPModel` in and out of Hugging Face checkpoints, MTP tensors included.

Loading validates the checkpoint from its file headers (missing, unexpected or mis-shaped MTP tensors fail in
one line before anything is read), then fills every parameter one in-memory tensor at a time through
transformers' own weight conversions (run over the whole state, MTP keys included) and the family's MTP prefix
table; each rank reads only its rows of a sharded parameter. Saving reverses every step: on-disk names, layouts
and dtypes come back, so untouched tensors are bit-exact, and LoRA adapters are merged into their weights (or
written as peft's adapter files). The model is passed in; this module only reads the members listed in
:class:`CheckpointedModel`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PretrainedConfig

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.convert import from_disk, keep_source_conversions, to_disk
from mtp_recipes.checkpoint.export import Transform, export_tensors
from mtp_recipes.checkpoint.hf import TensorReader, tensor_files, write_checkpoint
from mtp_recipes.checkpoint.keymap import KeyMap
from mtp_recipes.checkpoint.load import check_keys, check_shapes, fill, row_reader
from mtp_recipes.checkpoint.nesting import find_nesting
from mtp_recipes.checkpoint.provenance import Provenance
from mtp_recipes.distributed.tensors import gather_full
from mtp_recipes.engines import Conventions
from mtp_recipes.families.base import Family
from mtp_recipes.lora import MTP_STEM, LoraSettings, adapter_writer, gather_adapter, merge_factors, merged
from mtp_recipes.mtp.config import MTPConfig

logger = logging.getLogger("mtp_recipes")


class CheckpointedModel(Protocol):
    """What loading and saving read of a model (an :class:`~mtp_recipes.model.MTPModel`)."""

    config: PretrainedConfig
    text_config: PretrainedConfig
    mtp_config: MTPConfig
    family: Family
    backbone: nn.Module
    provenance: Provenance
    lora: LoraSettings | None
    lora_targets: list[str]
    engine: str
    conventions: Conventions

    def keymap(self) -> KeyMap: ...
    def checkpoint_state(self, keep_vars: bool = False) -> dict[str, torch.Tensor]: ...
    def init_mtp_from_backbone(self, depths: list[int] | None = None) -> None: ...
    def named_modules(self) -> Any: ...


def load_checkpoint(model: CheckpointedModel, model_dir: Path, fp8_block: tuple[int, int] | None = None) -> None:
    """Fill ``model`` from the checkpoint in ``model_dir`` and record in ``model.provenance`` each tensor's
    on-disk dtype and the checkpoint's layout (kept on save).

    With ``mtp.init=from_scratch`` the checkpoint's MTP tensors (if any) are ignored and new depths start from
    the backbone; with ``extend`` depths the checkpoint has none of do. ``fp8_block`` dequantises a
    block-scaled FP8 checkpoint on read; its weights are then exported in bfloat16.
    """
    files = tensor_files(model_dir)
    reader = TensorReader(files, fp8_block)
    nesting = find_nesting(model.family.checkpoint_nestings, files)
    meta = {name: reader.meta(k) for k in reader.keys() if (name := nesting.to_memory(k)) is not None}
    hf_meta = from_disk(model.backbone, meta)
    # Export-only copies of backbone tensors (Family.tied_export_copies): tied in training, so they are
    # accepted when present, checked against their source, and never loaded.
    copy_sources = model.family.tied_export_copies(model.text_config, model.mtp_config)
    copies = {k: hf_meta.pop(k) for k in copy_sources if k in hf_meta}
    where = f"checkpoint {model_dir}"
    keymap, params = model.keymap(), hf_state(model, keep_vars=True)
    ignored = [re.compile(p) for p in hf_compat.unexpected_key_patterns(model.backbone)]
    mtp = model.mtp_config
    new_depths = check_keys(
        params,
        hf_meta,
        tied=tied_names(params),
        is_mtp=lambda k: keymap.is_mtp(k) or any(p.search(k) for p in ignored),
        depth_of=lambda k: int(keymap.from_hf(k).split(".")[2]) if keymap.is_mtp(k) else None,
        init=mtp.init,
        layout=f"{mtp.num_layers} depth(s) of blocks {list(mtp.block_types)} (D={mtp.num_layers})",
        where=where,
    )
    check_shapes(hf_meta, params, copies, copy_sources, where)
    read = row_reader(model.backbone, reader, nesting, meta, hf_meta, model.family.expert_index)
    fill(params, hf_meta, read, {k: copy_sources[k] for k in copies if copy_sources[k] in hf_meta}, where)
    model.backbone.tie_weights()
    if mtp.init == "from_scratch":
        model.init_mtp_from_backbone()
    elif new_depths:
        model.init_mtp_from_backbone(sorted(new_depths))
    model.provenance.disk_dtypes = {k: t.dtype for k, t in meta.items()}
    model.provenance.nesting = nesting
    model.provenance.passthrough = {k: f for k, f in files.items() if nesting.to_memory(k) is None}


def hf_state(model: CheckpointedModel, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's checkpoint tensors by in-memory HF name (a tied tensor under each of its names)."""
    keymap = model.keymap()
    return {keymap.to_hf(k): v for k, v in model.checkpoint_state(keep_vars=keep_vars).items()}


def tied_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Names that alias an earlier tensor (e.g. a tied ``lm_head``): tied weights are one object, sharded or not."""
    seen: set[int] = set()
    tied = set()
    for key, tensor in state.items():
        if id(tensor) in seen:
            tied.add(key)
        seen.add(id(tensor))
    return tied


def export_config(model: CheckpointedModel) -> dict[str, Any]:
    """config.json for the export: the source's own JSON (unknown fields kept) + current MTP fields."""
    source = model.provenance.source_config
    raw = copy.deepcopy(source) if source else json.loads(model.config.to_json_string())
    section = raw.get("text_config", raw) if model.text_config is not model.config else raw
    model.family.write_export_fields(section, model.mtp_config)
    if source is None:  # a model built from scratch: say which class to load it with
        raw.setdefault("architectures", [type(model.backbone).__name__])
    return raw


def save_checkpoint(
    model: CheckpointedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int = 5 * 1024**3,
    writer: bool = True,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint with the MTP tensors in the layout serving engines load.

    Under FSDP2 every rank calls this (each tensor is gathered collectively, to the writer only); only
    ``writer`` writes. With LoRA the adapters are merged into their weights (``lora.export=merged``: the same
    files and names as without LoRA), or ``lora.export=adapter`` writes peft's adapter files for the backbone
    and the MTP tensors, merged, in ``mtp.safetensors`` under their checkpoint names.
    """
    provenance = model.provenance
    if writer:
        for limit in model.serving_limits():
            logger.warning("export to %s: %s", save_directory, limit)
        if provenance.dequantized:
            logger.info("export to %s: FP8 source weights are written in BF16, not re-quantised", save_directory)
    adapter = model.lora is not None and model.lora.export == "adapter"
    extra = None
    if adapter:
        tensors = gather_adapter(model, writer, gather_full)  # collective
        base = str(provenance.source_dir) if provenance.source_dir is not None else None
        extra = adapter_writer(model.lora, tensors, model.lora_targets, base) if writer else None
    tensors = _export_tensors(model, writer, only_mtp=adapter)
    if not writer:
        for _ in tensors:  # join every gather
            pass
        return Path(save_directory)

    def write_extra(directory: Path) -> None:
        (directory / SERVING_RECORD).write_text(json.dumps(serving_record(model), indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(directory)

    return write_checkpoint(
        save_directory,
        tensors,
        config_dict=None if adapter else export_config(model),
        copy_files_from=None if adapter else provenance.source_dir,
        max_shard_bytes=max_shard_size,
        tokenizer=tokenizer,
        stem=MTP_STEM if adapter else "model",
        extra_files=write_extra,
    )


def _export_tensors(model: CheckpointedModel, writer: bool, only_mtp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The export's ``(on-disk name, tensor)`` pairs: each tensor once (a tied one under its first name), the
    family's export copies, LoRA merged; ``only_mtp`` for the adapter export's MTP file."""
    if model.provenance.disk_dtypes:  # loaded from a checkpoint: its layout comes back
        keep_source_conversions(model.backbone, list(model.provenance.disk_dtypes))
    state = hf_state(model)
    tied = tied_names(hf_state(model, keep_vars=True))  # by identity: the detached values are distinct objects
    copies: dict[str, list[str]] = {}
    for copy_name, source in model.family.tied_export_copies(model.text_config, model.mtp_config).items():
        copies.setdefault(source, []).append(copy_name)
    return export_tensors(
        {k: v for k, v in state.items() if k not in tied},
        to_disk=lambda group: to_disk(model.backbone, group),
        dtype_of=_export_dtype(model),
        writer=writer,
        copies=copies,
        transforms=_lora_merges(model),
        select=model.keymap().is_mtp if only_mtp else None,
        nesting=model.provenance.nesting,
        passthrough=model.provenance.passthrough,
    )


# Beside config.json in every export: what the MTP depths were trained for (python -m mtp_recipes.check reads it).
SERVING_RECORD = "mtp_recipes.json"


def serving_record(model: CheckpointedModel) -> dict[str, Any]:
    """The engine the depths were trained to be served with, the drafting conventions they learnt, and how many
    draft steps each physical depth was trained for."""
    mtp = model.mtp_config
    return {
        "serving_engine": model.engine,
        "conventions": model.conventions.as_json(),
        "num_layers": mtp.num_layers,
        "physical_layers": mtp.num_physical_layers,
        "use_repeated_layer": mtp.use_repeated_layer,
    }


def _export_dtype(model: CheckpointedModel):
    """The on-disk dtype of an exported tensor: the source's, else float32 for what transformers keeps in
    float32 (the MoE gate bias), else the config's dtype."""
    disk = model.provenance.disk_dtypes
    fp32 = hf_compat.fp32_module_names(model.backbone)
    default = getattr(model.config, "dtype", None)
    default = getattr(torch, default, None) if isinstance(default, str) else default  # "auto": none

    def dtype_of(key: str, tensor: torch.Tensor) -> torch.dtype:
        if key in disk:
            return disk[key]
        if any(name in key for name in fp32):
            return torch.float32
        return default if isinstance(default, torch.dtype) else tensor.dtype

    return dtype_of


def _lora_merges(model: CheckpointedModel) -> dict[str, Transform]:
    """The merged export's transforms: each adapted weight becomes ``W + scaling · B @ A`` on the writer."""
    keymap = model.keymap()

    def merge(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Transform:
        def transform(full: torch.Tensor | None, writer: bool) -> torch.Tensor | None:
            a_full, b_full = gather_full(a, writer), gather_full(b, writer)  # collectives
            return merged(full, a_full, b_full, scaling) if writer else None

        return transform

    return {keymap.to_hf(key): merge(a, b, scaling) for key, (a, b, scaling) in merge_factors(model).items()}
