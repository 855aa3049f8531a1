"""Hugging Face checkpoints in and out, MTP tensors included.

transformers drops every MTP tensor on load, so this module reads and writes the safetensors files
itself: all tensors (backbone and MTP) go through transformers' own weight conversions
(:mod:`mtp_recipes.checkpoint.convert`) and the family's MTP prefix table
(:mod:`mtp_recipes.checkpoint.keymap`). On save every tensor gets back its on-disk name and dtype, so
untouched tensors are bit-exact. A multimodal checkpoint that nests the language model under a prefix
keeps it, and its other towers are copied through unchanged (:class:`CheckpointLayout`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtp_recipes.checkpoint.atomic import atomic_directory
from mtp_recipes.checkpoint.convert import from_disk, to_disk
from mtp_recipes.errors import CheckpointError

if TYPE_CHECKING:
    from mtp_recipes.model import MTPModel

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|model\.safetensors\.index\.json|config\.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_dir(name_or_path: str) -> Path:
    """A local checkpoint directory for a path or a Hub id (downloaded only when the Hub is reachable)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model.path={name_or_path} is a file; point it at a checkpoint directory")
    if not _HUB_ID.match(name_or_path):
        raise CheckpointError(f"model directory {name_or_path} does not exist; check model.path")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"],
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise CheckpointError(
            f"model '{name_or_path}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); download it first (huggingface-cli download {name_or_path} --local-dir DIR) "
            "and set model.path=DIR"
        ) from None


def read_config_dict(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir} has no config.json; it is not a Hugging Face checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{model_dir / CONFIG_NAME} is not valid JSON ({e})") from None


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint and the safetensors file that holds it."""
    index = model_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / f for k, f in weight_map.items()}
    single = model_dir / WEIGHTS_NAME
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} holds only pickle weights (.bin/.pt), which are not loaded for safety; "
            "convert them to safetensors first"
        )
    raise CheckpointError(f"{model_dir} has no {WEIGHTS_NAME} or {INDEX_NAME}")


def read_tensors(files: dict[str, Path], keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    wanted = set(files if keys is None else keys)
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(files[key], []).append(key)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)
    return out


@dataclass
class CheckpointLayout:
    """Where a loaded model's tensors sat in its checkpoint, so that a save writes the same layout.

    ``prefix`` nests the backbone and MTP tensors (a VL checkpoint's ``language_model.``, see
    ``Family.checkpoint_prefixes``); ``passthrough`` names the tensors outside it that the model does not
    hold (vision tower, projector) and the source files they are copied from, verbatim, on save.
    """

    prefix: str = ""
    passthrough: dict[str, Path] = field(default_factory=dict)


def _examples(keys: list[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model_state(model: MTPModel, model_dir: Path) -> dict[str, torch.dtype]:
    """Fill ``model`` from a checkpoint; return the on-disk dtype of every tensor (kept on save).

    Fails with one line naming the offending keys when MTP tensors are missing, unexpected or
    mis-shaped. With ``mtp.init=from_scratch`` the checkpoint's MTP tensors (if any) are ignored and
    new depths are initialised from the backbone instead.
    """
    files = tensor_files(model_dir)
    prefix = next((p for p in model.family.checkpoint_prefixes if any(k.startswith(p) for k in files)), "")
    model.checkpoint_layout = CheckpointLayout(prefix, {k: f for k, f in files.items() if not k.startswith(prefix)})
    disk = {k[len(prefix) :]: v for k, v in read_tensors(files, [k for k in files if k.startswith(prefix)]).items()}
    dtypes = {k: t.dtype for k, t in disk.items()}
    hf_state = from_disk(model.backbone, disk)
    del disk

    keymap = model.keymap()
    params = model.state_dict()
    expected = {keymap.to_hf(k): k for k in params}
    tied = model.tied_keys()
    from_scratch = model.mtp_config.init == "from_scratch"
    # Export-only copies of backbone tensors (Family.tied_export_copies): tied in training, so they are
    # accepted when present, checked against their source, and never loaded.
    copy_sources = model.family.tied_export_copies(model.text_config, model.mtp_config)
    copies = {k: hf_state.pop(k) for k in copy_sources if k in hf_state}
    ignore = [re.compile(p) for p in getattr(model.backbone, "_keys_to_ignore_on_load_unexpected", None) or []]

    def is_mtp(hf_key: str) -> bool:
        return keymap.is_mtp(hf_key) or any(p.search(hf_key) for p in ignore)

    if from_scratch:
        hf_state = {k: v for k, v in hf_state.items() if not is_mtp(k)}
    missing = [k for k in expected if k not in hf_state and expected[k] not in tied]
    if from_scratch:
        missing = [k for k in missing if not is_mtp(k)]
    unexpected = [k for k in hf_state if k not in expected]
    where = f"checkpoint {model_dir}"
    mtp_missing = [k for k in missing if is_mtp(k)]
    if mtp_missing:
        d = model.mtp_config.num_layers
        raise CheckpointError(
            f"{where} lacks {len(mtp_missing)} MTP tensor(s) the model needs for D={d} "
            f"(e.g. {_examples(mtp_missing)}): set mtp.init=from_scratch to initialise new depths, "
            "or mtp.num_layers=0 to train without MTP"
        )
    mtp_unexpected = [k for k in unexpected if is_mtp(k)]
    if mtp_unexpected:
        raise CheckpointError(
            f"{where} has MTP tensor(s) the model does not expect ({_examples(mtp_unexpected)}); "
            f"the model has {model.mtp_config.num_layers} depth(s) of blocks {list(model.mtp_config.block_types)}: "
            "make the mtp settings match the checkpoint, or set mtp.init=from_scratch to discard them"
        )
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model config: missing {_examples(missing) or 'nothing'}; "
            f"unexpected {_examples(unexpected) or 'nothing'}"
        )
    bad_shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(params[expected[k]].shape)}"
        for k, v in hf_state.items()
        if v.shape != params[expected[k]].shape
    ]
    bad_shapes += [
        f"{k} {tuple(v.shape)} vs {copy_sources[k]} {tuple(hf_state[copy_sources[k]].shape)}"
        for k, v in copies.items()
        if copy_sources[k] in hf_state and v.shape != hf_state[copy_sources[k]].shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{where} has tensors of the wrong shape: {_examples(bad_shapes, 3)}")

    differing = [
        k for k, v in copies.items() if copy_sources[k] in hf_state and not torch.equal(v, hf_state[copy_sources[k]])
    ]
    if differing:
        logger.warning(
            "%s: %s differ from the tensors they copy (%s); they are tied in training and will be "
            "re-written from them on save",
            where,
            _examples(differing),
            _examples(sorted({copy_sources[k] for k in differing})),
        )
    with torch.no_grad():
        for hf_key, value in hf_state.items():
            params[expected[hf_key]].copy_(value)
    model.backbone.tie_weights()
    if from_scratch:
        model.init_mtp_from_backbone()
    return dtypes


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_model_state(
    model: MTPModel,
    out_dir: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    config_dict: dict[str, Any],
    disk_dtypes: dict[str, torch.dtype] | None = None,
    default_dtype: torch.dtype | None = None,
    copy_files_from: Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory, atomically.

    ``state_dict`` (full tensors, model-internal names) defaults to ``model.state_dict()``; a distributed
    caller passes the gathered one. Tensors read from a checkpoint get their on-disk dtype back; new
    ones get ``default_dtype``.
    """
    out_dir = Path(out_dir)
    keymap = model.keymap()
    state = state_dict if state_dict is not None else model.state_dict()
    tied = model.tied_keys()
    hf_state = {keymap.to_hf(k): v.detach() for k, v in state.items() if k not in tied}
    for copy_name, source in model.family.tied_export_copies(model.text_config, model.mtp_config).items():
        hf_state[copy_name] = hf_state[source].clone()  # own storage: safetensors refuses aliases
    disk = to_disk(model.backbone, hf_state)
    disk_dtypes = disk_dtypes or {}
    fp32 = tuple(getattr(model.backbone, "_keep_in_fp32_modules_strict", None) or ())

    def dtype_of(key: str, tensor: torch.Tensor) -> torch.dtype:
        if key in disk_dtypes:
            return disk_dtypes[key]
        if any(name in key for name in fp32):  # e.g. MoE gate bias: kept float32 like transformers does
            return torch.float32
        return default_dtype or tensor.dtype

    layout = getattr(model, "checkpoint_layout", None) or CheckpointLayout()
    disk = {layout.prefix + k: v.to(dtype_of(k, v)).contiguous().cpu() for k, v in disk.items()}
    disk.update(read_tensors(layout.passthrough))
    disk = dict(sorted(disk.items()))

    with atomic_directory(out_dir) as tmp:
        shards = _shards(disk, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in disk.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if copy_files_from is not None:
            for f in sorted(copy_files_from.iterdir()):
                if f.is_file() and not _NOT_COPIED.fullmatch(f.name) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
    return out_dir
