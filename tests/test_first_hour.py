"""A new user's first hour, run as they run it (subprocesses): their own data, typos, ``plan``, run directories.

Each mistake must give the right behaviour or one ``error:`` line that names the fix, with status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtp_recipes.checkpoint.locate import run_dir_export
from mtp_recipes.config import to_schema
from mtp_recipes.memory_plan import GIB, count_model, memory_plan, smallest_fitting
from tests.recipes.test_finetune import composed

TINY = ["trainer.progress_bar=false", "data.seq_len=64", "data.batch_size=2", "trainer.max_steps=1"]
PAIRS = [
    {"prompt": "Translate to French: cat", "completion": " chat"},
    {"prompt": [{"role": "user", "content": "Two plus two?"}], "completion": [{"role": "assistant", "content": "4"}]},
] * 8


def command(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *(["-X", "importtime"] if env and env.pop("IMPORTTIME", None) else []), "-m", module, *args],
        cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run on prompt/completion rows (text and chat prompts): what a user points commands at."""
    root = tmp_path_factory.mktemp("first_hour")
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    result = command(
        "mtp_recipes.finetune", *TINY, "data.source=pairs.jsonl", "data.eval_fraction=0", f"hydra.run.dir={root}/run",
        cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "format prompt/completion (text and chat template rows; loss on the completion only)" in result.stdout
    return root / "run"


def test_prompt_completion_rows_train_on_the_completions(run_dir):
    assert (run_dir / "final" / "config.json").is_file()
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1 and record["loss"] > 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["mtp.loss_scaling_factr=0.1"], "mtp.loss_scaling_factr: no such config key; did you mean mtp.loss_scaling_factor?"),
        (["-m", "mtp.loss_scaling_factr=0.1,0.3"], "did you mean mtp.loss_scaling_factor?"),
        (["trainr.max_steps=2"], "trainr.max_steps: no such config key; did you mean trainer.max_steps?"),
        (["--config-name", "nemotron_suprr"], "--config-name nemotron_suprr: no such recipe; did you mean nemotron_super?"),
        (["model=nemotron_h_dbug"], "model=nemotron_h_dbug: no such option in group model; did you mean nemotron_h_debug?"),
        (["mtp.loss_scaling_factor=0.1,0.3"], "is a sweep: add -m (--multirun)"),
        (["mtp.loss_scaling_factor=[0.1"], "cannot read 'mtp.loss_scaling_factor=[0.1'"),
    ],
)  # fmt: skip
def test_a_mistyped_key_or_recipe_is_one_line_with_the_fix(tmp_path, args, expected):
    result = command("mtp_recipes.finetune", *args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == error_lines(result)  # nothing else
    (line,) = error_lines(result)
    assert expected in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_help_lists_the_recipes_and_groups(tmp_path):
    result = command("mtp_recipes.finetune", "--help", cwd=tmp_path)
    assert result.returncode == 0
    recipes = (
        "deepseek_v3, deepseek_v32, glm4_5_air, mimo_v2_flash, minimax_m3, nemotron_super, qwen3_5_27b, "
        "qwen3_5_35b_a3b, qwen3_next_80b, step3p5_flash"
    )
    assert f"recipes (--config-name): {recipes}; default: finetune" in result.stdout
    assert "  model=: deepseek_v3, deepseek_v32, deepseek_v32_debug, deepseek_v3_debug," in result.stdout


def test_plan_names_the_smallest_layout_that_fits(tmp_path):
    """The layout plan answers fits; every layout with fewer GPUs, whatever its ep and checkpointing, does not."""
    one = memory_plan(to_schema(composed("model=deepseek_v3_debug", "trainer.activation_checkpointing=true")), 1)
    sharded = one.params + one.grads + one.optimizer
    limit = f"trainer.gpu_memory_gb={(one.total - 0.4 * sharded) / GIB!r}"  # 2 GPUs with checkpointing fit, 1 not
    cfg = to_schema(composed("model=deepseek_v3_debug", limit))
    counts = count_model(cfg)
    best = smallest_fitting(cfg, counts)
    assert best is not None and best.fits and best.world_size > 1
    for world in range(1, best.world_size):
        for ep in (e for e in range(1, world + 1) if world % e == 0 and counts.routed_experts % e == 0):
            for ac in (False, True):
                smaller = OmegaConf.merge(cfg, {"trainer": {"ep": ep, "activation_checkpointing": ac}})
                assert not memory_plan(smaller, world, counts).fits, (world, ep, ac)

    asked = command("mtp_recipes.plan", "--world-size", "1", "model=deepseek_v3_debug", limit, cwd=tmp_path)
    assert asked.returncode == 1
    layout = (
        f"--world-size {best.world_size} trainer.ep={best.expert_parallel} "
        f"trainer.activation_checkpointing={str(best.activation_checkpointing).lower()}"
    )
    assert asked.stdout.startswith("assumes data.seq_len=256, data.batch_size=8 rows per GPU and step, ")
    assert f"smallest that fits: {layout}" in asked.stdout and best.table() in asked.stdout
    (line,) = error_lines(asked)
    assert "do not fit on 1 GPUs" in line

    unasked = command("mtp_recipes.plan", "model=deepseek_v3_debug", limit, cwd=tmp_path)
    assert unasked.returncode == 0 and f"smallest that fits: {layout}" in unasked.stdout


def test_plan_help_and_an_unreachable_hub(tmp_path):
    helped = command("mtp_recipes.plan", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--world-size N" in helped.stdout and "nemotron_super" in helped.stdout
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    offline = command("mtp_recipes.plan", "--config-name", "nemotron_super", cwd=tmp_path, env=env)
    assert offline.returncode == 2 and "Retrying" not in offline.stderr
    (line,) = error_lines(offline)
    assert "127.0.0.1 cannot be reached" in line and "hf download nvidia/" in line


def commands(*calls: tuple[str, ...], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Several ``(module, *args)`` commands run at once (independent processes: the interpreters start side by side)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *call], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for call in calls
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_every_command_takes_a_run_directory(run_dir, tmp_path):
    final = run_dir / "final"
    said = f"model.path={run_dir} is a run directory: using its export {final}"
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}) + "\n")  # fmt: skip
    trained, evaluated, regenerated, checked = commands(
        ("mtp_recipes.finetune", *TINY, f"model.path={run_dir}", "trainer.save_final=false",
         f"hydra.run.dir={tmp_path}/again"),
        ("mtp_recipes.evaluate", f"model.path={run_dir}", "eval.num_prompts=1", "eval.max_new_tokens=4",
         "trainer.progress_bar=false", f"hydra.run.dir={tmp_path}/eval"),
        ("mtp_recipes.regenerate", f"model.path={run_dir}", "data.source=chats.jsonl", "out=out.jsonl",
         "regenerate.max_new_tokens=2"),
        ("mtp_recipes.check", str(run_dir)),
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0 and said in trained.stdout, trained.stderr[-3000:]

    assert evaluated.returncode == 0 and said in evaluated.stdout, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoint"] == str(final)
    assert "falling back to its reference" not in evaluated.stdout + evaluated.stderr  # CPU: nothing to install

    assert regenerated.returncode == 0 and said in regenerated.stdout + regenerated.stderr
    assert "falling back to its reference" not in regenerated.stdout + regenerated.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "chats.jsonl", "eval", "out.jsonl"]  # no runs/

    assert checked.returncode == 0 and f"{run_dir} is a run directory: checking its export {final}" in checked.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = command("mtp_recipes.evaluate", f"model.path={empty}", cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = error_lines(refused)
    assert "neither a Hugging Face checkpoint nor a run directory with an export" in line
    assert not (tmp_path / "runs").exists()  # the rejected command leaves no run directory behind


def test_a_run_directory_without_final_stands_for_its_newest_export(tmp_path):
    for step in ("step_000002", "step_000010", "step_000004"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "checkpoints" / step / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_000012").mkdir()  # no config.json: not an export
    assert run_dir_export(tmp_path) == tmp_path / "checkpoints" / "step_000010"
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    assert run_dir_export(tmp_path) == tmp_path / "final"
    assert run_dir_export(tmp_path / "checkpoints") is None


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (None, "data.source='missing.jsonl' matches no"),
        ('{"text": "a"}\n{"text": oops}\n', "line 2 is not valid JSON"),
        ('{"prompt": "a", "answer": "b"}\n', "name the columns 'prompt' and 'completion' for prompt/completion pairs"),
    ],
)
def test_data_errors_come_before_torch_loads(tmp_path, rows, expected):
    name = "missing.jsonl" if rows is None else "rows.jsonl"
    if rows is not None:
        (tmp_path / name).write_text(rows)
    result = command("mtp_recipes.finetune", f"data.source={name}", cwd=tmp_path, env={"IMPORTTIME": "1"})
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert expected in line
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    ]
    assert "hydra" in imported and "torch" not in imported and "transformers" not in imported
    assert "Failed to load JSON" not in result.stderr  # datasets' own report of the same line
