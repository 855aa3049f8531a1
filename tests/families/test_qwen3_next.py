"""Qwen3-Next, and Qwen3.5 where it shares Qwen3-Next's code: the linear attention against transformers' own, the
MTP forward by hand, the one physical depth; Qwen3-Next's published layout in and out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3NextConfig

from mtp_recipes.document_layout import position_in_document
from mtp_recipes.errors import ConfigError
from mtp_recipes.export_check import check_export
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, packed_batch, published_round_trip

# Qwen3.5 dense and MoE derive from the Qwen3-Next family: same MTP module, separate Gated DeltaNet projections.
MODELS = ["qwen3_next_debug", "qwen3_5_debug", "qwen3_5_moe_debug"]


@pytest.mark.parametrize("name", MODELS)
def test_linear_attention_equals_transformers_own_on_unpacked_rows(name):
    """Our training forward of the Gated DeltaNet layer against transformers' forward of the same layer (its torch
    path: conv, chunked rule, gated norm), float32, two unpacked rows."""
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name))
    layer = model.backbone.model.layers[0].linear_attn
    own = model.family.deltanet
    assert type(layer) is model.family.packed_deltanet and issubclass(type(layer), own)
    x = torch.randn(2, 150, model.text_config.hidden_size)
    torch.testing.assert_close(layer(x), own.forward(layer, x), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("name", MODELS)
def test_packed_documents_do_not_leak_through_the_linear_attention(name):
    """A packed row's second document: the same backbone states as alone; without seq_idx they differ."""
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name), experts_implementation="eager").double()
    batch = packed_batch(model.text_config.vocab_size, [[20, 12]])
    packed = model(**batch).hidden_states[0, 20:]
    alone = model(**{k: v[:, 20:] for k, v in batch.items()} | {"seq_idx": torch.zeros(1, 12, dtype=torch.long)})
    torch.testing.assert_close(packed, alone.hidden_states[0], rtol=0, atol=1e-12)
    decoder = model.backbone.get_decoder()
    leaky = decoder(input_ids=batch["input_ids"], position_ids=position_in_document(batch["seq_idx"]), use_cache=False)
    assert (leaky.last_hidden_state[0, 20:] - packed).abs().max() > 1e-3


HUB_FIELDS = {"architectures": ["Qwen3NextForCausalLM"], "torch_dtype": "bfloat16"}


def write_published(path) -> dict[str, torch.Tensor]:
    """The published layout: transformers' own save of the backbone (bf16, per-expert tensors), plus the MTP module
    at the root under the engines' names; config.json without ``num_nextn_predict_layers`` (D = 1)."""
    raw = {k: v for k, v in debug_model_config("qwen3_next_debug").items() if k != "num_nextn_predict_layers"}
    torch.manual_seed(1)
    config = Qwen3NextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path / "full")
    tensors = load_file(path / "full" / "model.safetensors")
    # the MTP layer: a full-attention decoder layer saved by transformers as layer 3 of the same model
    for key in [k for k in tensors if k.startswith("model.layers.3.")]:
        tensors["mtp.layers.0." + key[len("model.layers.3.") :]] = tensors[key].clone()
    h = raw["hidden_size"]
    for name, value in {
        "pre_fc_norm_embedding.weight": 0.1 * torch.randn(h),
        "pre_fc_norm_hidden.weight": 0.1 * torch.randn(h),
        "fc.weight": 0.05 * torch.randn(h, 2 * h),
        "norm.weight": 0.1 * torch.randn(h),
    }.items():
        tensors["mtp." + name] = value.bfloat16()
    (path / "pub").mkdir()
    save_file(tensors, path / "pub" / "model.safetensors", metadata={"format": "pt"})
    (path / "pub" / "config.json").write_text(json.dumps({**raw, **HUB_FIELDS}))
    return tensors


def test_published_layout_survives_load_train_save(tmp_path):
    published = write_published(tmp_path)
    assert (
        "mtp.layers.0.mlp.experts.3.up_proj.weight" in published and "mtp.layers.0.self_attn.q_norm.weight" in published
    )
    model, trained = published_round_trip(tmp_path / "pub", published, tmp_path)
    assert model.mtp_config.num_layers == 1
    assert not torch.equal(trained["mtp.fc.weight"], published["mtp.fc.weight"])
    exported = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert exported == json.loads((tmp_path / "pub" / "config.json").read_text())
    # without num_nextn_predict_layers the engines build their one module (vLLM's default), every tensor in place
    reports = check_export(tmp_path / "trained")
    assert [(r.engine, r.problems) for r in reports] == [(r.engine, []) for r in reports] and len(reports) == 3


@pytest.mark.parametrize("name", MODELS)
def test_mtp_forward_matches_a_plain_pytorch_reference(name):
    """``fc(cat[pre_fc_norm_embedding(emb(x_{t+1})), pre_fc_norm_hidden(h)])`` -> the full-attention layer ->
    ``mtp.norm``, norms ``x * (1 + w)``; repeated for a second step on the state after ``mtp.norm``, no embedding
    zeroed at position 0 (vLLM's and SGLang's drafters)."""
    torch.manual_seed(0)
    model = MTPModel.from_config(
        debug_model_config(name), num_layers=2, use_repeated_layer=True, experts_implementation="eager"
    )
    model = model.double()
    with torch.no_grad():
        for name, param in model.mtp.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    batch = packed_batch(model.text_config.vocab_size, [[10, 6], [16]])
    ids, seq = batch["input_ids"], batch["seq_idx"]
    out = model(**batch)
    cfg, (depth,) = model.text_config, model.mtp.depths
    pos = position_in_document(seq)
    decoder = model.backbone.get_decoder()
    mask = model.family.block_runner(model.backbone, out.hidden_states, pos, seq)

    def rms(x, w):
        return (1 + w) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    emb, h = decoder.embed_tokens.weight, out.hidden_states
    for k in (1, 2):
        shifted = torch.zeros_like(ids)
        shifted[:, :-k] = torch.where(seq[:, k:] == seq[:, :-k], ids[:, k:], 0)
        x = torch.cat([rms(emb[shifted], depth.enorm.weight), rms(h, depth.hnorm.weight)], -1) @ depth.eh_proj.weight.T
        h = rms(mask(depth.blocks[0], x), depth.final_norm.weight)
        torch.testing.assert_close(out.mtp_hidden_states[k - 1], h, rtol=1e-6, atol=1e-6)
    assert depth.blocks[0].block_type == "full_attention"
    assert type(depth.blocks[0].mlp) is type(decoder.layers[0].mlp)  # MoE in the MoE models, as vLLM builds it


@pytest.mark.parametrize("name", MODELS)
def test_more_than_one_physical_depth_is_refused_in_one_line(name):
    with pytest.raises(ConfigError, match="mtp.use_repeated_layer=true") as err:
        MTPModel.from_config(debug_model_config(name), num_layers=2)
    assert "\n" not in str(err.value) and "mtp.fc" in str(err.value)
