"""The sweep report: a 2-job multirun gets summary.csv/.md/.png from the Hydra callback; the Pareto front."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

from mtp_recipes import report as report_module
from mtp_recipes.report import pareto_front, report

SWEEP = [
    "trainer.progress_bar=false", "trainer.max_steps=3", "data.seq_len=64", "data.batch_size=4",
    "data.max_documents=20", "eval.num_prompts=2", "eval.max_new_tokens=8",
]  # fmt: skip


def test_a_two_job_sweep_gets_its_summary(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.finetune", "-m", *SWEEP, "mtp.loss_scaling_factor=0.05,0.3",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sweep summary: {sweep / 'summary.md'}" in result.stdout

    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mtp.loss_scaling_factor"] for r in rows] == ["0.05", "0.3"]
    assert [r["label"] for r in rows] == ["loss_scaling_factor=0.05", "loss_scaling_factor=0.3"]
    for row in rows:
        job = sweep / row["job"]
        evaluation = json.loads((job / "eval.json").read_text())
        assert evaluation["checkpoint"] == str(job / "final")
        assert float(row["acceptance_length"]) == evaluation["acceptance_length"]
        assert 1 <= float(row["acceptance_length"]) <= 2
        assert float(row["heldout_main_ce"]) > 0 and float(row["heldout_mtp_ce_1"]) > 0
        assert float(row["train_tokens_per_s"]) > 0 and 0 < float(row["wall_s"]) < 900
    flags = [r["pareto"] == "True" for r in rows]
    points = [(float(r["heldout_main_ce"]), float(r["acceptance_length"])) for r in rows]
    assert flags == pareto_front([{"heldout_main_ce": c, "acceptance_length": a} for c, a in points])
    table = (sweep / "summary.md").read_text()
    assert all(f"| {n} | {r['mtp.loss_scaling_factor']} |" in table for n, r in enumerate(rows))
    assert "Every job: trainer.progress_bar=False trainer.max_steps=3" in table
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "fontManager" not in result.stdout + result.stderr and "font cache" not in result.stdout + result.stderr

    # Run again by hand: the jobs' eval.json files are reused, the summary is the same; the plot's title says
    # what was swept and what every job held
    titles = []
    monkeypatch.setattr(report_module, "_plot", lambda path, rows, title: titles.append(title))
    again = report(sweep, evaluate=False)
    assert [str(r["acceptance_length"]) for r in again] == [r["acceptance_length"] for r in rows]
    assert titles == [
        f"sweep of mtp.loss_scaling_factor (2 jobs, {sweep.parent.name} {sweep.name}) | trainer.progress_bar=False, "
        "trainer.max_steps=3, data.seq_len=64, data.batch_size=4, data.max_documents=20, eval.num_prompts=2, "
        "eval.max_new_tokens=8"
    ]


def test_pareto_front_holds_exactly_the_undominated_points():
    rng = random.Random(0)
    rows = [{"heldout_main_ce": rng.uniform(2, 3), "acceptance_length": rng.uniform(1, 2)} for _ in range(30)]
    rows.append({"heldout_main_ce": None, "acceptance_length": 1.5})  # a job that was not evaluated
    front = pareto_front(rows)
    assert front[-1] is False and any(front)

    def dominates(a, b):
        better = a["heldout_main_ce"] <= b["heldout_main_ce"] and a["acceptance_length"] >= b["acceptance_length"]
        return better and a != b

    scored = rows[:-1]
    for row, on_front in zip(scored, front, strict=False):
        assert on_front == (not any(dominates(other, row) for other in scored))
