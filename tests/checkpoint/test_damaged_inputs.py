"""Damaged or unreachable checkpoints are one line saying what is wrong and what to do, never a traceback."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from mtp_recipes.checkpoint import locate
from mtp_recipes.checkpoint.atomic import recover_interrupted_writes
from mtp_recipes.checkpoint.locate import resolve_model_dir
from mtp_recipes.errors import CheckpointError
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    return MTPModel.from_config(debug_model_config("deepseek_v3_debug")).save_pretrained(
        tmp_path_factory.mktemp("ckpt") / "model"
    )


def copy_of(saved, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for f in saved.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", r"model.safetensors is not a readable safetensors file \(.*\); it is truncated or damaged"),
        ("garbage", r"model.safetensors is not a readable safetensors file"),
    ],
)
def test_a_truncated_or_garbage_safetensors_file_is_one_line(saved, tmp_path, damage, match):
    ckpt = copy_of(saved, tmp_path)
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        weights.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=match) as err:
        MTPModel.from_pretrained(ckpt)
    assert "\n" not in str(err.value) and "download it again" in str(err.value)


def test_a_sharded_checkpoint_missing_a_shard_or_with_a_bad_index_is_one_line(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    with safe_open(saved / "model.safetensors", framework="pt") as f:
        index = {"weight_map": {k: "model-00002-of-00002.safetensors" for k in f.keys()}}
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors (is missing|is not a readable)"):
        MTPModel.from_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is not a valid safetensors index"):
        MTPModel.from_pretrained(ckpt)


def test_a_hub_error_keeps_its_message_and_the_hint_names_hf_download(monkeypatch):
    import huggingface_hub

    def refuse(repo_id, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/models/acme/secret")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(locate, "hub_unreachable", lambda: None)  # the Hub answers, and refuses
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir("acme/secret")
    message = str(err.value)
    assert "401 Client Error: Unauthorized" in message and "hf download acme/secret --local-dir DIR" in message
    assert "\n" not in message


def test_an_unreachable_hub_is_asked_nothing_and_the_cache_is_tried(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def from_cache(repo_id, **kwargs):
        calls.append(kwargs)
        if repo_id == "acme/cached":
            return str(tmp_path)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", from_cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert locate.hub_unreachable() == "127.0.0.1 cannot be reached (Connection refused)"
    assert resolve_model_dir("acme/cached") == tmp_path
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir("acme/elsewhere")
    assert "(127.0.0.1 cannot be reached (Connection refused)) and it is not in the local Hugging Face cache" in str(
        err.value
    )
    assert [c["local_files_only"] for c in calls] == [True, True]


def test_interrupted_atomic_writes_are_undone(tmp_path):
    (tmp_path / ".final.tmp-11").mkdir()  # a partial export: removed
    (tmp_path / ".final.old-12").mkdir()  # the previous export moved aside, the new one never renamed in
    (tmp_path / ".final.old-12" / "config.json").write_text("{}")
    (tmp_path / "step_000004").mkdir()
    (tmp_path / ".step_000004.old-13").mkdir()  # both renames done, the old copy not yet deleted
    done = recover_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step_000004"]
    assert (tmp_path / "final" / "config.json").read_text() == "{}"
    assert len(done) == 3 and any("restored" in line for line in done)
