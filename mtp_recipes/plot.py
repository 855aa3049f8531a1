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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's metrics into a PNG (default ``RUN_DIR/metrics.png``) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install 'mtp_recipes[plot]'") from None
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise SystemExit(f"error: {metrics} does not exist; pass a run directory of mtp_recipes.finetune")
    records, validation = {}, {}
    for r in map(json.loads, metrics.read_text().splitlines()):  # the last record per step and split
        (validation if r.get("split") == "eval" else records)[r["step"]] = r
    steps = sorted(records)
    rows = [records[s] for s in steps]
    held = [validation[s] for s in sorted(validation)]
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in rows[0] if k.startswith("mtp_ce_"))

    fig, (losses, speed) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot(steps, [r["main_ce"] for r in rows], label="main CE")
    if held:
        losses.plot([r["step"] for r in held], [r["main_ce"] for r in held], "ko", label="held-out main CE")
    for k in depths:
        losses.plot(steps, [r[f"mtp_ce_{k}"] for r in rows], label=f"MTP depth {k} CE")
    losses.set_xlabel("step")
    losses.set_ylabel("cross-entropy")
    losses.legend()
    for k in depths:
        speed.plot(steps, [r[f"mtp_acc_{k}"] for r in rows], label=f"depth {k} accuracy")
    if depths:
        twin = speed.twinx()
        twin.plot(steps, [r["acceptance_length"] for r in rows], "k--", label="acceptance length")
        if held:
            twin.plot([r["step"] for r in held], [r["acceptance_length"] for r in held], "ko", label="held-out")
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
