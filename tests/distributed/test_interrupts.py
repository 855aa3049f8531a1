"""SIGTERM through torchrun: every rank checkpoints at the next step boundary before the launcher's kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from mtp_recipes.checkpoint.resume import checkpoint_problem, latest_resume
from tests.helpers import launcher

COMMON = [
    "trainer.progress_bar=false",
    "trainer.device=cpu",
    "data.seq_len=64",
    "data.max_documents=24",
    "data.batch_size=2",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_sigterm_to_torchrun_checkpoints_every_rank_before_the_kill(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*launcher(2), "-m", "mtp_recipes.finetune", *COMMON, "trainer.max_steps=100000", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what Slurm's --signal=TERM sends to the step (srun -> torchrun)
    out, err = proc.communicate(timeout=300)
    log = out + err
    # torchrun forwards SIGTERM and waits (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) before SIGKILL
    assert "forcefully exiting via" not in log, log[-3000:]
    ckpt = latest_resume(run / "resume")
    assert ckpt is not None and checkpoint_problem(ckpt) is None, log[-3000:]
    assert sorted(p.name for p in ckpt.glob("rng_rank*.json")) == ["rng_rank0.json", "rng_rank1.json"]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps[-1] >= 2
    assert steps == list(range(1, steps[-1] + 1))
    assert f"SIGTERM: stopped after step {steps[-1]} with a resume checkpoint" in log
    assert "wrote resume checkpoint" in log and "trainer.resume=auto" in log
