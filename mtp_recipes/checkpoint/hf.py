"""Hugging Face checkpoint files: reading tensors (whole or some rows), writing a directory.

transformers drops every MTP tensor on load, so the safetensors files are read and written here, MTP tensors
included: names, layouts and dtypes are the caller's business (:mod:`mtp_recipes.checkpoint.load`,
:mod:`mtp_recipes.checkpoint.export`). Only safetensors are read; pickle files are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtp_recipes.checkpoint.atomic import atomic_directory
from mtp_recipes.checkpoint.locate import CONFIG_NAME
from mtp_recipes.errors import CheckpointError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|model\.safetensors\.index\.json|config\.json")


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


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    config_dict: dict[str, Any] | None,
    copy_files_from: Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer: Any = None,
    stem: str = "model",
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint directory atomically, tensor by tensor as ``tensors`` yields them
    (``(on-disk name, tensor)``), into ``{stem}*.safetensors`` files of at most ``max_shard_bytes``.

    ``config_dict=None`` writes no config.json; ``extra_files`` writes more files into the directory;
    ``copy_files_from`` copies the other files of a source checkpoint (tokenizer, generation config, code
    files) that nothing else wrote.
    """
    out_dir = Path(out_dir)
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
