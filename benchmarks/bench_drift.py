"""The drift experiment: what fine-tuning without training the MTP heads costs, and what training them gets back.

A debug-size Nemotron-H with D = 2 MTP steps (one physical depth applied twice, as Nemotron-3 Super is served)
is pretrained on one corpus (Shakespeare's plays), then fine-tuned on another (CPython's documentation) with the
same number of steps in every row:

* ``frozen``: the backbone fine-tuned with λ = 0 and the pretrained MTP depth put back into the export, which
  is what a user gets from a framework that drops or ignores the MTP weights and re-attaches the original ones;
* ``λ=0.05 / 0.1 / 0.3``: backbone and MTP trained together (one ``finetune`` multirun and its report);
* ``frozen + train_only``: the ``frozen`` checkpoint, then as many ``mtp.train_only`` steps (heads re-fitted);
* ``self`` / ``mix``: λ = 0.1 with ``mtp.targets=self`` / ``mix`` (the backbone's own distribution as target);
* ``depth_decay``: λ = 0.1 with ``mtp.depth_decay=0.6`` (step 2 weighs 0.6 of step 1, as vLLM's speculators do).

Every row (and the pretrained base) is measured with ``python -m mtp_recipes.evaluate`` on held-out text of the
new domain and of the old one: the exact greedy acceptance length with 2 drafts, the teacher-forced acceptance
estimate on the held-out reference text, and the held-out main CE. Each fine-tuning row runs once per seed.

Every step is a ``finetune`` / ``evaluate`` command line (printed as it runs, logged under ``--out``); a step
whose output exists is reused, so an interrupted run continues where it stopped. Run from the repository root::

    python benchmarks/bench_drift.py                  # about an hour on a shared 2-core CPU
    python benchmarks/bench_drift.py --quick          # smoke run: tiny step counts and evaluations, one seed, one λ,
                                                      # no targets/decay rows, the commands run in this process

On two or more cores the seeds can run side by side (``--seeds 0`` and ``--seeds 1`` in two processes with the same
``--out``, after the base exists); a last run with both seeds then only collects the table.

It writes ``results.json`` and ``table.md`` into ``--out`` (default ``bench_results/drift``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import runpy
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MTP = ["mtp.num_layers=2", "mtp.use_repeated_layer=true"]
QUIET = ["trainer.progress_bar=false", "trainer.device=cpu", "trainer.log_every=50"]
EVAL = ["eval.num_prompts=32", "eval.prompt_tokens=64", "eval.max_new_tokens=32"]
QUICK_EVAL = ["eval.num_prompts=2", "eval.prompt_tokens=16", "eval.max_new_tokens=4"]
QUICK_DATA = ["data.max_documents=200"]  # validation and evaluation read the held-out 10 % of these only
DOMAINS = {"new": "pydoc", "old": "shakespeare"}


def write_corpora(data_dir: Path, block_chars: int = 1200) -> dict[str, Path]:
    """Both builtin corpora as JSON Lines of ~``block_chars``-character blocks of whole paragraphs.

    The builtins hold one row per play or topic (38 and 79 rows); blocks give the held-out split (10 % of rows,
    by content hash) enough rows for 32 evaluation prompts in each domain.
    """
    from mtp_recipes.data.sources import load_source

    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in DOMAINS.values():
        path = data_dir / f"{name}.jsonl"
        paths[name] = path
        if path.exists():
            continue
        rows = []
        for document in load_source(f"builtin:{name}")["text"]:
            block: list[str] = []
            for paragraph in (p for p in document.split("\n\n") if p.strip()):
                block.append(paragraph)
                if sum(map(len, block)) >= block_chars:
                    rows.append("\n\n".join(block))
                    block = []
            if block:
                rows.append("\n\n".join(block))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
        tmp.rename(path)
    return paths


def in_process(argv: list[str], log: Any) -> int:
    """``[python, -m, module, *args]`` run as ``__main__`` in this process, its output into ``log``; the exit code."""
    module, args = argv[2], argv[3:]
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved


@dataclass(frozen=True)
class Runner:
    """How the experiment's commands run: in a process of their own (the real run) or in this one (``--quick``), and
    the ``evaluate`` settings."""

    in_process: bool = False
    eval: tuple[str, ...] = tuple(EVAL)
    data: tuple[str, ...] = ()  # data settings for every command

    def run(self, argv: list[str], log: Path) -> None:
        """Run one command line, its output into ``log``; exit with its log's tail when it fails."""
        print("$", shlex.join(argv), flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            if self.in_process:
                code = in_process(argv, f)
            else:
                code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
        if code:
            sys.exit(f"failed ({code}): {shlex.join(argv)}\n" + "".join(log.read_text().splitlines(True)[-20:]))

    def finetune(self, run_dir: Path, overrides: list[str]) -> Path:
        """A ``finetune`` run into ``run_dir`` (skipped when its ``final/`` export exists); returns the export."""
        final = run_dir / "final"
        if not final.is_dir():
            self.run(
                [sys.executable, "-m", "mtp_recipes.finetune", f"hydra.run.dir={run_dir}", *QUIET, *MTP, *self.data]
                + overrides,
                run_dir.with_suffix(".log"),
            )
        return final

    def sweep(self, sweep_dir: Path, values: list[float], overrides: list[str]) -> list[Path]:
        """The λ sweep as one ``finetune`` multirun (its report evaluates each job on the new domain)."""
        jobs = [sweep_dir / str(i) for i in range(len(values))]
        if not all((job / "final").is_dir() and (job / "eval.json").exists() for job in jobs):
            lam = "mtp.loss_scaling_factor=" + ",".join(str(v) for v in values)
            argv = [
                sys.executable,
                "-m",
                "mtp_recipes.finetune",
                "-m",
                lam,
                f"hydra.sweep.dir={sweep_dir}",
                "hydra.sweep.subdir=${hydra.job.num}",
                *QUIET,
                *MTP,
                *self.eval,
                *self.data,
                *overrides,
            ]
            self.run(argv, sweep_dir.with_suffix(".log"))
        return jobs

    def evaluate(self, checkpoint: Path, corpus: Path, out_json: Path) -> dict[str, Any]:
        """``evaluate`` of ``checkpoint`` on ``corpus``'s held-out 10 % (reused when ``out_json`` exists)."""
        if not out_json.exists():
            data = [f"data.source={corpus}", "data.format=text", "data.eval_fraction=0.1", *self.data]
            argv = [
                sys.executable,
                "-m",
                "mtp_recipes.evaluate",
                f"model.path={checkpoint}",
                *data,
                *QUIET,
                *MTP,
                *self.eval,
                f"hydra.run.dir={out_json.parent / out_json.stem}",
                f"eval.output={out_json}",
            ]
            self.run(argv, out_json.with_suffix(".log"))
        return json.loads(out_json.read_text())


def graft_mtp(source: Path, backbone: Path, out: Path) -> Path:
    """``backbone``'s checkpoint with ``source``'s MTP depths: frozen heads re-attached to a fine-tuned backbone."""
    if out.is_dir():
        return out
    from mtp_recipes.data import load_tokenizer
    from mtp_recipes.model import MTPModel

    kwargs = {"num_layers": 2, "use_repeated_layer": True}
    model = MTPModel.from_pretrained(str(backbone), **kwargs)
    model.mtp.load_state_dict(MTPModel.from_pretrained(str(source), **kwargs).mtp.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, tokenizer=load_tokenizer("builtin:debug"))
    tmp.rename(out)
    return out


def measures(record: dict[str, Any]) -> dict[str, float]:
    return {
        "acceptance": record["acceptance_length"],
        "teacher_forced": record["reference_acceptance_length"],
        "main_ce": record["reference_main_ce"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_results/drift"))
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quick", action="store_true", help="10 pretraining and 5 fine-tuning steps, seed 0")
    args = parser.parse_args()
    runner, lambdas, extra_rows = Runner(), [0.05, 0.1, 0.3], True
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 4, 2, [0]
        runner = Runner(in_process=True, eval=tuple(QUICK_EVAL), data=tuple(QUICK_DATA))
        lambdas, extra_rows = [0.1], False
    out = args.out.resolve()
    start = time.perf_counter()
    corpora = write_corpora(out / "data")
    old, new = corpora[DOMAINS["old"]], corpora[DOMAINS["new"]]

    base = runner.finetune(
        out / "base",
        [
            f"data.source={old}",
            "data.format=text",
            f"trainer.max_steps={args.pretrain_steps}",
            "optim.lr=1e-3",
            "trainer.eval_every=0",
            "trainer.seed=0",
        ],
    )
    checkpoints: dict[str, dict[int, Path]] = {"base (pretrained on the old domain)": {s: base for s in args.seeds}}
    ft = [
        f"data.source={new}",
        "data.format=text",
        f"trainer.max_steps={args.finetune_steps}",
        "optim.lr=3e-4",
        "trainer.eval_every=0",
    ]
    for seed in args.seeds:
        seeded, root = [f"model.path={base}", *ft, f"trainer.seed={seed}"], out / f"seed{seed}"
        plain = runner.finetune(root / "plain", [*seeded, "mtp.loss_scaling_factor=0"])
        frozen = graft_mtp(base, plain, root / "frozen")
        rows = {"fine-tuned, MTP frozen (λ = 0, heads re-attached)": frozen}
        for lam, job in zip(lambdas, runner.sweep(root / "sweep", lambdas, seeded), strict=True):
            rows[f"MTP trained, λ = {lam}"] = job / "final"
        retrained = [f"model.path={frozen}", *ft, f"trainer.seed={seed}", "mtp.train_only=true"]
        rows["frozen, then `mtp.train_only` (same steps)"] = runner.finetune(root / "train_only", retrained)
        if extra_rows:
            for targets in ("self", "mix"):
                rows[f"λ = 0.1, `mtp.targets={targets}`"] = runner.finetune(
                    root / targets, [*seeded, f"mtp.targets={targets}"]
                )
            rows["λ = 0.1, `mtp.depth_decay=0.6`"] = runner.finetune(root / "decay", [*seeded, "mtp.depth_decay=0.6"])
        for name, path in rows.items():
            checkpoints.setdefault(name, {})[seed] = path

    results = []
    for name, by_seed in checkpoints.items():
        for seed, path in by_seed.items():
            row = {"row": name, "seed": seed, "checkpoint": str(path)}
            for domain, corpus in (("new", new), ("old", old)):
                if path.parent.parent.name == "sweep" and domain == "new":
                    record = json.loads((path.parent / "eval.json").read_text())  # the sweep report's evaluation
                else:
                    record = runner.evaluate(path, corpus, path.parent / f"eval_{path.name}_{DOMAINS[domain]}.json")
                row[domain] = measures(record)
            results.append(row)
    settings = {
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "seeds": args.seeds,
        "eval": list(runner.eval),
        "mtp": MTP,
        "wall_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": results}, indent=2) + "\n")
    (out / "table.md").write_text(table(results, args.seeds))
    print((out / "table.md").read_text())


def table(results: list[dict[str, Any]], seeds: list[int]) -> str:
    """One line per row: each measure as the seeds' values joined by ' / '."""
    head = (
        "| row | new: acceptance | new: teacher-forced | new: main CE "
        "| old: acceptance | old: teacher-forced | old: main CE |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    names = list(dict.fromkeys(r["row"] for r in results))
    for name in names:
        runs = [r for r in results if r["row"] == name]
        if name.startswith("base"):
            runs = runs[:1]
        cells = [
            " / ".join(f"{r[domain][key]:.3f}" for r in runs)
            for domain in ("new", "old")
            for key in ("acceptance", "teacher_forced", "main_ce")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
