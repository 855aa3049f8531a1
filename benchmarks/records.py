"""Read a run's ``metrics.jsonl`` by record kind, the one reader every benchmark uses.

A run writes one ``split: train`` record per optimizer step and, with held-out data, ``split: eval`` records
(validation, no throughput); reading by position mixes them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def records(run_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    """The ``split`` records of ``run_dir/metrics.jsonl``, in step order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    found = [r for r in map(json.loads, lines) if r.get("split") == split]
    if not found:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no split={split!r} record")
    return found


def median_tokens_per_s(run_dir: Path, skip: int = 5) -> float:
    """Median training throughput after the first ``skip`` steps (at most half of them: warm-up and compiles)."""
    train = records(run_dir, "train")
    return statistics.median(r["tokens_per_s"] for r in train[min(skip, len(train) // 2) :])


if __name__ == "__main__":  # python benchmarks/records.py RUN_DIR [SKIP]: the median tokens/s, for shell scripts
    import sys

    print(f"{median_tokens_per_s(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 5):.0f}")
