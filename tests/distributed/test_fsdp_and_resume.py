"""FSDP2 over 2 processes equals 1 process on the same global batch; crashes cost only the steps since
the last checkpoint; a kill during a checkpoint write leaves the previous one loadable."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtp_recipes.checkpoint.resume import latest_resume
from mtp_recipes.config import CONFIG_DIR
from mtp_recipes.recipe import FinetuneRecipe
from tests.helpers import DEBUG_MODELS, launcher
from tests.recipes.test_finetune import composed

COMMON = [
    "trainer.progress_bar=false",
    "trainer.log_every=1",
    "data.seq_len=64",
    "data.max_documents=24",
    "optim.warmup_steps=1",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, nproc: int = 1, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*launcher(nproc), "-m", "mtp_recipes.finetune", *COMMON, *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def run_inline(*args: str, run_dir: Path) -> None:
    """A one-process reference run in this process (a subprocess would add only the interpreter's start): the
    command line's composition (``COMMON`` + ``args``) and one thread, as the launched processes get."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        FinetuneRecipe(composed(*COMMON, *args), run_dir).run()
    finally:
        torch.set_num_threads(threads)


def losses(run: Path) -> dict[int, dict]:
    """The last training record logged for each step (a resumed run appends)."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if r["split"] == "train"}


def initial_weights(run: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The exported weights a run starts from: the recipe's own setup (same seed), before any step."""
    recipe = FinetuneRecipe(composed(*COMMON, *overrides), run)
    recipe.setup()
    path = recipe.model.save_pretrained(run / "initial")
    recipe.cleanup()
    return load_file(path / "model.safetensors")


# fp32: the default model, equal up to summation order. bf16 (trainer.precision=bf16: FSDP2's
# MixedPrecisionPolicy on 2 ranks, autocast over fp32 weights on 1): every family's debug recipe.
RUNS = [
    pytest.param("fp32", "nemotron_h_debug", id="fp32"),
    *(pytest.param("bf16", name, id=f"bf16-{name}") for name in DEBUG_MODELS),
]


def launch_runs(jobs: list[tuple[Path, list[str]]], cwd: Path, nproc: int = 2) -> str:
    """Several runs (run dir, overrides after ``COMMON``) in one launch of ``nproc`` processes, one after another:
    the interpreters start once (tests/distributed/runs_worker.py). Returns the launch's output."""
    spec = cwd / "jobs.json"
    spec.write_text(json.dumps([{"run_dir": str(d), "overrides": [*COMMON, *o]} for d, o in jobs]))
    worker = Path(__file__).with_name("runs_worker.py")
    env = {**ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [*launcher(nproc), str(worker), str(spec)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def two_rank_args(precision: str, model: str) -> list[str]:
    return [f"model={model}", f"trainer.precision={precision}", "trainer.max_steps=3"]


@pytest.fixture(scope="module")
def bf16_two_rank_runs(tmp_path_factory) -> Path:
    """Every family's debug recipe in bf16 on 2 ranks x 2 rows, all in one launch (the fp32 run below goes through
    the command line, which the layout of the run directory is checked on)."""
    root = tmp_path_factory.mktemp("bf16")
    launch_runs([(root / name, [*two_rank_args("bf16", name), "data.batch_size=2"]) for name in DEBUG_MODELS], root)
    return root


@pytest.mark.parametrize("precision, model", RUNS)
def test_two_processes_equal_one_on_the_same_global_batch(precision, model, tmp_path, request):
    # 2 ranks x 2 rows == 1 rank x 4 rows per step; packed rows with different valid-target counts per rank.
    args = two_rank_args(precision, model)
    if precision == "fp32":
        finish(cli(*args, "data.batch_size=2", f"hydra.run.dir={tmp_path}/two", nproc=2, cwd=tmp_path))
        two = tmp_path / "two"
        # only rank 0 wrote, into one run directory
        assert not any(p.name.startswith("two") and p != two for p in tmp_path.iterdir())
    else:
        two = request.getfixturevalue("bf16_two_rank_runs") / model
    run_inline(*args, "data.batch_size=4", run_dir=tmp_path / "one")
    a, b = losses(two), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3) and the two runs round in different
    # places (2 ranks: bf16 parameters and activations; 1 rank: fp32 weights and residual stream, bf16
    # matmuls). The loss is taken in fp32 from those states and averaged over the batch, so the runs agree
    # to within one roundoff (measured: <= 1.5e-4 for every family), not to fp32's 1e-5.
    rel = 1e-5 if precision == "fp32" else 2e-3
    for step in a:
        for key in ("loss", "main_ce", "mtp_ce_1"):
            assert math.isfinite(a[step][key]) and a[step][key] == pytest.approx(b[step][key], rel=rel), (step, key)
    wa, wb = load_file(two / "final" / "model.safetensors"), load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert set(wa) == set(wb)
    assert all(wa[k].dtype == wb[k].dtype for k in wa)  # the compute dtype never leaks into the export
    if precision == "fp32":
        assert any(k.startswith("mtp.") for k in wa)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)
        return
    # bf16: AdamW normalises every element's step, so rounding moves an element whose gradient is near
    # zero by up to a whole step and a max-abs comparison says nothing. Compared instead: the update
    # (final - initial) over all trained tensors, by norm. Two ranks vs one differ by 3-11 % of it
    # (measured, every family), as much as one process in bf16 vs fp32 does; training on half the batch
    # (a rank's gradient lost) moves it by 45-65 %. Tensors nothing trains (frozen buffers) stay bit-exact.
    assert_same_bf16_update(wa, wb, initial_weights(tmp_path / "init", *args))


def assert_same_bf16_update(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], w0: dict[str, torch.Tensor]):
    """Two bf16 runs' exports moved their weights alike: the gap between them is under a quarter of run b's update
    (final - initial) over all trained tensors, by norm; tensors nothing trains are bit-exact."""
    trained = [k for k in wb if not torch.equal(wb[k], w0[k])]
    assert trained
    for k in set(wa) - set(trained):
        assert torch.equal(wa[k], w0[k]), k
    gap = sum(((wa[k].double() - wb[k].double()) ** 2).sum() for k in trained) ** 0.5
    update = sum(((wb[k].double() - w0[k].double()) ** 2).sum() for k in trained) ** 0.5
    assert gap < 0.25 * update, (float(gap), float(update))


def test_sigterm_writes_a_checkpoint_before_exit(tmp_path):
    run = tmp_path / "term"
    proc = cli("data.batch_size=2", "trainer.max_steps=100000", f"hydra.run.dir={run}", cwd=tmp_path)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    ckpt = latest_resume(run / "resume")
    assert ckpt is not None and "trainer.resume=auto" in out + err
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == max(losses(run)) >= 3


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    recipe = FinetuneRecipe(composed(*COMMON, "data.batch_size=2", "trainer.max_steps=2"), tmp_path)
    recipe.setup()
    recipe.train()
    good = recipe.save_resume_checkpoint()

    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def dies_midway(state, checkpoint_id):
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)  # some files land...
        raise KeyboardInterrupt("killed while writing")  # ...then the process dies

    monkeypatch.setattr(dcp, "save", dies_midway)
    recipe.step += 1
    with pytest.raises(KeyboardInterrupt):
        recipe.save_resume_checkpoint()
    monkeypatch.setattr(dcp, "save", real_save)
    recipe.cleanup()

    assert latest_resume(tmp_path / "resume") == good
    resumed = FinetuneRecipe(
        composed(*COMMON, "data.batch_size=2", "trainer.max_steps=3", "trainer.resume=auto"), tmp_path
    )
    resumed.setup()
    assert resumed.step == 2
    for (name, a), b in zip(recipe.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    resumed.cleanup()
    assert Path(CONFIG_DIR).exists()


def test_sharded_load_keeps_each_rank_near_its_own_share(tmp_path):
    """Meta build -> FSDP2 -> fill from safetensors: a rank reads and holds about its shard, not the model.

    DeepSeek-V3's experts merge two on-disk tensors per expert (gate, up) into one row each: read per expert too.
    The export gathers each tensor to the writer only and equals the 1-process export.
    """
    from mtp_recipes.model import MTPModel
    from tests.helpers import debug_model_config

    cfg = debug_model_config(
        "nemotron_h_debug",
        hidden_size=256,
        vocab_size=32768,
        n_routed_experts=16,
        moe_intermediate_size=512,
        intermediate_size=1024,
    )
    torch.manual_seed(0)
    model = MTPModel.from_config(cfg)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert total > 60e6  # big enough for RSS to tell a shard from the whole
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    del model
    small = MTPModel.from_config(debug_model_config("deepseek_v3_debug")).save_pretrained(tmp_path / "dsv3")
    worker = Path(__file__).with_name("load_worker.py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(ckpt),
            str(small),
        ],
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 4 and all(r["equal"] for r in ranks if r["rank"] == 0)
    for r in ranks:
        on_disk = sum(t.numel() * t.element_size() for t in load_file(Path(r["path"]) / "model.safetensors").values())
        # only its own rows (merged experts: its experts' tensors); tensors kept whole are read whole
        assert r["read"] <= 1.25 * on_disk / 2 + r["unsharded"], (r, on_disk)
        assert r["same_export"]  # the 2-rank export equals the 1-process one, file by file
        if r["path"] == str(ckpt):
            # export: shards are gathered to rank 0 only; it holds the full tensor and safetensors' copy of it
            assert r["export_growth"] < (2.5 if r["rank"] == 0 else 0.25) * r["largest"], r
            assert r["own"] < 0.55 * total
            # its own shard plus one tensor in flight and allocator slack; the whole model would be `total`
            assert r["growth"] < 0.8 * total, (r, total)


def test_two_processes_fine_tune_a_checkpoint_and_export_its_layout(tmp_path):
    """torchrun + model.path: meta build, FSDP2, shards filled from the files, trained, gathered export."""
    from mtp_recipes.model import MTPModel
    from tests.helpers import debug_model_config

    torch.manual_seed(0)
    source = MTPModel.from_config(debug_model_config("nemotron_h_debug"))
    source.config.dtype = torch.bfloat16
    ckpt = source.save_pretrained(tmp_path / "src")
    run = tmp_path / "ft"
    finish(
        cli(
            "data.batch_size=2",
            "trainer.max_steps=2",
            f"model.path={ckpt}",
            "model.tokenizer=builtin:debug",
            f"hydra.run.dir={run}",
            nproc=2,
            cwd=tmp_path,
        )
    )
    before, after = load_file(ckpt / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert set(after) == set(before)
    assert all(after[k].dtype == before[k].dtype and after[k].shape == before[k].shape for k in after)
    assert not torch.equal(after["mtp.layers.0.eh_proj.weight"], before["mtp.layers.0.eh_proj.weight"])
    assert sorted(losses(run)) == [1, 2]
