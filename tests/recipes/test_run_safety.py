"""Nothing silently wrong, nothing lost: run directories, resume, interrupts and bad input as a user meets them.

Most tests start from one finished 4-step run (resume checkpoints at steps 2 and 4, ``final/``) and copy it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

from mtp_recipes.checkpoint.resume import latest_resume
from mtp_recipes.errors import CheckpointError, ConfigError, TrainingError
from mtp_recipes.recipe import FinetuneRecipe
from mtp_recipes.train.schedules import learning_rate
from tests.helpers import DEBUG_MODELS
from tests.recipes.test_finetune import FAST as FAST_ANY_DEVICE
from tests.recipes.test_finetune import composed, run_cli

FAST = [*FAST_ANY_DEVICE, "trainer.device=cpu"]  # run semantics, and log lines that name the device's scan
RUN = [*FAST, "optim.warmup_steps=1", "trainer.checkpoint_every=2", "trainer.keep_last=2"]


def records(run: Path) -> list[dict]:
    """The training records (validation adds ``split: eval`` ones after the last step)."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    FinetuneRecipe(composed(*RUN, "trainer.max_steps=4"), run).run()
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# ---- clobbering ----------------------------------------------------------------------------------------------
def test_a_run_dir_holding_a_run_is_refused_and_left_as_it_was(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(
        ConfigError,
        match=r"already holds a run \(config.yaml, metrics.jsonl, final, resume\): "
        r"continue it with trainer.resume=auto, start afresh with "
        r"trainer.overwrite=true",
    ) as err:
        FinetuneRecipe(composed(*RUN, "trainer.max_steps=4"), run_copy).run()
    assert "\n" not in str(err.value)
    assert snapshot(run_copy) == before


def test_overwrite_starts_afresh(run_copy):
    FinetuneRecipe(composed(*FAST, "trainer.max_steps=2", "trainer.overwrite=true"), run_copy).run()
    assert [r["step"] for r in records(run_copy)] == [1, 2]
    assert not (run_copy / "resume").exists() and (run_copy / "final" / "model.safetensors").exists()


def test_resume_with_max_steps_at_or_below_the_checkpoint_leaves_final_alone(run_copy):
    before = snapshot(run_copy)
    for max_steps in (2, 4):
        with pytest.raises(
            ConfigError,
            match=rf"trainer.max_steps={max_steps} but .*step_000004 is at step 4: "
            "nothing to train, .*final is left as it is",
        ):
            FinetuneRecipe(composed(*RUN, f"trainer.max_steps={max_steps}", "trainer.resume=auto"), run_copy).run()
    assert snapshot(run_copy) == before

    shutil.rmtree(run_copy / "resume")
    with pytest.raises(ConfigError, match=r"holds a finished run \(final/\) and no resume checkpoint"):
        FinetuneRecipe(composed(*RUN, "trainer.max_steps=4", "trainer.resume=auto"), run_copy).run()


def test_a_checkpoint_at_max_steps_without_final_only_exports(run_copy):
    shutil.rmtree(run_copy / "final")  # killed between the last checkpoint and the export
    FinetuneRecipe(composed(*RUN, "trainer.max_steps=4", "trainer.resume=auto"), run_copy).run()
    assert [r["step"] for r in records(run_copy)] == [1, 2, 3, 4]
    assert (run_copy / "final" / "model.safetensors").exists()


# ---- resume ------------------------------------------------------------------------------------------------
def test_resume_auto_without_a_checkpoint_starts_again_from_step_0(run_copy):
    # Killed before its first checkpoint (and so before final/): resume=auto, as Slurm scripts always pass.
    shutil.rmtree(run_copy / "final")
    shutil.rmtree(run_copy / "resume")
    FinetuneRecipe(composed(*RUN, "trainer.max_steps=2", "trainer.resume=auto"), run_copy).run()
    assert [r["step"] for r in records(run_copy)] == [1, 2]


def test_metrics_continue_from_the_resumed_step_without_duplicates(finished, run_copy):
    # Killed after step 4 was logged but before its checkpoint and export: steps 3-4 are trained again.
    shutil.rmtree(run_copy / "final")
    shutil.rmtree(run_copy / "resume" / "step_000004")
    FinetuneRecipe(composed(*RUN, "trainer.max_steps=4", "trainer.resume=auto"), run_copy).run()
    again, first = records(run_copy), records(finished)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(again, first):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
    # the cosine schedule reaches lr * min_lr_ratio on the last step
    assert again[-1]["lr"] == pytest.approx(1e-3 * 0.1, rel=1e-9)


@pytest.mark.parametrize("model", DEBUG_MODELS)
def test_every_family_resumes_to_the_uninterrupted_run(model, tmp_path):
    """Stopped after step 3 was logged, before its export: the resume from the step-2 checkpoint retrains step 3 to
    the same loss and the same exported weights (fp32 on one process: equal up to rounding)."""
    args = [*RUN, f"model={model}", "trainer.max_steps=3", "data.batch_size=2"]
    FinetuneRecipe(composed(*args), tmp_path / "ref").run()
    run = Path(shutil.copytree(tmp_path / "ref", tmp_path / "stopped"))
    shutil.rmtree(run / "final")
    assert [p.name for p in (run / "resume").iterdir()] == ["step_000002"]
    FinetuneRecipe(composed(*args, "trainer.resume=auto"), run).run()
    again, first = records(run), records(tmp_path / "ref")
    assert [r["step"] for r in again] == [1, 2, 3]
    assert again[-1]["loss"] == pytest.approx(first[-1]["loss"], rel=1e-6)
    resumed, reference = (load_file(r / "final" / "model.safetensors") for r in (run, tmp_path / "ref"))
    assert set(resumed) == set(reference)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("damage", ["truncated shard", "garbage trainer_state.json", "no .metadata"])
def test_resume_skips_a_damaged_newest_checkpoint_with_one_warning(run_copy, damage, caplog):
    newest = run_copy / "resume" / "step_000004"
    if damage == "truncated shard":
        shard = next(newest.glob("*.distcp"))
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "garbage trainer_state.json":
        (newest / "trainer_state.json").write_bytes(b"\x00\xff{garbage")
    else:
        (newest / ".metadata").unlink()
    recipe = FinetuneRecipe(composed(*RUN, "trainer.max_steps=4", "trainer.resume=auto"), run_copy)
    with caplog.at_level("WARNING", logger="mtp_recipes"):
        recipe.setup()
    recipe.cleanup()
    assert recipe.step == 2
    skipped = [r.getMessage() for r in caplog.records if "skipping resume checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(newest) in skipped[0]


@pytest.mark.parametrize(
    ("override", "diff"),
    [
        ("data.seq_len=32", "data.seq_len 64 -> 32"),
        ("data.batch_size=2", "data.batch_size 4 -> 2"),
        ("trainer.grad_accum_steps=2", "trainer.grad_accum_steps 1 -> 2"),
        ("data.max_documents=10", "data.max_documents 20 -> 10"),
        ("world size", "world size 2 -> 1"),
    ],
)
def test_resume_refuses_another_data_position(run_copy, override, diff):
    shutil.rmtree(run_copy / "resume" / "step_000004")
    if override == "world size":  # what a 2-rank run records; this process is one rank
        state_file = run_copy / "resume" / "step_000002" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["data_position"]["world size"] = 2
        state_file.write_text(json.dumps(state))
        override = "trainer.seed=0"
    recipe = FinetuneRecipe(composed(*RUN, "trainer.max_steps=4", "trainer.resume=auto", override), run_copy)
    with pytest.raises(ConfigError) as err:
        recipe.setup()
    recipe.cleanup()
    assert f"cannot resume {run_copy / 'resume' / 'step_000002'}: {diff}" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_changed_lr_on_resume_is_applied_from_the_resumed_step_and_logged(run_copy, caplog):
    shutil.rmtree(run_copy / "resume" / "step_000004")
    recipe = FinetuneRecipe(composed(*RUN, "trainer.max_steps=4", "trainer.resume=auto", "optim.lr=5e-4"), run_copy)
    with caplog.at_level("WARNING", logger="mtp_recipes"):
        recipe.setup()
    recipe.cleanup()
    assert "resume: optim.lr 0.001 -> 0.0005 since the checkpoint; applied from step 3 on" in caplog.text
    # step index 2 of 4 with 1 warmup step: cosine progress (2 - 1) / (4 - 1 - 1) = 0.5
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert recipe.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * factor, rel=1e-12)


def test_unfinished_writes_are_cleaned_at_start(run_copy, caplog):
    (run_copy / "resume" / ".step_000006.tmp").mkdir()
    (run_copy / "resume" / ".step_000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (run_copy / "checkpoints").mkdir()
    (run_copy / "checkpoints" / ".step_000005.tmp-77").mkdir()
    recipe = FinetuneRecipe(composed(*RUN, "trainer.max_steps=6", "trainer.resume=auto"), run_copy)
    with caplog.at_level("WARNING", logger="mtp_recipes"):
        recipe.setup()
    recipe.cleanup()
    assert not list(run_copy.rglob(".step_*"))
    assert caplog.text.count("left by an interrupted run") == 2
    assert recipe.step == 4


@pytest.mark.parametrize("failure", ["ENOSPC", "torch zip writer"])
def test_disk_full_during_a_resume_checkpoint_is_one_line_and_leaves_no_partial_copy(tmp_path, monkeypatch, failure):
    recipe = FinetuneRecipe(composed(*FAST, "trainer.max_steps=1", "trainer.save_final=false"), tmp_path)
    recipe.setup()
    recipe.train()
    good = recipe.save_resume_checkpoint()
    real_save = dcp.save

    def fills_the_disk(state, checkpoint_id):
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)  # some files land, then the disk is full
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        short_write = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        raise CheckpointException("write", {0: (short_write, traceback.StackSummary())})

    monkeypatch.setattr(dcp, "save", fills_the_disk)
    recipe.step += 1
    with pytest.raises(CheckpointError) as err:
        recipe.save_resume_checkpoint()
    recipe.cleanup()
    message = str(err.value)
    assert message.startswith("no space left on device: free ") and f"MB under {tmp_path / 'resume'}" in message
    assert "the partial checkpoint was removed" in message and f"{good} is kept" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["step_000001"]
    assert latest_resume(tmp_path / "resume") == good


# ---- interrupts ----------------------------------------------------------------------------------------------
def _signal_on_embedding_calls(recipe: FinetuneRecipe, calls: set[int]) -> None:
    """Send SIGINT to this process on the given embedding calls (two per step: the backbone and depth 1)."""
    count = {"n": 0}

    def hook(module, args, output):
        count["n"] += 1
        if count["n"] in calls:
            os.kill(os.getpid(), signal.SIGINT)
        return output

    recipe.model.backbone.get_input_embeddings().register_forward_hook(hook)


def test_ctrl_c_stops_at_the_step_boundary_with_a_resume_checkpoint(tmp_path, caplog):
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under a shell's background job
    recipe = FinetuneRecipe(composed(*FAST, "trainer.max_steps=50"), tmp_path)  # checkpoint_every=0
    recipe.setup()
    _signal_on_embedding_calls(recipe, {3})  # during step 2
    with caplog.at_level("INFO", logger="mtp_recipes"):
        assert recipe.train() is True
    recipe.cleanup()
    assert recipe.step == 2 and [r["step"] for r in records(tmp_path)] == [1, 2]
    assert latest_resume(tmp_path / "resume") == tmp_path / "resume" / "step_000002"
    assert not (tmp_path / "final").exists()
    assert (
        "SIGINT: stopped after step 2 with a resume checkpoint" in caplog.text and "trainer.resume=auto" in caplog.text
    )
    assert "wrote resume checkpoint" in caplog.text  # with its duration
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    recipe = FinetuneRecipe(composed(*FAST, "trainer.max_steps=50"), tmp_path)
    recipe.setup()
    _signal_on_embedding_calls(recipe, {3, 4})  # twice within step 2
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    recipe.cleanup(finished=False)
    assert recipe.step == 1 and not (tmp_path / "resume").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_on_the_command_line_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtp_recipes.finetune", *FAST, f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (tmp_path / "run" / ".hydra").exists():  # inside the job, loading torch
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted")


# ---- bad values and smaller things ---------------------------------------------------------------------------
def test_nothing_to_train_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="nothing to train: mtp.train_only=true freezes the backbone"):
        FinetuneRecipe(composed("mtp.num_layers=0", "mtp.train_only=true"), tmp_path)
    # D = 0 read from the model's own config rather than set: refused when the model is built
    recipe = FinetuneRecipe(composed(*FAST, "model.config.num_nextn_predict_layers=0", "mtp.train_only=true"), tmp_path)
    with pytest.raises(ConfigError, match=r"nothing to train: .*mtp.num_layers=0 \(set, or the checkpoint's\)"):
        recipe.setup()
    recipe.cleanup()


def test_non_finite_gradient_norm_stops_like_a_non_finite_loss(tmp_path):
    recipe = FinetuneRecipe(composed(*FAST, "trainer.max_steps=3"), tmp_path)
    recipe.setup()
    param = next(p for p in recipe.model.mtp.parameters() if p.requires_grad)
    param.register_hook(lambda grad: grad + float("inf"))
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"non-finite gradient norm at step 1 \(loss [\d.]+ is finite\)"):
        recipe.train()
    recipe.cleanup(finished=False)
    assert all(torch.equal(before[k], v) for k, v in recipe.model.state_dict().items())  # no step was applied
    assert not (tmp_path / "metrics.jsonl").read_text()


def test_setup_logs_the_mamba_scan_once_and_a_short_run_dir_line(tmp_path, caplog):
    recipe = FinetuneRecipe(composed(*FAST), tmp_path)
    with caplog.at_level("INFO", logger="mtp_recipes"):
        recipe.setup()
    recipe.cleanup()
    messages = [r.getMessage() for r in caplog.records]
    scans = [m for m in messages if m.startswith("Mamba2 scan:")]
    assert scans == ["Mamba2 scan: torch (CPU tensors always take the torch scan); conv: torch"]
    assert [r.levelname for r in caplog.records if r.getMessage() in scans] == ["INFO"]
    assert f"run dir {tmp_path}" in messages


def test_the_cosine_schedule_ends_at_min_lr_ratio():
    for steps, warmup, ratio in [(150, 10, 0.1), (7, 0, 0.0), (5, 2, 0.3)]:
        cfg = composed(f"trainer.max_steps={steps}", f"optim.warmup_steps={warmup}", f"optim.min_lr_ratio={ratio}")
        factors = [learning_rate(cfg, s) / cfg.optim.lr for s in range(steps)]
        assert factors[-1] == pytest.approx(ratio, abs=1e-12)
        assert factors[warmup] == pytest.approx(1.0) and all(
            a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :])
        )


def test_a_config_error_comes_before_torch_is_imported(tmp_path):
    start = time.perf_counter()
    bad = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "mtp_recipes.finetune",
            "optim.lr=-1",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert bad.returncode == 2
    imported = {line.rsplit("|", 1)[-1].strip() for line in bad.stderr.splitlines() if line.startswith("import time:")}
    assert "omegaconf" in imported and not {"torch", "transformers"} & imported
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: optim.lr must be > 0, got -1.0"
    ]
    assert not (tmp_path / "r").exists()  # a rejected config leaves no run dir behind
    print(f"config error reported in {elapsed:.2f} s")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path, where):
    (tmp_path / "occupied").write_text("a file, not a directory")
    run_dir = tmp_path / "occupied" if where == "file" else tmp_path / "occupied" / "run"
    bad = run_cli(f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={run_dir} cannot be used ({tmp_path / 'occupied'} is a file); "
        "set hydra.run.dir to a writable directory"
    ]
