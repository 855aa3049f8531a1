"""Qwen3.5 (dense and MoE): the published VL checkpoint layout in and out (language model nested under
``model.language_model.``, ``lm_head`` and ``mtp`` at the root, the vision tower copied through, the experts as the
source stored them), through a resume too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from mtp_recipes.export_check import check_export
from mtp_recipes.recipe import FinetuneRecipe
from tests.helpers import debug_model_config, published_round_trip
from tests.recipes.test_finetune import FAST, composed

NEST = "model.language_model."
VISUAL = {"model.visual.blocks.0.attn.qkv.weight": (96, 32), "model.visual.merger.linear_fc2.weight": (64, 32)}
VL_FIELDS = {"image_token_id": 7, "video_token_id": 8, "vision_start_token_id": 9, "vision_end_token_id": 10}


def write_published(path: Path, name: str, experts: str) -> dict[str, torch.Tensor]:
    """A tiny checkpoint laid out as the published Qwen3.5 ones: the VL config.json (``mtp_num_hidden_layers`` in
    its text config), bf16 tensors, random everywhere so "bit-exact" means something. ``experts``: ``stacked`` (the
    in-memory layout, as the published MoE checkpoints store them) or ``per_expert`` (transformers' save)."""
    text = {**debug_model_config(name), "mtp_use_dedicated_embeddings": False}
    config = AutoConfig.for_model(**text)
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if experts == "per_expert":
        lm.save_pretrained(path / "text")
        tensors = load_file(path / "text" / "model.safetensors")
    else:
        tensors = {k: v.clone() for k, v in lm.state_dict().items()}
    h = config.hidden_size
    last = f"model.layers.{config.num_hidden_layers - 1}."  # full attention: the MTP layer's shape
    tensors |= {"mtp.layers.0." + k[len(last) :]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    tensors |= {f"mtp.{n}.weight": torch.zeros(h) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    tensors["mtp.fc.weight"] = torch.zeros(h, 2 * h)
    tensors = {NEST + k[len("model.") :] if k.startswith("model.") else k: v for k, v in tensors.items()}
    tensors |= {k: torch.zeros(shape) for k, shape in VISUAL.items()}
    g = torch.Generator().manual_seed(2)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.05).bfloat16() for k, v in tensors.items()}
    vl_type = text["model_type"].removesuffix("_text")
    raw = {
        "architectures": [
            "Qwen3_5MoeForConditionalGeneration" if "moe" in vl_type else "Qwen3_5ForConditionalGeneration"
        ],
        "model_type": vl_type,
        "text_config": text,
        "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 2, "out_hidden_size": h, "model_type": vl_type},
        "tie_word_embeddings": False,
        **VL_FIELDS,
    }
    (path / "pub").mkdir(parents=True)
    save_file(tensors, path / "pub" / "model.safetensors", metadata={"format": "pt"})
    (path / "pub" / "config.json").write_text(json.dumps(raw))
    return tensors


@pytest.mark.parametrize(
    ("name", "experts"),
    [("qwen3_5_debug", "dense"), ("qwen3_5_moe_debug", "stacked"), ("qwen3_5_moe_debug", "per_expert")],
)
def test_published_vl_layout_survives_load_train_save(name, experts, tmp_path):
    published = write_published(tmp_path, name, experts)
    stacked = f"{NEST}layers.0.mlp.experts.gate_up_proj"
    assert (stacked in published) == (experts == "stacked")
    model, trained = published_round_trip(tmp_path / "pub", published, tmp_path)
    assert model.mtp_config.num_layers == 1 and type(model.backbone).__name__.endswith("ForCausalLM")
    for key in VISUAL:
        assert torch.equal(trained[key], published[key]), key  # the vision tower is copied through
    for key in ("mtp.fc.weight", f"{NEST}embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(trained[key], published[key]), key  # trained, written back under its own name
    exported = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert exported == json.loads((tmp_path / "pub" / "config.json").read_text())
    reports = check_export(tmp_path / "trained")
    assert [(r.engine, r.problems) for r in reports] == [(r.engine, []) for r in reports] and len(reports) == 3


def test_a_resumed_run_exports_the_vl_layout_of_its_source(tmp_path):
    """The resume never opens the source's tensors: the nesting, the vision tower's files and the experts' on-disk
    layout come from the resume checkpoint, and the export equals the uninterrupted run's."""
    write_published(tmp_path, "qwen3_5_moe_debug", "stacked")
    args = [
        *FAST,
        "model=qwen3_5_moe_debug",
        f"model.path={tmp_path / 'pub'}",
        "trainer.device=cpu",
        "trainer.max_steps=3",
        "trainer.checkpoint_every=2",
        "data.batch_size=2",
    ]
    FinetuneRecipe(composed(*args), tmp_path / "ref").run()
    run = Path(shutil.copytree(tmp_path / "ref", tmp_path / "stopped"))
    shutil.rmtree(run / "final")
    FinetuneRecipe(composed(*args, "trainer.resume=auto"), run).run()
    resumed, reference = (load_file(r / "final" / "model.safetensors") for r in (run, tmp_path / "ref"))
    published = load_file(tmp_path / "pub" / "model.safetensors")
    assert set(resumed) == set(reference) == set(published)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
    for key in VISUAL:
        assert torch.equal(resumed[key], published[key]), key
