"""Parameter memory of a frozen backbone (``mtp.train_only``): fp32 masters vs the bf16 compute dtype.

Builds every debug model on the meta device (no memory touched), once as an fp32 ``train_only`` run holds it
and once as a bf16-compute ``train_only`` run does (``frozen_dtype=bfloat16``), and prints a markdown table of
the backbone's parameter bytes next to the trainable (MTP, fp32) bytes, and writes them as JSON to ``--out``. Run
from the repository root: ``python benchmarks/bench_frozen_dtype.py`` (``--quick``: the first debug model only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mtp_recipes.model import MTPModel

MODELS = Path(__file__).resolve().parents[1] / "configs" / "model"


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: the first debug model only")
    parser.add_argument("--out", type=Path, default=Path("bench_results/frozen_dtype.json"))
    args = parser.parse_args()
    paths = sorted(MODELS.glob("*_debug.yaml"))[: 1 if args.quick else None]
    print("| debug model | backbone params | backbone, train_only, fp32 compute | bf16 compute | trainable (fp32) |")
    print("|---|---|---|---|---|")
    rows = []
    for path in paths:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["config"]
        sizes = []
        for frozen_dtype in (None, torch.bfloat16):
            with torch.device("meta"):
                model = MTPModel.from_config(config, train_only=True, frozen_dtype=frozen_dtype)
            sizes.append(parameter_bytes(model.backbone))
        count = sum(p.numel() for p in model.backbone.parameters())
        row = {
            "model": path.stem,
            "backbone_params": count,
            "backbone_bytes_fp32": sizes[0],
            "backbone_bytes_bf16": sizes[1],
            "bf16_over_fp32": sizes[1] / sizes[0],
            "trainable_bytes": parameter_bytes(model.mtp),
        }
        rows.append(row)
        fp32, bf16 = (s / 2**20 for s in sizes)
        print(
            f"| `{path.stem}` | {count / 1e6:.2f}M | {fp32:.2f} MiB | {bf16:.2f} MiB ({row['bf16_over_fp32']:.2f}x) "
            f"| {row['trainable_bytes'] / 2**20:.2f} MiB |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
