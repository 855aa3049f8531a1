"""Expert parallelism (trainer.ep) on gloo: the dispatch/combine against the whole experts module in float64,
EP runs against one process on the same global batch, a sliced load and the export, and SIGKILL-resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtp_recipes.config import to_schema
from mtp_recipes.distributed.mesh import init_world
from mtp_recipes.errors import ConfigError
from mtp_recipes.model import MTPModel
from tests.distributed.test_fsdp_and_resume import (
    COMMON,
    ENV,
    assert_same_bf16_update,
    cli,
    initial_weights,
    launch_runs,
    losses,
    run_inline,
)
from tests.helpers import debug_model_config, launcher
from tests.recipes.test_finetune import composed

REPO = Path(__file__).resolve().parents[2]
EP_LOG = "expert parallelism: ep=2"


def torchrun(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher(2), str(Path(__file__).with_name(script)), *args],
        cwd=cwd,
        env={**ENV, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_dispatch_and_combine_equal_the_experts_module_run_whole(tmp_path):
    """Every family's experts (gated or not, through ExpertsInterface or the class swap), eager in float64 and
    transformers' grouped_mm in float32: outputs and all gradients equal the module run on all tokens."""
    specs = [
        f"{name}:eager:float64"
        for name in ("deepseek_v3_debug", "nemotron_h_debug", "step3p5_debug", "minimax_m3_debug")
    ]
    specs += ["deepseek_v3_debug:grouped_mm:float32", "nemotron_h_debug:grouped_mm:float32"]
    result = torchrun("ep_dispatch_worker.py", *specs, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    done = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert done == [f"ok {spec} {routing}" for spec in specs for routing in ("random", "all to rank 0")]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    """Per-step losses (1e-5) and the final export (1e-5) of two runs; the gradient norm to 1e-4.

    The norm is looser for a reason unrelated to EP: CPU float32 ``vector_norm`` of the 262k-element head
    gradient is 5e-5 off in one piece, differently in two halves; FSDP over 2 ranks without EP shows the same
    1.3e-5 gap to one process (measured), while the gradients themselves agree to 3e-7.
    """
    ra, rb = losses(a), losses(b)
    assert sorted(ra) == sorted(rb) == list(range(1, steps + 1))
    for step in ra:
        for key in ("loss", "main_ce", "mtp_ce_1"):
            assert ra[step][key] == pytest.approx(rb[step][key], rel=1e-5), (step, key)
        assert ra[step]["grad_norm"] == pytest.approx(rb[step]["grad_norm"], rel=1e-4), step
    wa, wb = (load_file(run / "final" / "model.safetensors") for run in (a, b))
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


def run_ep(tmp_path: Path, name: str, *args: str, nproc: int) -> str:
    """A run with expert parallelism (its log says so); returns its output."""
    proc = cli(*args, f"hydra.run.dir={tmp_path}/{name}", nproc=nproc, cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert EP_LOG in out + err, "expert parallelism was not applied"
    return out + err


# DeepSeek-V3.2: V3's MLA + MoE block with an indexer (V3's expert-parallel load and export: below)
EP2_MODELS = [
    "deepseek_v32_debug",
    "glm4_moe_debug",
    "mimo_v2_flash_debug",
    "nemotron_h_debug",
    "qwen3_5_moe_debug",
    "qwen3_next_debug",
]
# AdamW's eps is 1e-6, not 1e-8: an embedding row whose gradient is ~1e-8 (a rare token) turns a summation-order
# difference of the gradient into a 3e-5 weight difference at eps=1e-8 (measured on GLM-4.5's debug model, 1.4e-6 at
# 1e-6), which says nothing about expert parallelism.
EP2_ARGS = ["trainer.precision=fp32", "trainer.max_steps=3", "optim.eps=1e-6"]


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory) -> Path:
    """Every model's ep=2 run on 2 ranks x 2 rows, in one launch."""
    root = tmp_path_factory.mktemp("ep2")
    jobs = [(root / m, [f"model={m}", *EP2_ARGS, "data.batch_size=2", "trainer.ep=2"]) for m in EP2_MODELS]
    output = launch_runs(jobs, root)
    assert output.count(EP_LOG) >= len(EP2_MODELS), "expert parallelism was not applied"
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", EP2_MODELS)
def test_ep2_on_two_ranks_equals_one_process(model, ep2_runs, tmp_path):
    """The backbone's and the MTP depth's MoE layers split over ep=2 (2 of 4 experts per rank): the same losses and
    weights as one process on the same 4 rows per step."""
    run_inline(f"model={model}", *EP2_ARGS, "data.batch_size=4", run_dir=tmp_path / "one")
    assert_same_run(ep2_runs / model, tmp_path / "one", 3)


@pytest.mark.slow
def test_bf16_with_activation_checkpointing_equals_fsdp_without_ep(tmp_path):
    """trainer.precision=bf16 (FSDP2's mixed precision: the experts' unit gathers bf16 weights, the exchanges
    carry bf16 states) and activation checkpointing (the exchanges run again in the recompute), against the
    same 2 ranks without EP. The experts' weight gradients are rounded in other places (one bf16 matmul over
    both ranks' tokens on the owner, vs. one per rank summed in fp32), so the losses agree to bf16's
    roundoff (measured: 1.7e-4), as in the bf16 FSDP test (2e-3), not to fp32's."""
    args = [
        "model=minimax_m3_debug",
        "trainer.precision=bf16",
        "trainer.activation_checkpointing=true",
        "trainer.max_steps=3",
        "data.batch_size=2",
    ]
    output = launch_runs([(tmp_path / "ep", [*args, "trainer.ep=2"]), (tmp_path / "fsdp", args)], tmp_path)
    assert output.count(EP_LOG) >= 1, "expert parallelism was not applied"
    a, b = losses(tmp_path / "ep"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("loss", "main_ce", "mtp_ce_1"):
            assert a[step][key] == pytest.approx(b[step][key], rel=2e-3), (step, key)
    # the weights after the steps, experts included: the same update to bf16 roundoff (the measure the bf16
    # FSDP test uses), every tensor that nothing trains bit-exact
    wa, wb = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("ep", "fsdp"))
    assert set(wa) == set(wb) and any(".experts." in k for k in wa)
    assert_same_bf16_update(wa, wb, initial_weights(tmp_path / "init", *args))


@pytest.mark.slow
def test_ep2_within_dp_shard4_and_with_replicas_equal_one_process(tmp_path):
    """4 ranks: ep=2 x efsdp=2 (FSDP over each rank's experts), and dp_replicate=2 x ep=2 (HSDP: every other
    tensor in 2 replicas of 2 shards, each export gathered within the writer's replica; efsdp=1).

    Before transformers 5.25 Step-3.5's experts module does not dispatch through transformers' ExpertsInterface:
    the class-swap path (from 5.25 on it does, and this runs the interface path).
    """
    args = ["model=step3p5_debug", "trainer.precision=fp32", "trainer.max_steps=3", "trainer.checkpoint_every=3"]
    layouts = {"efsdp": ["trainer.ep=2"], "hsdp": ["trainer.ep=2", "trainer.dp_replicate=2"]}
    launch_runs([(tmp_path / run, [*args, "data.batch_size=1", *o]) for run, o in layouts.items()], tmp_path, nproc=4)
    run_inline(*args, "data.batch_size=4", run_dir=tmp_path / "one")
    for run in ("efsdp", "hsdp"):
        assert_same_run(tmp_path / run, tmp_path / "one", 3)
    # The resume checkpoint holds each rank's own rows of a merged expert tensor: 4 chunks of 1 expert
    # (ep=2 x efsdp=2) or 2 chunks of 2 (ep=2, each held by 2 replicas).
    from torch.distributed.checkpoint import FileSystemReader

    for run, chunks in (("efsdp", 4), ("hsdp", 2)):
        saved = FileSystemReader(str(tmp_path / run / "resume" / "step_000003")).read_metadata().state_dict_metadata
        experts = [m for k, m in saved.items() if k.startswith("model.") and k.endswith("experts.gate_up_proj")]
        assert experts and all(len(m.chunks) == chunks for m in experts), run
    # HSDP, not FSDP over 4: any other sharded tensor is in 2 chunks at most (one per shard rank)
    saved = FileSystemReader(str(tmp_path / "hsdp" / "resume" / "step_000003")).read_metadata().state_dict_metadata
    dense = {
        len(m.chunks)
        for k, m in saved.items()
        if k.startswith("model.") and "experts" not in k and hasattr(m, "chunks")
    }
    assert max(dense) == 2, dense


@pytest.mark.slow
def test_ep_load_reads_only_each_ranks_experts_and_exports_the_same(tmp_path):
    """model.path under ep=2: each rank reads its experts' on-disk tensors only; the gathered model equals the
    1-process load and the export equals the 1-process export file by file."""
    cfg = debug_model_config("deepseek_v3_debug", n_routed_experts=16, moe_intermediate_size=512)
    torch.manual_seed(0)
    ckpt = MTPModel.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    result = torchrun("load_worker.py", "--ep=2", str(ckpt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    on_disk = load_file(ckpt / "model.safetensors")
    experts = sum(t.numel() * t.element_size() for k, t in on_disk.items() if ".experts." in k)
    total = sum(t.numel() * t.element_size() for t in on_disk.values())
    assert experts > total / 2  # the experts dominate: reading them whole would show
    assert len(ranks) == 2 and ranks[0]["equal"] and all(r["same_export"] for r in ranks)
    for r in ranks:
        assert r["read"] <= 1.25 * total / 2 + r["unsharded"], (r, total)


def descendants(pid: int) -> list[int]:
    """Every process started under ``pid``, from /proc (Linux)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return children + [d for child in children for d in descendants(child)]


@pytest.mark.slow
def test_sigkill_with_ep_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Every process of a bf16 ep=2 run killed at once (a lost node); trainer.resume=auto on the same layout.

    The same tolerance as fp32: a resume restores the fp32 master weights, AdamW state, data position and RNG
    exactly, and the CPU kernels are deterministic, so bf16 rounds identically in both runs. (Every family's
    resume without a kill, in one process: tests/recipes/test_run_safety.py.)
    """
    args = [
        "model=minimax_m3_debug",
        "trainer.precision=bf16",
        "trainer.ep=2",
        "data.batch_size=2",
        "trainer.max_steps=12",
        "trainer.checkpoint_every=4",
        "trainer.keep_last=2",
    ]
    run_ep(tmp_path, "ref", *args, nproc=2)
    run = tmp_path / "crash"
    proc = subprocess.Popen(
        [*launcher(2), "-m", "mtp_recipes.finetune", *COMMON, *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "resume" / "step_000004").exists():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks (in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    assert len(list((run / "resume").glob("step_*"))) <= 2  # keep_last

    log = run_ep(tmp_path, "crash", *args, "trainer.resume=auto", nproc=2)
    assert re.search(r"resumed from \S+step_0000(04|08) at step", log), log[-2000:]
    ref, resumed = losses(tmp_path / "ref"), losses(run)
    assert sorted(resumed) == list(range(1, 13))
    for step in resumed:  # steps before the checkpoint from the killed run, the others recomputed
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-7), step
    wa, wb = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("crash", "ref"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)


def test_an_ep_that_cannot_split_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="trainer.ep must be >= 1"):
        to_schema(composed("trainer.ep=0"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: a replica of 1 rank
    with pytest.raises(ConfigError, match=r"trainer.ep=2 does not divide the 1 ranks of a replica") as err:
        init_world("cpu", ep=2)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_ep_that_does_not_divide_the_experts_stops_at_setup(tmp_path):
    proc = cli(
        "model=nemotron_h_debug",
        "model.config.n_routed_experts=3",
        "trainer.ep=2",
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path}/run",
        nproc=2,
        cwd=tmp_path,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "error: trainer.ep=2 does not divide the 3 routed experts of each MoE layer" in err, err[-2000:]
