"""``accelerate launch`` as a launcher: the same run as torchrun, and one line per accelerate setting not taken."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtp_recipes.train.launcher_env import foreign_launcher_settings
from tests.distributed.test_fsdp_and_resume import COMMON, ENV, cli, finish, losses
from tests.recipes.test_finetune import composed

# What `accelerate config` writes for FSDP with bf16 on one machine of 2 processes; accelerate launch passes it
# to the processes as environment variables (accelerate/utils/launch.py, prepare_multi_gpu_env).
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_offload_params: false
  fsdp_activation_checkpointing: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
"""


@pytest.mark.slow
def test_accelerate_launch_runs_what_torchrun_runs_and_names_the_settings_it_does_not_take(tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    args = ["trainer.precision=fp32", "trainer.max_steps=3", "data.batch_size=2"]
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "mtp_recipes.finetune"]
        + [*COMMON, *args, f"hydra.run.dir={tmp_path}/accelerate"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    finish(cli(*args, f"hydra.run.dir={tmp_path}/torchrun", nproc=2, cwd=tmp_path))
    a, b = losses(tmp_path / "accelerate"), losses(tmp_path / "torchrun")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("loss", "main_ce", "mtp_ce_1", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)  # the same processes, the same arithmetic
    output = (launched.stdout + launched.stderr).splitlines()
    said = [line for line in output if "accelerate launch asked for" in line]
    assert len(said) == 2  # rank 0 only, one line per setting
    assert "mixed_precision=bf16, which is not read here: trainer.precision" in said[0]
    assert "trainer.precision=fp32" in said[0]
    assert "FSDP plugin" in said[1] and "trainer.activation_checkpointing" in said[1]


def test_every_accelerate_setting_gets_its_line():
    trainer = composed().trainer
    assert foreign_launcher_settings(trainer, {}) == []
    assert foreign_launcher_settings(trainer, {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}) == []
    env = {
        "ACCELERATE_MIXED_PRECISION": "fp16",
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_OFFLOAD_PARAMS": "true",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
        "ACCELERATE_USE_MEGATRON_LM": "true",
    }
    lines = foreign_launcher_settings(trainer, env)
    fields = ["trainer.precision", "trainer.dp_replicate", "offload", "DeepSpeed", "trainer.grad_accum_steps"]
    fields += ["trainer.compile", "tensor/context parallelism"]
    assert len(lines) == len(fields)
    for line, name in zip(lines, fields, strict=True):
        assert name in line and "\n" not in line
    assert "(it takes bf16 or fp32)" in lines[0]
