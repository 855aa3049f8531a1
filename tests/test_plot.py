"""The plotting command draws a run's metrics into a PNG."""

from __future__ import annotations

import json

import pytest

from mtp_recipes.plot import curves, plot_run


def test_plot_writes_a_png_with_every_depth(tmp_path):
    records = [
        {
            "step": s,
            "main_ce": 5 - 0.1 * s,
            "mtp_ce_1": 6 - 0.1 * s,
            "mtp_ce_2": 6.5 - 0.1 * s,
            "mtp_acc_1": 0.01 * s,
            "mtp_acc_2": 0.005 * s,
            "acceptance_length": 1 + 0.012 * s,
        }
        for s in range(1, 11)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    path = plot_run(tmp_path)
    assert path == tmp_path / "metrics.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_metrics_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        plot_run(tmp_path)


def test_plot_keeps_validation_records_apart(tmp_path):
    train = [{"step": s, "split": "train", "main_ce": 5 - 0.1 * s, "mtp_ce_1": 6 - 0.1 * s, "mtp_acc_1": 0.01 * s,
              "acceptance_length": 1 + 0.01 * s} for s in range(1, 11)]  # fmt: skip
    held = [{"step": s, "split": "eval", "main_ce": 5.2 - 0.1 * s, "acceptance_length": 1 + 0.009 * s} for s in (5, 10)]
    records = train[:5] + held[:1] + train[5:] + held[1:]
    lines = curves(records)
    steps = list(range(1, 11))
    assert lines["loss"]["main CE"] == (steps, [r["main_ce"] for r in train])
    assert lines["loss"]["MTP depth 1 CE"] == (steps, [r["mtp_ce_1"] for r in train])
    assert lines["loss"]["held-out main CE"] == ([5, 10], [r["main_ce"] for r in held])
    assert lines["acceptance"]["acceptance length"] == (steps, [r["acceptance_length"] for r in train])
    assert lines["acceptance"]["held-out"] == ([5, 10], [r["acceptance_length"] for r in held])
    assert lines["accuracy"] == {"depth 1 accuracy": (steps, [r["mtp_acc_1"] for r in train])}
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    assert plot_run(tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
