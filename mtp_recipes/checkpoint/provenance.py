"""Where a model's tensors came from: what an export needs from the checkpoint it was loaded from.

One value, kept beside the model and written into every resume checkpoint, so that a resume (which never opens
the source's tensor files) exports exactly what a run that loaded the source would: each tensor's on-disk dtype,
how a multimodal checkpoint nests the language model, the tensors outside it that are copied
through verbatim, and whether the source was block-scaled FP8 (then the export is BF16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_recipes.checkpoint.nesting import TEXT, Nesting


@dataclass
class Provenance:
    """The source of a loaded model; empty for a model built from scratch."""

    source_dir: Path | None = None
    source_config: dict[str, Any] | None = None  # the source's config.json, unknown fields included
    disk_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # on-disk name -> dtype on disk
    nesting: Nesting = TEXT  # how a VL checkpoint nests the language model (Family.checkpoint_nestings)
    passthrough: dict[str, Path] = field(default_factory=dict)  # the other towers' tensors -> their file
    dequantized: bool = False  # loaded from block-scaled FP8: exported in bfloat16

    def export_json(self) -> dict[str, Any]:
        """What an export takes from the source, as JSON (resume checkpoints keep it)."""
        return {
            "disk_dtypes": {k: str(v).removeprefix("torch.") for k, v in self.disk_dtypes.items()},
            "nesting": self.nesting.as_json(),
            "passthrough": {k: str(f) for k, f in self.passthrough.items()},
            "dequantized": self.dequantized,
        }

    def restore_export_json(self, saved: dict[str, Any]) -> None:
        """The inverse of :meth:`export_json` (the source dir and config are the run's own)."""
        self.disk_dtypes = {k: getattr(torch, v) for k, v in saved["disk_dtypes"].items()}
        # Checkpoints written before nestings had names record the stripped prefix only.
        self.nesting = Nesting.from_json(saved["nesting"]) if "nesting" in saved else Nesting(saved["prefix"])
        self.passthrough = {k: Path(f) for k, f in saved["passthrough"].items()}
        self.dequantized = saved["dequantized"]
