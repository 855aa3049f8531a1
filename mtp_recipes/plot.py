"""``python -m mtp_recipes.plot RUN_DIR``: loss curves and the MTP metrics that predict serving speed.

Reads ``RUN_DIR/metrics.jsonl`` and writes ``RUN_DIR/metrics.png``: main CE and each depth's CE, then
per-depth accuracy and the expected acceptance length (1 + Σ_k c_k); validation records (``split: eval``),
when there are any, as markers. Needs the ``plot`` extra (``pip install 'mtp_recipes[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mtp_recipes.drawing import pyplot

Curve = tuple[list[int], list[float]]


def curves(records: list[dict[str, Any]]) -> dict[str, dict[str, Curve]]:
    """The lines the plot draws, ``{panel: {label: (steps, values)}}``: training records (``split: train``, the
    last one per step) as lines, validation records (``split: eval``) as their own series, never mixed."""
    train, held = {}, {}
    for r in records:
        (held if r.get("split") == "eval" else train)[r["step"]] = r
    steps, rows = sorted(train), [train[s] for s in sorted(train)]
    held_steps, held_rows = sorted(held), [held[s] for s in sorted(held)]
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in rows[0] if k.startswith("mtp_ce_"))
    loss = {"main CE": (steps, [r["main_ce"] for r in rows])}
    loss |= {f"MTP depth {k} CE": (steps, [r[f"mtp_ce_{k}"] for r in rows]) for k in depths}
    accuracy = {f"depth {k} accuracy": (steps, [r[f"mtp_acc_{k}"] for r in rows]) for k in depths}
    acceptance = {"acceptance length": (steps, [r["acceptance_length"] for r in rows])} if depths else {}
    if held_rows:
        loss["held-out main CE"] = (held_steps, [r["main_ce"] for r in held_rows])
        if depths:
            acceptance["held-out"] = (held_steps, [r["acceptance_length"] for r in held_rows])
    return {"loss": loss, "accuracy": accuracy, "acceptance": acceptance}


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's metrics (:func:`curves`) into a PNG (default ``RUN_DIR/metrics.png``) and return its path."""
    plt = pyplot()
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise SystemExit(f"error: {metrics} does not exist; pass a run directory of mtp_recipes.finetune")
    lines = curves([json.loads(line) for line in metrics.read_text().splitlines()])

    fig, (losses, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (x, y) in lines["loss"].items():
        losses.plot(x, y, "ko" if label.startswith("held-out") else "-", label=label)
    losses.set_xlabel("step")
    losses.set_ylabel("cross-entropy")
    losses.legend()
    for label, (x, y) in lines["accuracy"].items():
        speed.plot(x, y, label=label)
    if lines["acceptance"]:
        twin = speed.twinx()
        for label, (x, y) in lines["acceptance"].items():
            twin.plot(x, y, "ko" if label.startswith("held-out") else "k--", label=label)
        twin.set_ylabel("expected acceptance length")
        twin.legend(loc="lower right")
    speed.set_xlabel("step")
    speed.set_ylabel("top-1 accuracy")
    speed.legend(loc="upper left")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main(sys.argv[1:])
