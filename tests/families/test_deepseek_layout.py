"""The families whose MTP modules are laid out like DeepSeek-V3's (DeepSeek-V3, DeepSeek-V3.2, GLM-4.5): the
published key layout in and out, the tied export copies, the MTP forward."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from mtp_recipes.document_layout import position_in_document
from mtp_recipes.errors import CheckpointError
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, packed_batch, published_round_trip

# debug model -> (its attention's name for one projection, the MoE class of its MTP block)
MODELS = {
    "deepseek_v3_debug": ("self_attn.kv_a_proj_with_mqa", "DeepseekV3MoE"),
    "deepseek_v32_debug": ("self_attn.indexer.wk", "DeepseekV32MoE"),
    "glm4_moe_debug": ("self_attn.k_proj", "Glm4MoeMoE"),
}
N = debug_model_config("deepseek_v3_debug")["num_hidden_layers"]
assert all(debug_model_config(name)["num_hidden_layers"] == N for name in MODELS)


@pytest.fixture(params=sorted(MODELS))
def name(request) -> str:
    return request.param


def write_published(path, name: str, d: int = 2) -> dict[str, torch.Tensor]:
    """A tiny checkpoint laid out like the published one (deepseek-ai/DeepSeek-V3, zai-org/GLM-4.5): bf16, router
    bias fp32, MTP at layers N..N+d-1.

    The backbone and the MTP blocks come from transformers' own ``save_pretrained`` of a model with N+d
    layers (so the block keys are transformers' on-disk names, per-expert MoE tensors included); the
    MTP-only tensors are added under the names vLLM's ``deepseek_mtp`` / ``glm4_moe_mtp`` loaders read.
    """
    raw = debug_model_config(name, num_nextn_predict_layers=d)
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    hf_cfg = AutoConfig.for_model(raw["model_type"], **{**fields, "num_hidden_layers": N + d})
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(path / "full")
    tensors = load_file(path / "full" / "model.safetensors")
    h = raw["hidden_size"]
    for i in range(d):
        layer = f"model.layers.{N + i}."
        tensors[layer + "enorm.weight"] = 1 + 0.1 * torch.randn(h)
        tensors[layer + "hnorm.weight"] = 1 + 0.1 * torch.randn(h)
        tensors[layer + "eh_proj.weight"] = 0.02 * torch.randn(h, 2 * h)
        tensors[layer + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(h)
        tensors[layer + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        tensors[layer + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors = {k: v.float() if k.endswith("e_score_correction_bias") else v.bfloat16() for k, v in tensors.items()}
    (path / "pub").mkdir()
    save_file(tensors, path / "pub" / "model.safetensors", metadata={"format": "pt"})
    (path / "pub" / "config.json").write_text(json.dumps(raw))
    return tensors


def test_published_layout_survives_load_train_save(tmp_path, name):
    published = write_published(tmp_path, name)
    for i in range(2):  # the spec's names, MoE block included
        for key in ("shared_head.head", "embed_tokens", "mlp.experts.3.up_proj", MODELS[name][0]):
            assert f"model.layers.{N + i}.{key}.weight" in published
        assert published[f"model.layers.{N + i}.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    model, trained = published_round_trip(tmp_path / "pub", published, tmp_path)
    assert model.mtp_config.num_layers == 2
    out = tmp_path / "trained"
    assert not torch.equal(trained[f"model.layers.{N}.eh_proj.weight"], published[f"model.layers.{N}.eh_proj.weight"])
    for i in range(2):  # the copies follow the trained shared tensors
        assert torch.equal(trained[f"model.layers.{N + i}.shared_head.head.weight"], trained["lm_head.weight"])
        assert torch.equal(trained[f"model.layers.{N + i}.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "pub" / "config.json").read_text())


def test_tied_export_copies_are_checked_not_loaded(tmp_path, caplog, name):
    published = write_published(tmp_path, name, d=1)
    copy = f"model.layers.{N}.shared_head.head.weight"

    def variant(folder, change):
        tensors = dict(published)
        change(tensors)
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text((tmp_path / "pub" / "config.json").read_text())
        save_file(tensors, tmp_path / folder / "model.safetensors")
        return tmp_path / folder

    # A copy that drifted from lm_head: loaded anyway (tied in training), with a warning naming it.
    with caplog.at_level(logging.WARNING):
        model = MTPModel.from_pretrained(variant("drift", lambda t: t.update({copy: t[copy] + 1})))
    assert copy in caplog.text and "lm_head.weight" in caplog.text
    assert torch.equal(model.backbone.lm_head.weight.bfloat16(), published["lm_head.weight"])

    # Missing copies are accepted and written again on save.
    model = MTPModel.from_pretrained(variant("no_copies", lambda t: [t.pop(k) for k in list(t) if "head.head" in k]))
    assert copy in load_file(model.save_pretrained(tmp_path / "again") / "model.safetensors")

    # A mis-shaped copy fails in one line naming it.
    with pytest.raises(CheckpointError, match="wrong shape") as err:
        MTPModel.from_pretrained(variant("bad", lambda t: t.update({copy: t[copy][:10]})))
    assert copy in str(err.value) and "\n" not in str(err.value)


def test_mtp_forward_matches_a_plain_pytorch_reference(name):
    """Depth k: cat[enorm(emb(x_{t+k})), hnorm(h_{k-1})] -> eh_proj -> attention+MoE block -> shared_head.norm ->
    lm_head; the state *after* shared_head.norm goes on to depth k+1, and depth 1's embedding is zero at a
    document's first position (vLLM's drafter)."""
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name), num_layers=2, experts_implementation="eager").double()
    with torch.no_grad():
        for depth in model.mtp.depths:
            for norm in (depth.enorm, depth.hnorm, depth.final_norm):
                norm.weight.normal_(1.0, 0.2)
    batch = packed_batch(model.text_config.vocab_size, [[10, 6], [16]])
    ids, seq = batch["input_ids"], batch["seq_idx"]
    out = model(**batch)

    cfg = model.text_config
    pos = position_in_document(seq)
    s = ids.shape[1]
    # Causal attention inside each document, as an additive mask.
    allowed = (seq[:, :, None] == seq[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[:, None]
    # Plain RoPE over the unrolled in-document positions, on the rotated part of each head only (MLA: its
    # qk_rope_head_dim part; GLM: partial_rotary_factor of head_dim).
    if hasattr(cfg, "qk_rope_head_dim"):
        dim = cfg.qk_rope_head_dim
    else:
        dim = int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"])
    inv_freq = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = pos[..., None].double() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    emb = model.backbone.get_input_embeddings().weight
    h = out.hidden_states
    for k, depth in enumerate(model.mtp.depths, start=1):
        shifted = torch.zeros_like(ids)
        shifted[:, :-k] = torch.where(seq[:, k:] == seq[:, :-k], ids[:, k:], 0)
        e = emb[shifted].masked_fill((pos == 0)[..., None], 0.0) if k == 1 else emb[shifted]
        x = torch.cat([rms(e, depth.enorm.weight), rms(h, depth.hnorm.weight)], -1) @ depth.eh_proj.weight.T
        (block,) = depth.blocks
        assert type(block.mlp).__name__ == MODELS[name][1]  # the MTP block is MoE like the published one
        x = block(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        normed = rms(x, depth.final_norm.weight)
        # The RMSNorms and the router compute in float32 even for float64 inputs, and the rotary
        # module returns float32-precision cos/sin: agreement is at float32 level, hence 1e-6.
        torch.testing.assert_close(out.mtp_hidden_states[k - 1], normed, rtol=1e-6, atol=1e-6)
        h = normed  # passes_on = "normed"
    assert model.mtp_heads() is model.backbone.lm_head.weight
