"""Nemotron-H specifics: block patterns, exported config forms, fp32 gate bias, the MTP forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import NemotronHConfig

from mtp_recipes.families.nemotron_h import block_pattern_string, parse_block_pattern
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, packed_batch


def test_pattern_parsing_both_forms():
    assert parse_block_pattern("*E") == ("full_attention", "moe")
    assert parse_block_pattern("M*-E") == ("linear_attention", "full_attention", "mlp", "moe")
    assert parse_block_pattern(["mlp", "moe"]) == ("mlp", "moe")
    assert block_pattern_string(parse_block_pattern("E-*M")) == "E-*M"


@pytest.mark.parametrize("bad", ["", "*X", "m", [], ["attention"]])
def test_bad_patterns_raise(bad):
    with pytest.raises(ValueError, match="MTP block"):
        parse_block_pattern(bad)


def test_pattern_override_and_list_config_form():
    cfg = debug_model_config("nemotron_h_debug")
    cfg.pop("mtp_hybrid_override_pattern")
    cfg["mtp_layers_block_type"] = ["mlp", "full_attention", "moe"]
    model = MTPModel.from_config(cfg)
    assert model.mtp_config.block_types == ("mlp", "full_attention", "moe")
    assert [b.block_type for b in model.mtp.depths[0].blocks] == ["mlp", "full_attention", "moe"]
    model = MTPModel.from_config(cfg, block_types="M-")
    assert [b.block_type for b in model.mtp.depths[0].blocks] == ["linear_attention", "mlp"]


def sglang_block_types(cfg: dict) -> tuple[list[str], list[str]]:
    """SGLang 0.5.23's NemotronHConfig rules for the block lists (``srt/configs/nemotron_h.py``): the legacy
    pattern strings fill in a missing (or default) list, and every list entry must be one of four names."""
    to_list = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    layers = cfg.get("layers_block_type")
    if layers is None and cfg.get("hybrid_override_pattern") is not None:
        layers = [to_list[c] for c in cfg["hybrid_override_pattern"]]
    mtp = cfg.get("mtp_layers_block_type", ["attention", "moe"])
    if "mtp_hybrid_override_pattern" in cfg and mtp in (None, ["attention", "moe"]):
        mtp = [to_list[c] for c in cfg["mtp_hybrid_override_pattern"]]
    for name, types in (("layers_block_type", layers), ("mtp_layers_block_type", mtp)):
        if not isinstance(types, list) or set(types) - {"mamba", "attention", "mlp", "moe"}:
            raise ValueError(f"SGLang rejects {name}={types!r}")
    return layers, mtp


def test_export_config_parses_in_sglang_and_transformers_and_layers_are_flat(tmp_path):
    torch.manual_seed(0)
    raw = debug_model_config("nemotron_h_debug", mtp_layers_block_type=["full_attention", "moe"])
    with pytest.raises(ValueError):
        sglang_block_types(raw)  # transformers' names, as transformers itself writes them
    model = MTPModel.from_config(raw, num_layers=2, block_types="*E")
    model.config.dtype = torch.bfloat16
    out = model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 2
    assert cfg["mtp_hybrid_override_pattern"] == "*E"
    assert "mtp_layers_block_type" not in cfg
    layers, mtp = sglang_block_types(cfg)
    assert mtp == ["attention", "moe"] and len(layers) == len(raw["layers_block_type"])
    reread = NemotronHConfig.from_pretrained(out)
    assert reread.mtp_layers_block_type == ["full_attention", "moe"]
    assert reread.layers_block_type == raw["layers_block_type"]
    tensors = load_file(out / "model.safetensors")
    # depth d, sublayer i -> mtp.layers.{2d+i}; fusion on sublayer 0, final norm on the last.
    for d in range(2):
        assert f"mtp.layers.{2 * d}.eh_proj.weight" in tensors
        assert f"mtp.layers.{2 * d}.mixer.q_proj.weight" in tensors
        assert f"mtp.layers.{2 * d + 1}.final_layernorm.weight" in tensors
        assert f"mtp.layers.{2 * d + 1}.mixer.experts.3.up_proj.weight" in tensors
        bias = tensors[f"mtp.layers.{2 * d + 1}.mixer.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32
    assert tensors["mtp.layers.0.eh_proj.weight"].dtype == torch.bfloat16
    assert not any(k.startswith("mtp.layers.4") for k in tensors)


def test_mtp_forward_matches_a_plain_pytorch_reference():
    """Depth k: cat[enorm(emb(x_{t+k})), hnorm(h_{k-1})] -> eh_proj -> blocks -> final norm -> lm_head."""
    torch.manual_seed(0)
    model = MTPModel.from_config(
        debug_model_config("nemotron_h_debug"), num_layers=2, experts_implementation="eager"
    ).double()
    batch = packed_batch(model.text_config.vocab_size, [[16]])
    ids = batch["input_ids"]
    out = model(**batch)

    def rms(x, w, eps):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    eps = model.text_config.layer_norm_epsilon
    emb = model.backbone.get_input_embeddings().weight
    h = out.hidden_states
    for k, depth in enumerate(model.mtp.depths, start=1):
        shifted = torch.cat([ids[:, k:], torch.zeros_like(ids[:, :k])], dim=1)
        x = torch.cat([rms(emb[shifted], depth.enorm.weight, eps), rms(h, depth.hnorm.weight, eps)], -1)
        x = x @ depth.eh_proj.weight.T
        attn, moe = depth.blocks
        # attention sublayer: pre-norm, causal GQA attention without RoPE, residual
        a = rms(x, attn.norm.weight, eps)
        m = attn.mixer
        q = (a @ m.q_proj.weight.T).view(1, 16, -1, m.head_dim).transpose(1, 2)
        kk = (a @ m.k_proj.weight.T).view(1, 16, -1, m.head_dim).transpose(1, 2)
        v = (a @ m.v_proj.weight.T).view(1, 16, -1, m.head_dim).transpose(1, 2)
        rep = q.shape[1] // kk.shape[1]
        kk, v = kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ kk.transpose(-1, -2)) / m.head_dim**0.5
        scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 16, -1) @ m.o_proj.weight.T
        x = x + att
        # MoE sublayer is transformers' own module: run it on the normed input
        x = x + moe.mixer(rms(x, moe.norm.weight, eps))
        h = rms(x, depth.final_norm.weight, eps)
        # transformers' NemotronH RMSNorm computes in float32 even for float64 inputs, hence 1e-6.
        torch.testing.assert_close(out.mtp_hidden_states[k - 1], h, rtol=1e-6, atol=1e-6)
