"""A resume builds the model on meta, shards it and fills it from the resume checkpoint alone."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from mtp_recipes.model import MTPModel
from mtp_recipes.recipe import FinetuneRecipe
from tests.helpers import debug_model_config
from tests.recipes.test_finetune import composed

COMMON = ["trainer.progress_bar=false", "data.seq_len=64", "data.max_documents=24", "data.batch_size=2"]


def test_resume_never_reads_the_source_tensors(tmp_path):
    torch.manual_seed(0)
    source = MTPModel.from_config(debug_model_config("nemotron_h_debug"))
    source.config.dtype = torch.bfloat16  # on disk in bf16: the export must get bf16 back after the resume
    src = source.save_pretrained(tmp_path / "src")
    args = [*COMMON, f"model.path={src}", "model.tokenizer=builtin:debug", "trainer.max_steps=2"]

    straight = FinetuneRecipe(composed(*args, "trainer.checkpoint_every=1"), tmp_path / "straight")
    straight.run()
    expected = load_file(tmp_path / "straight" / "final" / "model.safetensors")

    on_disk = {k: v.dtype for k, v in load_file(src / "model.safetensors").items()}
    assert torch.bfloat16 in on_disk.values()
    (src / "model.safetensors").unlink()  # every read of a source tensor would now fail
    first = tmp_path / "straight" / "resume" / "step_000001"
    resumed = FinetuneRecipe(composed(*args, f"trainer.resume={first}"), tmp_path / "resumed")
    resumed.run()
    assert resumed.step == 2
    got = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype == on_disk.get(key, value.dtype) and torch.equal(got[key], value), key
    shutil.rmtree(tmp_path / "straight")
