"""How a multimodal checkpoint nests the language model: both directions, the towers, and resume checkpoints written
before nestings were recorded."""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_recipes.checkpoint.nesting import TEXT, Nesting, find_nesting
from mtp_recipes.checkpoint.provenance import Provenance

QWEN = Nesting("model.language_model.", "model.", ("lm_head.", "mtp."))
MINIMAX = Nesting("language_model.")


def test_keys_map_both_ways_and_the_towers_are_nobody_s():
    disk = {
        "model.language_model.layers.0.mlp.gate.weight": "model.layers.0.mlp.gate.weight",
        "model.language_model.embed_tokens.weight": "model.embed_tokens.weight",
        "lm_head.weight": "lm_head.weight",
        "mtp.layers.0.input_layernorm.weight": "mtp.layers.0.input_layernorm.weight",
        "model.visual.blocks.0.attn.qkv.weight": None,
    }
    assert {k: QWEN.to_memory(k) for k in disk} == disk
    assert all(QWEN.to_disk(m) == k for k, m in disk.items() if m is not None)
    assert MINIMAX.to_memory("language_model.lm_head.weight") == "lm_head.weight"
    assert MINIMAX.to_memory("vision_tower.patch_embed.weight") is None
    assert MINIMAX.to_disk("model.mtp.layers.0.enorm.weight") == "language_model.model.mtp.layers.0.enorm.weight"
    assert TEXT.to_memory("model.visual.x") == TEXT.to_disk("model.visual.x") == "model.visual.x"


def test_the_nesting_is_found_from_the_keys():
    assert find_nesting([MINIMAX, QWEN], ["lm_head.weight", "model.language_model.norm.weight"]) == QWEN
    assert find_nesting([QWEN], ["model.norm.weight", "lm_head.weight"]) == TEXT


def test_resume_checkpoints_keep_the_nesting_and_read_the_older_prefix(tmp_path):
    saved = Provenance(disk_dtypes={"lm_head.weight": torch.bfloat16}, nesting=QWEN)
    saved.passthrough = {"model.visual.x": tmp_path / "model.safetensors"}
    restored = Provenance()
    restored.restore_export_json(saved.export_json())
    assert (restored.nesting, restored.passthrough, restored.disk_dtypes) == (
        QWEN,
        saved.passthrough,
        saved.disk_dtypes,
    )
    older = {"disk_dtypes": {}, "prefix": "language_model.", "passthrough": {"v": str(Path("f"))}, "dequantized": False}
    restored.restore_export_json(older)
    assert restored.nesting == MINIMAX
