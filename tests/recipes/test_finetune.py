"""The recipe end to end: Hydra composition, CLI overrides, a multirun sweep, errors before work."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from mtp_recipes import hf_compat
from mtp_recipes.config import CONFIG_DIR, to_schema
from mtp_recipes.errors import ConfigError, TrainingError
from mtp_recipes.model import MTPModel
from mtp_recipes.recipe import FinetuneRecipe

FAST = [
    "trainer.progress_bar=false",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.max_documents=20",
]


def composed(*overrides: str, name: str = "finetune"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def run_cli(*args: str, cwd: Path, offline: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env} if offline else {**os.environ, **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "mtp_recipes.finetune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_recipe_composes_and_validates():
    # regenerate.yaml configures `python -m mtp_recipes.regenerate`, not a fine-tuning run (tests/test_regenerate.py)
    names = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml") if p.stem != "regenerate")
    assert "finetune" in names and "nemotron_super" in names
    for name in names:
        overrides = () if name == "finetune" else ("data.source=x.jsonl",)
        cfg = to_schema(composed(*overrides, name=name))
        assert cfg.mtp.loss_scaling_factor >= 0
    super_cfg = composed("data.source=x.jsonl", name="nemotron_super")
    assert super_cfg.model.path == "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16"
    assert super_cfg.mtp.loss_scaling_factor == 0.1 and super_cfg.mtp.num_layers is None


def test_overrides_reach_the_schema():
    cfg = to_schema(composed("optim.lr=1e-5", "mtp.loss_scaling_factor=0.3", "mtp.num_layers=2"))
    assert cfg.optim.lr == 1e-5 and cfg.mtp.loss_scaling_factor == 0.3 and cfg.mtp.num_layers == 2


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=-1e-4", "optim.lr must be > 0"),
        ("mtp.loss_scaling_factor=-0.1", "mtp.loss_scaling_factor must be >= 0"),
        ("mtp.num_layers=-1", "mtp.num_layers must be >= 0"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("optim.betas=[0.9]", "optim.betas must be two values in [0, 1), e.g. [0.9, 0.95]; got [0.9]"),
        ("optim.betas=[0.9,1.0]", "optim.betas must be two values"),
    ],
)
def test_bad_values_are_rejected_before_work(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        FinetuneRecipe(composed(override), "/nonexistent/never-created")
    assert "\n" not in str(err.value)
    assert not Path("/nonexistent/never-created").exists()


def test_default_recipe_trains_and_writes_a_reloadable_checkpoint(tmp_path, caplog):
    cfg = composed(*FAST, "trainer.max_steps=40", "trainer.save_every=20", "optim.warmup_steps=2")
    recipe = FinetuneRecipe(cfg, tmp_path)
    with caplog.at_level("INFO", logger="mtp_recipes"):
        recipe.run()
    checks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("check: ")]
    # every export (step 20 and final) is checked against every engine release, one line each
    assert checks == 2 * ["check: vLLM 0.34.0: ok", "check: vLLM 0.33.0: ok", "check: SGLang 0.5.23: ok"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in logged if r["split"] == "train"]
    assert len(records) == 40 and [r["step"] for r in logged if r["split"] == "eval"] == [40]  # held-out, at the end
    first, last = records[:5], records[-5:]
    assert sum(r["loss"] for r in last) / 5 < sum(r["loss"] for r in first) / 5 - 0.5
    assert sum(r["mtp_ce_1"] for r in last) < sum(r["mtp_ce_1"] for r in first)
    for r in records:
        assert r["loss"] == pytest.approx(r["main_ce"] + r["lambda"] * r["mtp_ce_1"], rel=1e-5)

    assert (tmp_path / "checkpoints" / "step_000020" / "config.json").exists()
    final = tmp_path / "final"
    with safe_open(final / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("mtp.layers.0.eh_proj") for k in keys)
    assert (final / "tokenizer.json").exists()
    reloaded = MTPModel.from_pretrained(final)
    for (name, a), b in zip(recipe.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    recipe = FinetuneRecipe(composed(*FAST, "trainer.max_steps=6", "trainer.save_every=2"), tmp_path)
    recipe.setup()
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        # the embedding runs twice per step (backbone and MTP depth 1): poison from step 3 on
        return output * float("nan") if calls["n"] > 4 else output

    recipe.model.backbone.get_input_embeddings().register_forward_hook(poison)
    with pytest.raises(TrainingError, match="non-finite loss at step 3") as err:
        recipe.train()
    recipe.cleanup()
    assert "step_000002" in str(err.value)
    MTPModel.from_pretrained(tmp_path / "checkpoints" / "step_000002")
    assert not (tmp_path / "final").exists()


def test_cli_override_and_error_lines(tmp_path):
    ok = run_cli(
        *FAST, "trainer.max_steps=2", "mtp.loss_scaling_factor=0.3", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lambda"] for r in records if r["split"] == "train"] == [0.3, 0.3]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()

    bad = run_cli("mtp.loss_scaling_factor=-1", f"hydra.run.dir={tmp_path}/bad", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: mtp.loss_scaling_factor must be >= 0, got -1.0"
    assert not (tmp_path / "bad").exists()  # a rejected config leaves no run dir behind

    unknown = run_cli("optim.lrr=1", f"hydra.run.dir={tmp_path}/unknown", cwd=tmp_path)
    assert unknown.returncode != 0 and "lrr" in unknown.stderr and "Traceback" not in unknown.stderr

    missing = run_cli(
        "--config-name", "nemotron_super", "data.source=x.jsonl", f"hydra.run.dir={tmp_path}/sup", cwd=tmp_path
    )
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in missing.stderr
    assert "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16" in lines[0] and "model.path" in lines[0]


def test_a_bad_mamba_scan_choice_stops_before_any_work(tmp_path):
    bad = run_cli(*FAST, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, MTP_RECIPES_MAMBA_SCAN="fast")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: MTP_RECIPES_MAMBA_SCAN='fast' is not one of")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_multirun_sweep_writes_one_run_per_value(tmp_path):
    """One run dir per valid value; a bad value is one line naming its job, and the other jobs still run."""
    result = run_cli(
        "-m",
        *FAST,
        "trainer.max_steps=2",
        "mtp.loss_scaling_factor=0.05,-1,0.3",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in result.stderr
    job, message = errors[0].split("): ", 1)  # the job is named like its run dir: number_overrides
    assert job.startswith("error: job 1 (") and "mtp.loss_scaling_factor=-1" in job
    assert message == "mtp.loss_scaling_factor must be >= 0, got -1.0"
    assert errors[1].startswith("error: 1 sweep job(s) failed: job 1 (")
    assert sorted(p.name[:2] for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0_", "2_"]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert len(runs) == 2
    lambdas = sorted(json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["lambda"] for r in runs)
    assert lambdas == [0.05, 0.3]
    assert all((r / "final" / "model.safetensors").exists() for r in runs)


RECIPE_FAMILIES = [
    ("nemotron_super", "nemotron_h_debug"),
    ("deepseek_v3", "deepseek_v3_debug"),
    ("step3p5_flash", "step3p5_debug"),
    ("minimax_m3", "minimax_m3_debug"),
    ("glm4_5_air", "glm4_moe_debug"),
    ("deepseek_v32", "deepseek_v32_debug"),
    ("mimo_v2_flash", "mimo_v2_flash_debug"),
    ("qwen3_next_80b", "qwen3_next_debug"),
    ("qwen3_5_27b", "qwen3_5_debug"),
    ("qwen3_5_35b_a3b", "qwen3_5_moe_debug"),
]


@pytest.mark.parametrize("recipe, debug_model", RECIPE_FAMILIES)
def test_every_published_recipe_runs_with_its_debug_model(recipe, debug_model, tmp_path, caplog):
    """``--config-name <recipe> model=<family>_debug trainer.max_steps=3`` (composition as on the CLI), on rows
    of 512 tokens from 40 documents instead of the recipe's 4096 (seconds, not half a minute, per family)."""
    small = ["data.seq_len=512", "data.max_documents=40"]
    cfg = composed(f"model={debug_model}", "trainer.max_steps=3", "trainer.progress_bar=false", *small, name=recipe)
    with caplog.at_level("WARNING", logger="mtp_recipes"):
        FinetuneRecipe(cfg, tmp_path).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert all(math.isfinite(r["loss"]) and r["mtp_ce_1"] > 0 for r in records)
    assert records[0]["lambda"] == 0.1
    reloaded = MTPModel.from_pretrained(tmp_path / "final")
    assert reloaded.mtp_config.num_layers >= 1
    # Setup names each engine that cannot serve the layout, once (docs/serving.md)
    serving = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving: ")]
    assert serving == [f"serving: {line}" for line in reloaded.serving_limits()]


def test_wandb_mirrors_the_metrics(tmp_path, monkeypatch):
    """With trainer.wandb_project, every metrics.jsonl record also goes to the W&B run (wandb faked)."""
    import types

    logged, state = [], {}

    class Run:
        def log(self, record, step):
            logged.append((step, record))

        def finish(self):
            state["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: state.update(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    FinetuneRecipe(composed(*FAST, "trainer.max_steps=2", "trainer.wandb_project=mtp-test"), tmp_path).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train, held = [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "eval"]
    assert [s for s, _ in logged] == [1, 2, 2] and [r for _, r in logged[:2]] == train
    skip = ("step", "split")  # held-out numbers go under eval/, beside the step's training ones
    assert logged[2][1] == {f"eval/{k}": v for k, v in held[0].items() if k not in skip}
    assert state["project"] == "mtp-test" and state["config"]["mtp"]["loss_scaling_factor"] == 0.1
    assert state["finished"]


def test_wandb_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"mtp_recipes\[wandb\]"):
        FinetuneRecipe(composed(*FAST, "trainer.wandb_project=x"), tmp_path).run()


def test_malformed_data_row_is_one_clear_error_before_training(tmp_path):
    from mtp_recipes.errors import DataError

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a fine row"}\n{"txt": "a typo in the field name"}\n')
    recipe = FinetuneRecipe(composed(*FAST, f"data.source={data}", "data.format=text"), tmp_path / "run")
    with pytest.raises(DataError, match="row 1") as err:
        recipe.run()
    assert "\n" not in str(err.value) and "text_field" in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_recipe_fine_tunes_a_checkpoint_and_exports_the_same_layout(tmp_path):
    """model.path: meta build, filled from the files, trained, exported with the same keys and dtypes."""
    from safetensors.torch import load_file

    from tests.helpers import debug_model_config

    torch.manual_seed(0)
    source = MTPModel.from_config(debug_model_config("nemotron_h_debug"))
    source.config.dtype = torch.bfloat16
    ckpt = source.save_pretrained(tmp_path / "src")
    cfg = composed(*FAST, f"model.path={ckpt}", "model.tokenizer=builtin:debug", "trainer.max_steps=2")
    recipe = FinetuneRecipe(cfg, tmp_path / "run")
    recipe.run()
    before, after = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert set(after) == set(before) and any(k.startswith("mtp.layers.") for k in after)
    # bf16 like the source, except what transformers keeps in float32 (MoE router weights and biases)
    fp32 = hf_compat.fp32_module_names(source.backbone)
    assert all(after[k].dtype == before[k].dtype for k in after)
    assert all(after[k].dtype == (torch.float32 if any(n in k for n in fp32) else torch.bfloat16) for k in after)
    assert not torch.equal(after["mtp.layers.0.eh_proj.weight"], before["mtp.layers.0.eh_proj.weight"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "eval"] and all(
        math.isfinite(r["loss"]) for r in records
    )


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """2 micro-batches of 2 rows == 1 batch of 4 rows: global target counts make the two steps identical."""
    runs = {}
    for name, overrides in {
        "accum": ("data.batch_size=2", "trainer.grad_accum_steps=2"),
        "big": ("data.batch_size=4", "trainer.grad_accum_steps=1"),
    }.items():
        recipe = FinetuneRecipe(
            composed(*FAST, *overrides, "trainer.max_steps=3", "trainer.save_final=false"), tmp_path / name
        )
        recipe.run()
        runs[name] = (
            recipe.model.state_dict(),
            [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()],
        )
    (wa, la), (wb, lb) = runs["accum"], runs["big"]
    for a, b in zip(la, lb):
        for key in ("loss", "main_ce", "mtp_ce_1", "mtp_acc_1"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)
