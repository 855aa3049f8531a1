"""Parameter memory of a frozen backbone (``mtp.train_only``): fp32 masters vs the bf16 compute dtype.

Builds every debug model on the meta device (no memory touched), once as an fp32 ``train_only`` run holds it
and once as a bf16-compute ``train_only`` run does (``frozen_dtype=bfloat16``), and prints a markdown table of
the backbone's parameter bytes next to the trainable (MTP, fp32) bytes. Run from the repository root:
``python benchmarks/bench_frozen_dtype.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from mtp_recipes.model import MTPModel

MODELS = Path(__file__).resolve().parents[1] / "configs" / "model"


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    print("| debug model | backbone params | backbone, train_only, fp32 compute | bf16 compute | trainable (fp32) |")
    print("|---|---|---|---|---|")
    for path in sorted(MODELS.glob("*_debug.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["config"]
        sizes = []
        for frozen_dtype in (None, torch.bfloat16):
            with torch.device("meta"):
                model = MTPModel.from_config(config, train_only=True, frozen_dtype=frozen_dtype)
            sizes.append(parameter_bytes(model.backbone))
        count = sum(p.numel() for p in model.backbone.parameters())
        fp32, bf16 = (s / 2**20 for s in sizes)
        print(
            f"| `{path.stem}` | {count / 1e6:.2f}M | {fp32:.2f} MiB | {bf16:.2f} MiB ({bf16 / fp32:.2f}x) "
            f"| {parameter_bytes(model.mtp) / 2**20:.2f} MiB |"
        )


if __name__ == "__main__":
    main()
