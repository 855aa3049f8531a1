"""Every benchmark's smoke run, one after another in one Python process: ``python tests/run_benchmarks.py OUT``.

Each script runs as ``python benchmarks/<script> <flag> ... --out OUT/<stem>`` would run it (``sys.argv``, the
script's folder first on ``sys.path``, executed as ``__main__``), so the interpreter and torch start once for all
of them. ``OUT/status.json`` says, per script, whether it finished and, if not, the end of its traceback.
"""

from __future__ import annotations

import json
import runpy
import sys
import traceback
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# script -> (its smoke flag as docs/benchmarks.md gives it, extra flags that only shorten timing loops); the
# drift experiment last, since it runs the finetune and evaluate commands (Hydra) in this process
SMOKE = {
    "bench_loss.py": ("--small", ["--depths", "0", "1", "--warmup", "1", "--iters", "1"]),
    "bench_step.py": ("--small", ["--batch", "1", "--warmup", "1", "--iters", "1"]),
    "bench_mamba.py": ("--small", []),
    "bench_train.py": ("--quick", []),
    "bench_lora.py": ("--quick", []),
    "bench_frozen_dtype.py": ("--quick", []),
    "bench_drift.py": ("--quick", []),
}


def output(root: Path, script: str) -> Path:
    """Where a script's ``--out`` points: a directory for the drift experiment, else a JSON file."""
    stem = script.removesuffix(".py")
    return root / stem if script == "bench_drift.py" else root / f"{stem}.json"


def run(script: str, root: Path) -> dict[str, object]:
    flag, shorter = SMOKE[script]
    saved = sys.argv, list(sys.path)
    sys.argv = [str(BENCHMARKS / script), flag, *shorter, "--out", str(output(root, script))]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
        return {"ok": True}
    except SystemExit as e:
        return {"ok": e.code in (0, None), "error": f"exit {e.code}"}
    except Exception:  # noqa: BLE001 - every failure is reported, per script
        return {"ok": False, "error": traceback.format_exc()[-3000:]}
    finally:
        sys.argv, sys.path[:] = saved


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    status = {}
    for script in SMOKE:
        status[script] = run(script, out)
        (out / "status.json").write_text(json.dumps(status, indent=2))
