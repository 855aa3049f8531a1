"""Every script in benchmarks/ runs as docs/benchmarks.md gives it, in its smoke mode, and writes the fields the doc
reads; the GPU checks call nothing else."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.run_benchmarks import SMOKE, output

BENCHMARKS = ROOT / "benchmarks"


def check_drift(out) -> None:
    results = json.loads((out / "results.json").read_text())
    assert {"pretrain_steps", "finetune_steps", "seeds", "eval", "wall_s"} <= set(results["settings"])
    names = [r["row"] for r in results["rows"]]
    assert names[0].startswith("base") and any("frozen" in n for n in names) and any("λ = 0.1" in n for n in names)
    for row in results["rows"]:
        for domain in ("new", "old"):
            assert set(row[domain]) == {"acceptance", "teacher_forced", "main_ce"}
            assert row[domain]["acceptance"] >= 1 and row[domain]["main_ce"] > 0
    assert (out / "table.md").read_text().count("\n") == len(names) + 2


def check_loss(report) -> None:
    assert report["impl"] in ("torch", "fused", "compiled")
    assert [r["depths"] for r in report["rows"]] == [0, 1]
    for row in report["rows"]:
        for name in ("floor", "materialised", "ours"):
            assert row[name]["ms"] > 0 and "peak_gb_above_inputs" in row[name]
        assert row["ours"]["x_floor"] == pytest.approx(row["ours"]["ms"] / row["floor"]["ms"])


def check_step(report) -> None:
    assert {r["model"] for r in report["rows"]} == {"ours D=0", "ours D=1", "hf"}
    for row in report["rows"]:
        assert {"batch", "ms", "tokens_per_s", "mfu", "peak_gb"} <= set(row) and row["tokens_per_s"] > 0
    (overhead,) = report["mtp_overhead"]
    assert overhead["measured"] > 0 and overhead["flop_predicted"] > 1
    assert report["speedup_over_hf"][0]["ours_d1_over_hf"] > 0 and report["scan_backend"]


def check_mamba(report) -> None:
    for name in ("theirs_unpacked", "ours_unpacked", "ours_packed"):
        assert report[name]["seconds_median"] > 0 and report[name]["saved_for_backward_bytes"] > 0
    assert report["ratio_ours_over_theirs"] > 0 and report["memory_ratio_ours_over_theirs"] > 0


def check_train(report) -> None:
    assert set(report["tokens_per_s"]) == {"p1_d0", "p1_d1"} and min(report["tokens_per_s"].values()) > 0
    assert report["mtp_overhead_p1"] > 0 and report["predicted_mtp_overhead"] > 1


def check_lora(report) -> None:
    assert [r["run"] for r in report["rows"]] == ["full fine-tune", "LoRA r=8, MTP full"]
    full, lora = report["rows"]
    assert lora["trainable_params"] < full["trainable_params"]
    for row in report["rows"]:
        parts = row["parameter_bytes"] + row["gradient_bytes"] + row["adamw_state_bytes"]
        assert row["total_bytes"] == parts


def check_frozen_dtype(report) -> None:
    (row,) = report["rows"]
    assert row["backbone_bytes_bf16"] * 2 == pytest.approx(row["backbone_bytes_fp32"], rel=0.01)
    assert row["trainable_bytes"] > 0 and row["backbone_params"] > 0


CHECKS = {
    "bench_drift.py": check_drift,
    "bench_loss.py": check_loss,
    "bench_step.py": check_step,
    "bench_mamba.py": check_mamba,
    "bench_train.py": check_train,
    "bench_lora.py": check_lora,
    "bench_frozen_dtype.py": check_frozen_dtype,
}


def test_every_benchmark_has_a_smoke_run_here():
    assert sorted(SMOKE) == sorted(p.name for p in BENCHMARKS.glob("bench_*.py")) == sorted(CHECKS)
    documented = (ROOT / "docs" / "benchmarks.md").read_text()
    for script, (flag, _) in SMOKE.items():
        assert f"python benchmarks/{script} {flag}" in documented, script


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[Path, dict]:
    """Every smoke run, in one process started for them (tests/run_benchmarks.py), and its status per script."""
    root = tmp_path_factory.mktemp("benchmarks")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "run_benchmarks.py"), str(root)], capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, json.loads((root / "status.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_the_smoke_run_writes_what_the_doc_reads(script, smoke_runs):
    root, status = smoke_runs
    assert status[script]["ok"], status[script].get("error")
    out = output(root, script)
    CHECKS[script](out if out.is_dir() else json.loads(out.read_text()))


def test_metrics_are_read_by_split(tmp_path):
    """Validation records carry no throughput; the shared reader never mistakes them for training steps."""
    lines = [{"step": s, "split": "train", "tokens_per_s": 100.0 * s} for s in range(1, 9)]
    lines.insert(4, {"step": 4, "split": "eval", "main_ce": 3.0})
    lines.append({"step": 8, "split": "eval", "main_ce": 2.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "records.py"), str(tmp_path), "2"], capture_output=True, text=True
    )
    assert result.stdout == "550\n"  # median of steps 3..8


def test_gpu_checks_call_only_smoke_tested_benchmarks():
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    called = set(re.findall(r"benchmarks/([\w.]+\.py)", script))
    assert called and called <= set(SMOKE) | {"records.py"}
    assert "json.loads" not in script  # metrics are read through benchmarks/records.py
