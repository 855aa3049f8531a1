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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mtp_recipes import hf_compat
from mtp_recipes.checkpoint.atomic import atomic_directory
from mtp_recipes.checkpoint.convert import disk_groups, from_disk, renamed_only, to_disk
from mtp_recipes.errors import CheckpointError
from mtp_recipes.lora import merge_factors, merged

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
        reason = " ".join(str(e).split()) or "no message"
        raise CheckpointError(
            f"model '{name_or_path}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {reason}); download it first (hf download {name_or_path} --local-dir DIR) "
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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); download it again") from None
        return {k: model_dir / f for k, f in weight_map.items()}
    single = model_dir / WEIGHTS_NAME
    if single.exists():
        return {k: single for k in _open(single).keys()}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} holds only pickle weights (.bin/.pt), which are not loaded for safety; "
            "convert them to safetensors first"
        )
    raise CheckpointError(f"{model_dir} has no {WEIGHTS_NAME} or {INDEX_NAME}")


_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


SCALE_SUFFIX = "_scale_inv"


def fp8_block_size(config_dict: dict[str, Any], model_dir: Path) -> tuple[int, int] | None:
    """The weight block of a block-scaled FP8 checkpoint (DeepSeek-V3's release), ``None`` when unquantised.

    Any other quantisation is refused: its weights cannot be turned back into trainable values here.
    """
    quant = config_dict.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method", "quantized")
    block = quant.get("weight_block_size")
    if method == "fp8" and isinstance(block, list) and len(block) == 2:
        return int(block[0]), int(block[1])
    raise CheckpointError(
        f"{model_dir} is a {method} checkpoint without a 2-D weight_block_size; only block-scaled FP8 "
        "is dequantised on load: use a BF16 copy of the model and point model.path at it"
    )


class TensorReader:
    """Reads checkpoint tensors one at a time (or a range of rows), keeping each file open once.

    With ``fp8_block`` every FP8 weight that has a ``<name>_scale_inv`` companion is dequantised on read,
    in float32, as ``weight * scale`` per block; the scale tensors themselves are not listed in ``keys``.
    """

    def __init__(self, files: dict[str, Path], fp8_block: tuple[int, int] | None = None) -> None:
        self.files = files
        self.fp8_block = fp8_block
        self._handles: dict[Path, Any] = {}
        self.scales: dict[str, str] = {}
        if fp8_block is not None:
            self.scales = {k[: -len(SCALE_SUFFIX)]: k for k in files if k.endswith(SCALE_SUFFIX)}
            self.scales = {w: s for w, s in self.scales.items() if w in files}

    def keys(self) -> list[str]:
        """Every tensor name but the FP8 scales (which are part of their weight)."""
        scales = set(self.scales.values())
        return [k for k in self.files if k not in scales]

    def _handle(self, key: str) -> Any:
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]

    def _rows(self, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        try:
            if rows is None:
                return self._handle(key).get_tensor(key)
            return self._handle(key).get_slice(key)[rows[0] : rows[1]]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _unreadable(self.files[key], e) from None

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``key`` (rows ``[a, b)`` of its first dimension only, when given), dequantised if FP8."""
        value = self._rows(key, rows)
        if key not in self.scales:
            return value
        (b0, b1), start = self.fp8_block, rows[0] if rows else 0
        first = start // b0
        scale = self._rows(self.scales[key], (first, -(-(start + value.shape[0]) // b0)))
        scale = scale.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)
        offset = start - first * b0
        return value.float() * scale[offset : offset + value.shape[0], : value.shape[1]]

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored dtype and shape: validates a checkpoint without reading it.

        A dequantised FP8 weight reports bfloat16: the dtype it is exported in.
        """
        view = self._handle(key).get_slice(key)
        dtype = torch.bfloat16 if key in self.scales else _DTYPES[view.get_dtype()]
        return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def _open(path: Path) -> Any:
    """``safe_open`` (which checks the header against the file size) with a one-line error."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    reason = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path} is missing; download the checkpoint again")
    return CheckpointError(
        f"{path} is not a readable safetensors file ({reason}); it is truncated or damaged: download it again"
    )


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


def load_model_state(
    model: MTPModel, model_dir: Path, fp8_block: tuple[int, int] | None = None
) -> dict[str, torch.dtype]:
    """Fill ``model`` from a checkpoint; return the on-disk dtype of every tensor (kept on save).

    The checkpoint is validated from its metadata first: missing, unexpected or mis-shaped MTP tensors
    fail with one line naming the keys before anything is read. Tensors are then read one in-memory
    tensor at a time and copied into the parameters. A parameter sharded on dim 0 (FSDP2) reads only
    its own rows straight from the file (merged experts: only its experts' on-disk tensors), so each
    process reads about its share of the checkpoint and never holds the whole model. With
    ``mtp.init=from_scratch`` the checkpoint's MTP tensors (if any) are ignored and new depths are
    initialised from the backbone instead.
    ``fp8_block`` (:func:`fp8_block_size`) dequantises a block-scaled FP8 checkpoint on read; its weights
    are then exported in bfloat16.
    """
    files = tensor_files(model_dir)
    reader = TensorReader(files, fp8_block)
    prefix = next((p for p in model.family.checkpoint_prefixes if any(k.startswith(p) for k in files)), "")
    model.checkpoint_layout = CheckpointLayout(prefix, {k: f for k, f in files.items() if not k.startswith(prefix)})
    meta = {k[len(prefix) :]: reader.meta(k) for k in reader.keys() if k.startswith(prefix)}
    hf_meta = from_disk(model.backbone, meta)
    # Export-only copies of backbone tensors (Family.tied_export_copies): tied in training, so they are
    # accepted when present, checked against their source, and never loaded.
    copy_sources = model.family.tied_export_copies(model.text_config, model.mtp_config)
    copies = {k: hf_meta.pop(k) for k in copy_sources if k in hf_meta}
    where = f"checkpoint {model_dir}"
    new_depths = _check_keys(model, hf_meta, copies, copy_sources, where)
    read = _row_reader(model, reader, prefix, meta, hf_meta)
    _fill(model, hf_meta, read, {k: copy_sources[k] for k in copies if copy_sources[k] in hf_meta}, where)
    model.backbone.tie_weights()
    if model.mtp_config.init == "from_scratch":
        model.init_mtp_from_backbone()
    for j in sorted(new_depths):
        model.family.init_depth_from_backbone(model.mtp.depths[j], model.backbone)
    return {k: t.dtype for k, t in meta.items()}


def _check_keys(
    model: MTPModel,
    hf_meta: dict[str, torch.Tensor],
    copies: dict[str, torch.Tensor],
    copy_sources: dict[str, str],
    where: str,
) -> set[int]:
    """Raise one CheckpointError for missing, unexpected or mis-shaped tensors; return the MTP depths the
    checkpoint has none of that ``mtp.init=extend`` initialises. ``from_scratch`` drops the checkpoint's MTP
    tensors from ``hf_meta``."""
    keymap = model.keymap()
    params = model.checkpoint_state()
    expected = {keymap.to_hf(k): k for k in params}
    tied = model.tied_keys()
    ignore = [re.compile(p) for p in hf_compat.unexpected_key_patterns(model.backbone)]

    def is_mtp(hf_key: str) -> bool:
        return keymap.is_mtp(hf_key) or any(p.search(hf_key) for p in ignore)

    if model.mtp_config.init == "from_scratch":
        for key in [k for k in hf_meta if is_mtp(k)]:
            del hf_meta[key]
    missing = [k for k in expected if k not in hf_meta and expected[k] not in tied]
    if model.mtp_config.init == "from_scratch":
        missing = [k for k in missing if not is_mtp(k)]
    unexpected = [k for k in hf_meta if k not in expected]
    mtp_missing = [k for k in missing if is_mtp(k)]
    new_depths: set[int] = set()
    if model.mtp_config.init == "extend":
        # Depths the checkpoint has none of are initialised; a partly present depth is still an error.
        depth_of = {k: int(keymap.from_hf(k).split(".")[2]) for k in expected if keymap.is_mtp(k)}
        new_depths = {j for j in set(depth_of.values()) if all(k not in hf_meta for k, i in depth_of.items() if i == j)}
        mtp_missing = [k for k in mtp_missing if depth_of.get(k) not in new_depths]
        missing = [k for k in missing if depth_of.get(k) not in new_depths]
    mtp = model.mtp_config
    if mtp_missing:
        raise CheckpointError(
            f"{where} lacks {len(mtp_missing)} MTP tensor(s) the model needs for D={mtp.num_layers} "
            f"(e.g. {_examples(mtp_missing)}): set mtp.init=extend to keep the checkpoint's depths and "
            "initialise the missing ones, or mtp.init=from_scratch to initialise every depth anew"
        )
    mtp_unexpected = [k for k in unexpected if is_mtp(k)]
    if mtp_unexpected:
        raise CheckpointError(
            f"{where} has MTP tensor(s) the model does not expect ({_examples(mtp_unexpected)}); "
            f"the model has {mtp.num_layers} depth(s) of blocks {list(mtp.block_types)}: "
            "make the mtp settings match the checkpoint, or set mtp.init=from_scratch to discard them"
        )
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model config: missing {_examples(missing) or 'nothing'}; "
            f"unexpected {_examples(unexpected) or 'nothing'}"
        )
    _check_shapes(hf_meta, {k: params[v] for k, v in expected.items()}, copies, copy_sources, where)
    return new_depths


def _check_shapes(
    hf_meta: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    copies: dict[str, torch.Tensor],
    copy_sources: dict[str, str],
    where: str,
) -> None:
    """One CheckpointError naming the tensors whose shape differs from the model's parameter (``params`` by
    checkpoint key) or, for an export copy, from its source."""
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
        raise CheckpointError(f"{where} has tensors of the wrong shape: {_examples(bad_shapes, 3)}")


def _row_reader(
    model: MTPModel, reader: TensorReader, prefix: str, meta: dict[str, torch.Tensor], hf_meta: dict[str, torch.Tensor]
) -> Callable[[str, tuple[int, int] | None], torch.Tensor]:
    """``read(hf_key, rows)``: the in-memory tensor ``hf_key``, or only its rows ``[a, b)``, reading only the
    bytes they need."""
    groups = disk_groups(model.backbone, list(meta))
    renamed = renamed_only(model.backbone, list(meta))

    def read(hf_key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        keys = groups[hf_key]
        if rows is None:
            return from_disk(model.backbone, {k: reader.get(prefix + k) for k in keys})[hf_key]
        if rows[0] == rows[1]:  # more ranks than rows: this one holds none
            return torch.empty((0, *hf_meta[hf_key].shape[1:]), dtype=hf_meta[hf_key].dtype)
        if hf_key in renamed:
            return from_disk(model.backbone, {keys[0]: reader.get(prefix + keys[0], rows)})[hf_key]
        # Merged experts (rows = experts): convert only this rank's experts' on-disk tensors.
        experts = [_expert_index(k) for k in keys]
        num_rows = hf_meta[hf_key].shape[0]
        if None not in experts and set(experts) == set(range(num_rows)):
            mine = [k for k, e in zip(keys, experts, strict=True) if rows[0] <= e < rows[1]]
            value = from_disk(model.backbone, {k: reader.get(prefix + k) for k in mine})[hf_key]
            if value.shape[0] == rows[1] - rows[0]:
                return value
        return read(hf_key)[rows[0] : rows[1]]  # any other conversion: whole tensor, then this rank's rows

    return read


def _fill(
    model: MTPModel,
    hf_meta: dict[str, torch.Tensor],
    read: Callable[[str, tuple[int, int] | None], torch.Tensor],
    copy_sources: dict[str, str],
    where: str,
) -> None:
    """Copy every checkpoint tensor into its parameter (each rank its own rows); the export copies
    (``copy_sources``: copy -> source) are compared with their source while it is in hand."""
    keymap, params = model.keymap(), model.checkpoint_state()
    expected = {keymap.to_hf(k): k for k in params}
    copies_of: dict[str, list[str]] = {}
    for name, source in copy_sources.items():
        copies_of.setdefault(source, []).append(name)
    differing = []
    with torch.no_grad():
        for hf_key in hf_meta:
            param = params[expected[hf_key]]
            rows = _local_rows(param)
            value = read(hf_key, rows)
            if rows is None:
                copy_into(param, value)
            else:
                param.to_local().copy_(value)
            differing += [name for name in copies_of.get(hf_key, []) if not torch.equal(read(name, rows), value)]
    if differing:
        logger.warning(
            "%s: %s differ from the tensors they copy (%s); they are tied in training and will be "
            "re-written from them on save",
            where,
            _examples(differing),
            _examples(sorted({copy_sources[k] for k in differing})),
        )


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _expert_index(disk_key: str) -> int | None:
    match = _EXPERT.search(disk_key)
    return int(match.group(1)) if match else None


def _shard_dim(param: torch.Tensor) -> int | None:
    """The mesh dimension a DTensor's dim 0 is split over, all others replicating it (FSDP, HSDP); else None."""
    if not isinstance(param, DTensor) or param.dim() == 0:
        return None
    shards = [i for i, p in enumerate(param.placements) if p == Shard(0)]
    if len(shards) != 1 or not all(p.is_replicate() for i, p in enumerate(param.placements) if i != shards[0]):
        return None
    return shards[0]


def _local_rows(param: torch.Tensor) -> tuple[int, int] | None:
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


def _gather_to_writer(value: DTensor, writer: bool) -> torch.Tensor | None:
    """The full tensor on the writer (the mesh's first rank), ``None`` elsewhere: a gather, not an all-gather.

    Under HSDP only the writer's replica takes part. Rows split over several mesh dimensions (experts over
    ``ep``, each rank's experts then over ``efsdp`` by FSDP) are first made whole over all of them but
    ``ep`` (each rank then holds its share of the experts), then gathered over ``ep`` to the writer. Other
    placements fall back to ``full_tensor()``.
    """
    if _shard_dim(value) is None and any(p.is_shard(0) for p in value.placements):
        keep = max(i for i, p in enumerate(value.placements) if p.is_shard(0))  # a plain split: ep
        placements = [Shard(0) if i == keep else Replicate() for i in range(value.device_mesh.ndim)]
        value = value.redistribute(placements=placements)
    mesh, dim = value.device_mesh, _shard_dim(value)
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
    return _gather_to_writer(value, writer) if isinstance(value, DTensor) else value


class _ShardWriter:
    """Buffers tensors into safetensors files of at most ``max_bytes``, written as they fill up.

    ``stem`` names the files: ``{stem}.safetensors``, or ``{stem}-00001-of-0000N.safetensors`` and
    ``{stem}.safetensors.index.json``.
    """

    def __init__(self, directory: Path, max_bytes: int, stem: str = "model") -> None:
        self.directory, self.max_bytes, self.stem = directory, max_bytes, stem
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f".part-{len(self.files):05d}.safetensors"
        save_file(dict(sorted(self.buffer.items())), path, metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        """Name the files as transformers does: one ``model.safetensors``, or numbered shards + index."""
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.directory / f"{self.stem}.safetensors")
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self.files, start=1):
            name = f"{self.stem}-{i:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / f"{self.stem}.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )


def _export_tensors(
    model: MTPModel,
    writer: bool,
    dtype_of: Callable[[str, torch.Tensor], torch.dtype],
    select: Callable[[str], bool] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(on-disk name, tensor)`` of every tensor the export writes (on the writer only; other ranks only
    join the gathers). LoRA adapters are merged into their weights. ``select`` (in-memory HF names) keeps
    only some tensors; the others are not even gathered, and no passthrough tensor is written."""
    keymap, tied = model.keymap(), model.tied_keys()
    copies: dict[str, list[str]] = {}
    for copy_name, source in model.family.tied_export_copies(model.text_config, model.mtp_config).items():
        copies.setdefault(source, []).append(copy_name)
    factors = merge_factors(model)
    layout = getattr(model, "checkpoint_layout", None) or CheckpointLayout()
    for key, value in model.checkpoint_state().items():
        hf_key = keymap.to_hf(key)
        names = [name for name in (hf_key, *copies.get(hf_key, [])) if select is None or select(name)]
        if key in tied or not names:
            continue
        full = gather_full(value, writer)  # collective
        if key in factors:
            a, b, scaling = factors[key]
            a, b = gather_full(a, writer), gather_full(b, writer)
            full = merged(full, a, b, scaling) if writer else None
        if not writer:
            continue
        # own storage for export copies: safetensors refuses aliases
        group = {name: full.detach() if name == hf_key else full.detach().clone() for name in names}
        for disk_key, tensor in to_disk(model.backbone, group).items():
            yield layout.prefix + disk_key, tensor.to(dtype_of(disk_key, tensor)).contiguous().cpu()
    if writer and select is None:
        reader = TensorReader(layout.passthrough)
        for key in layout.passthrough:
            yield key, reader.get(key)


def save_model_state(
    model: MTPModel,
    out_dir: str | os.PathLike,
    *,
    config_dict: dict[str, Any] | None,
    disk_dtypes: dict[str, torch.dtype] | None = None,
    default_dtype: torch.dtype | None = None,
    copy_files_from: Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer: Any = None,
    writer: bool = True,
    select: Callable[[str], bool] | None = None,
    stem: str = "model",
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory, atomically, one tensor at a time.

    Sharded (FSDP2) parameters are gathered one by one to the ``writer`` rank only (a collective every
    rank joins; the others just send their shards), which converts and writes them: no other rank holds
    any full tensor, and the writer holds one full tensor plus one output shard. Tensors read from a
    checkpoint get their on-disk dtype back; new ones get ``default_dtype`` (float32 for those
    transformers keeps in float32). ``select`` and ``stem`` write only some tensors into ``{stem}*.safetensors``
    (the LoRA adapter export's MTP file); ``extra_files`` writes more files into the directory;
    ``config_dict=None`` writes no config.json.
    """
    out_dir = Path(out_dir)
    disk_dtypes = disk_dtypes or {}
    fp32 = hf_compat.fp32_module_names(model.backbone)

    def dtype_of(key: str, tensor: torch.Tensor) -> torch.dtype:
        if key in disk_dtypes:
            return disk_dtypes[key]
        if any(name in key for name in fp32):  # e.g. MoE gate bias: kept float32 like transformers does
            return torch.float32
        return default_dtype or tensor.dtype

    tensors = _export_tensors(model, writer, dtype_of, select)
    if not writer:
        for _ in tensors:
            pass
        return out_dir
    with atomic_directory(out_dir) as tmp:
        shards = _ShardWriter(tmp, max_shard_bytes, stem)
        for key, tensor in tensors:
            shards.add(key, tensor)
        shards.finish()
        if config_dict is not None:
            (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if extra_files is not None:
            extra_files(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if copy_files_from is not None:
            for f in sorted(copy_files_from.iterdir()):
                if f.is_file() and not _NOT_COPIED.fullmatch(f.name) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
    return out_dir
