"""A full disk (or any failure) while saving keeps the previous checkpoint and leaves no partial copy."""

from __future__ import annotations

import errno

import pytest
import torch

import mtp_recipes.checkpoint.hf as hf
from mtp_recipes.errors import CheckpointError
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config("nemotron_h_debug"))
    target = model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a newer state that must not half-replace the old one
    written = []

    def full_disk(tensors, path, metadata=None):
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device while writing") as err:
        model.save_pretrained(target)
    assert written and "\n" not in str(err.value) and "previous checkpoint" in str(err.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    monkeypatch.undo()
    reloaded = MTPModel.from_pretrained(target)
    assert not torch.equal(next(reloaded.parameters()), next(model.parameters()))
