"""Training memory of LoRA (``lora.rank``) against full fine-tuning and ``mtp.train_only``, on the debug recipes.

For every debug model and run kind, the real recipe is set up on the CPU with bf16 compute (what nothing trains is
then held in bf16, as on a GPU) and trains one step; then it prints a markdown table of the trainable parameters,
the bytes of all parameters, of their gradients (one per trainable parameter, in its dtype) and of the AdamW state
read from the optimizer after that step, and writes the rows as JSON to ``--out``. Run from the repository root:
``python benchmarks/bench_lora.py`` (``--quick``: the first debug model, full fine-tune and LoRA with MTP full).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mtp_recipes.config import CONFIG_DIR
from mtp_recipes.recipe import FinetuneRecipe

MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*_debug.yaml"))
COMMON = [
    "trainer.device=cpu",
    "trainer.precision=bf16",
    "trainer.max_steps=1",
    "trainer.save_final=false",
    "trainer.progress_bar=false",
    "data.seq_len=64",
    "data.batch_size=2",
    "data.max_documents=20",
    "data.eval_fraction=0",
]
RUNS = {
    "full fine-tune": [],
    "mtp.train_only": ["mtp.train_only=true"],
    "LoRA r=8, MTP full": ["lora.rank=8", "lora.mtp=full"],
    "LoRA r=8, MTP LoRA": ["lora.rank=8", "lora.mtp=lora"],
}
MIB = 2**20


def measure(model: str, overrides: list[str]) -> tuple[int, int, int, int]:
    """(trainable parameters, parameter bytes, gradient bytes, AdamW state bytes) after one training step."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=[f"model={model}", *COMMON, *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        recipe = FinetuneRecipe(cfg, run_dir)
        recipe.setup()
        recipe.train()
        recipe.cleanup()
    params = list(recipe.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [t for s in recipe.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return (
        sum(p.numel() for p in trainable),
        sum(p.numel() * p.element_size() for p in params),
        sum(p.numel() * p.element_size() for p in trainable),
        sum(t.numel() * t.element_size() for t in state),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one debug model, two runs")
    parser.add_argument("--out", type=Path, default=Path("bench_results/lora.json"))
    args = parser.parse_args()
    models, runs = (MODELS[:1], dict(list(RUNS.items())[::2])) if args.quick else (MODELS, RUNS)
    logging.getLogger("mtp_recipes").setLevel(logging.WARNING)
    print("| debug model | run | trainable params | parameters | gradients | AdamW state | total |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for model in models:
        for name, overrides in runs.items():
            trainable, params, grads, state = measure(model, overrides)
            total = params + grads + state
            rows.append(
                {"model": model, "run": name, "trainable_params": trainable, "parameter_bytes": params}
                | {"gradient_bytes": grads, "adamw_state_bytes": state, "total_bytes": total}
            )
            print(
                f"| `{model}` | {name} | {trainable / 1e3:.1f}k | {params / MIB:.2f} MiB | {grads / MIB:.2f} MiB "
                f"| {state / MIB:.2f} MiB | {total / MIB:.2f} MiB |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
