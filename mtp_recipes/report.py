"""``python -m mtp_recipes.report MULTIRUN_DIR``: compare the jobs of a sweep, whatever field it swept.

For every job directory of a Hydra multirun (``<n>_<overrides>/``) that finished its ``final/`` export, the
export is evaluated (:mod:`mtp_recipes.measure_acceptance`, with the job's own config and ``mtp.init=from_checkpoint``)
unless the job already holds an ``eval.json``. Then ``MULTIRUN_DIR`` gets

* ``summary.csv`` and ``summary.md``: one row per job: its overrides (one column per overridden field), the
  final held-out main and per-depth CE (the job's last validation record in ``metrics.jsonl``, else the
  evaluation's reference CE), the exact greedy acceptance length and per-position rates from ``eval.json``, the
  training tokens/s (median over steps), generation tokens/s, wall time (from Hydra's start of the job to its
  last metrics record or export), and whether the job is on the Pareto front;
* ``summary.png``: held-out main CE against acceptance length, one labelled point per job, the Pareto front
  (no other job has both a lower CE and a longer acceptance) joined by a line, titled with what the sweep varied
  and held.

:class:`SweepReport` runs this at the end of every ``finetune`` multirun (registered in ``configs/finetune.yaml``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtp_recipes.drawing import pyplot
from mtp_recipes.errors import MTPRecipesError

log = logging.getLogger("mtp_recipes")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a multirun (those Hydra wrote ``.hydra/overrides.yaml`` into), by job number."""
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda job: (_job_number(job), job.name))


def _job_number(job: Path) -> int:
    prefix = job.name.partition("_")[0]
    return int(prefix) if prefix.isdigit() else -1


def evaluate_job(job: Path) -> dict[str, Any] | None:
    """The job's ``eval.json`` record, evaluating its ``final/`` export first when there is none yet."""
    path = job / "eval.json"
    if path.exists():
        return json.loads(path.read_text())
    if not (job / "final").is_dir() or not (job / "config.yaml").exists():
        return None
    from mtp_recipes.config import to_schema
    from mtp_recipes.measure_acceptance import VerificationError, evaluate  # torch loads here

    cfg = OmegaConf.load(job / "config.yaml")
    cfg.model.path = str(job / "final")
    cfg.mtp.init = "from_checkpoint"  # the export holds every trained depth
    log.info("report: evaluating %s", job / "final")
    try:
        return evaluate(to_schema(cfg), path)
    except (MTPRecipesError, VerificationError) as e:
        log.warning("report: %s not evaluated: %s", job.name, e)
        return None


def _records(job: Path) -> list[dict[str, Any]]:
    path = job / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return records


def job_row(job: Path, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """One summary row (see the module docstring); missing values are None."""
    overrides = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
    records = _records(job)
    train = [r for r in records if r.get("split", "train") == "train"]
    validation = [r for r in records if r.get("split") == "eval"]
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides), **values, "values": values}
    if validation:
        last = validation[-1]
        row["heldout_main_ce"] = last["main_ce"]
        row.update({k.replace("mtp_ce", "heldout_mtp_ce"): v for k, v in last.items() if k.startswith("mtp_ce_")})
    elif evaluation and evaluation.get("reference_main_ce") is not None:
        row["heldout_main_ce"] = evaluation["reference_main_ce"]
        row.update({f"heldout_mtp_ce_{k}": v for k, v in enumerate(evaluation["reference_mtp_ce"], start=1)})
    else:
        row["heldout_main_ce"] = None
    if evaluation:
        row["acceptance_length"] = evaluation["acceptance_length"]
        row.update({f"acceptance_rate_{j}": r for j, r in enumerate(evaluation["acceptance_rates"], start=1)})
        row["generate_tokens_per_s"] = evaluation["tokens_per_s"]
    else:
        row["acceptance_length"] = None
    row["train_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in train) if train else None
    row["wall_s"] = _wall_time(job)
    return row


def _wall_time(job: Path) -> float | None:
    """Seconds from Hydra's start of the job to its last metrics record or export."""
    start = job / ".hydra" / "config.yaml"
    ends = [p for p in (job / "metrics.jsonl", job / "final" / "config.json") if p.exists()]
    return max(p.stat().st_mtime for p in ends) - start.stat().st_mtime if ends and start.exists() else None


def pareto_front(rows: list[dict[str, Any]]) -> list[bool]:
    """True for rows no other row beats on both held-out main CE (lower) and acceptance length (higher)."""
    points = [(r["heldout_main_ce"], r["acceptance_length"]) for r in rows]
    front = []
    for ce, length in points:
        if ce is None or length is None:
            front.append(False)
            continue
        beaten = any(
            c is not None and a is not None and c <= ce and a >= length and (c < ce or a > length) for c, a in points
        )
        front.append(not beaten)
    return front


def report(sweep_dir: str | Path, evaluate: bool = True) -> list[dict[str, Any]]:
    """Evaluate the sweep's jobs (unless ``evaluate`` is False) and write summary.csv, summary.md, summary.png."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise SystemExit(f"error: {sweep_dir} holds no job directory of a Hydra multirun (*/.hydra/overrides.yaml)")
    rows = []
    for job in jobs:
        evaluation = evaluate_job(job) if evaluate else _read_json(job / "eval.json")
        rows.append(job_row(job, evaluation))
    for row, front in zip(rows, pareto_front(rows), strict=True):
        row["pareto"] = front
    overridden = list(dict.fromkeys(k for row in rows for k in row.pop("values")))
    swept = [k for k in overridden if len({row.get(k) for row in rows}) > 1]
    for row in rows:
        row["label"] = ", ".join(f"{k.rsplit('.', 1)[-1]}={row.get(k)}" for k in swept) or row["job"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    fixed = [f"{k}={rows[0][k]}" for k in overridden if k not in swept]
    measured = [c for c in columns if c not in (*overridden, "job", "overrides", "label")]
    (sweep_dir / "summary.md").write_text(_markdown(sweep_dir, rows, swept, fixed, measured))
    _plot(sweep_dir / "summary.png", rows, _title(sweep_dir, swept, fixed, len(rows)))
    return rows


def _title(sweep_dir: Path, swept: list[str], fixed: list[str], jobs: int) -> str:
    """What the sweep varied and held, and when it ran (``runs/multirun/<date>/<time>``)."""
    varied = ", ".join(swept) or "nothing"
    held = f" | {', '.join(fixed)}" if fixed else ""
    return f"sweep of {varied} ({jobs} jobs, {sweep_dir.parent.name} {sweep_dir.name}){held}"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _markdown(
    sweep_dir: Path, rows: list[dict[str, Any]], swept: list[str], fixed: list[str], measured: list[str]
) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = ["job", *swept, *measured]
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"Every job: {' '.join(fixed) or '(no other override)'}. Held-out CE: the last validation record of each "
        "job (else the evaluation's reference CE). Acceptance length: exact greedy speculative decoding with every "
        "MTP depth drafting (`python -m mtp_recipes.evaluate`). Pareto: no other job has both a lower held-out "
        "main CE and a longer acceptance length. Wall time: from the job's start to its last record or export "
        "(the first job of a sweep also pays the process's imports).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *(
            "| " + " | ".join(cell(_job_number_or_name(row) if c == "job" else row.get(c)) for c in columns) + " |"
            for row in rows
        ),
    ]
    return "\n".join(lines) + "\n"


def _job_number_or_name(row: dict[str, Any]) -> str:
    prefix = row["job"].partition("_")[0]
    return prefix if prefix.isdigit() else row["job"]


def _plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    plt = pyplot()
    points = [r for r in rows if r["heldout_main_ce"] is not None and r["acceptance_length"] is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in points:
        ax.scatter(r["acceptance_length"], r["heldout_main_ce"], color="C1" if r["pareto"] else "C0", zorder=3)
        ax.annotate(r["label"], (r["acceptance_length"], r["heldout_main_ce"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)  # fmt: skip
    front = sorted((r["acceptance_length"], r["heldout_main_ce"]) for r in points if r["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), "-o", color="C1", label="Pareto front", zorder=2)
        ax.legend()
    ax.set_xlabel("acceptance length (tokens per backbone forward, greedy)")
    ax.set_ylabel("held-out main CE")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepReport(Callback):
    """At the end of a ``finetune`` multirun, evaluate every job and write the sweep's summary (this module)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.job.name != "finetune":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        report(sweep_dir)
        print(f"sweep summary: {sweep_dir / 'summary.md'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (runs/multirun/<date>/<time>)")
    parser.add_argument("--no-evaluate", action="store_true", help="use existing eval.json files only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report(args.sweep_dir, evaluate=not args.no_evaluate)
    print(Path(args.sweep_dir) / "summary.md")


if __name__ == "__main__":
    main(sys.argv[1:])
