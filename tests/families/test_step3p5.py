"""Step-3.5 specifics: the published key layout in and out, per-depth heads, the MTP forward by hand."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers.models.step3p7 import Step3p7TextConfig
from transformers.models.step3p7 import modeling_step3p7 as hf

from mtp_recipes.document_layout import position_in_document
from mtp_recipes.families.step3p5 import SourceLists, Step3p5, Step3p5TextForCausalLM
from mtp_recipes.model import MTPModel
from mtp_recipes.model_config import config_from_dict
from tests.helpers import debug_model_config, packed_batch, published_round_trip

N = debug_model_config("step3p5_debug")["num_hidden_layers"]


def config_with_depths(d: int) -> dict:
    """The debug config.json with D=d, its per-layer lists padded with the MTP layers' entries as on the Hub.

    Depth 0 is a sliding-window layer, depth 1 a full-attention one (partial RoPE, its own rope_theta).
    """
    raw = debug_model_config("step3p5_debug")
    types = ["sliding_attention", "full_attention"][:d]
    theta = {"sliding_attention": 10000.0, "full_attention": 5000000.0}
    factor = {"sliding_attention": 1.0, "full_attention": 0.5}
    return {
        **raw,
        "num_nextn_predict_layers": d,
        "layer_types": raw["layer_types"][:N] + types,
        "rope_theta": raw["rope_theta"][:N] + [theta[t] for t in types],
        "partial_rotary_factors": raw["partial_rotary_factors"][:N] + [factor[t] for t in types],
        "swiglu_limits": raw["swiglu_limits"][:N] + [0.0] * d,
        "swiglu_limits_shared": raw["swiglu_limits_shared"][:N] + [0.0] * d,
    }


def write_published(path, d: int = 2) -> dict[str, torch.Tensor]:
    """A tiny checkpoint laid out like stepfun-ai/Step-3.5-Flash: bf16 with the router bias in fp32.

    Backbone and MTP blocks: transformers' own ``save_pretrained`` of the text causal LM with N+d layers
    (the MTP layers dense, as ``moe_layers_enum`` leaves them), so block keys sit at ``model.layers.{N+d}.``;
    then ``enorm``/``hnorm``/``eh_proj`` and ``transformer.shared_head.{norm,output}`` per MTP layer.
    """
    raw = config_with_depths(d)
    full = Step3p7TextConfig.from_dict({**raw, "num_hidden_layers": N + d, "num_nextn_predict_layers": 0})
    torch.manual_seed(1)
    Step3p5TextForCausalLM(full).save_pretrained(path / "full")
    tensors = load_file(path / "full" / "model.safetensors")
    h, v = raw["hidden_size"], raw["vocab_size"]
    for i in range(d):
        layer = f"model.layers.{N + i}."
        tensors[layer + "enorm.weight"] = 0.1 * torch.randn(h)  # (1 + w) norms: w near 0
        tensors[layer + "hnorm.weight"] = 0.1 * torch.randn(h)
        tensors[layer + "eh_proj.weight"] = 0.02 * torch.randn(h, 2 * h)
        tensors[layer + "transformer.shared_head.norm.weight"] = 0.1 * torch.randn(h)
        tensors[layer + "transformer.shared_head.output.weight"] = 0.02 * torch.randn(v, h)
    tensors = {k: v.float() if k.endswith("router_bias") else v.bfloat16() for k, v in tensors.items()}
    (path / "pub").mkdir()
    save_file(tensors, path / "pub" / "model.safetensors", metadata={"format": "pt"})
    (path / "pub" / "config.json").write_text(json.dumps(raw))
    return tensors


def test_published_layout_survives_load_train_save(tmp_path):
    published = write_published(tmp_path)
    # The names vLLM's step3p5 / step3p5_mtp loaders read: stacked MoE experts, router bias, shared
    # expert; MTP blocks directly under model.layers.{N+d}. (dense MLP), heads under .transformer.
    moe = f"model.layers.{N - 1}."
    for name in (
        "moe.gate_proj.weight",
        "moe.down_proj.weight",
        "moe.gate.weight",
        "moe.router_bias",
        "share_expert.up_proj.weight",
    ):
        assert moe + name in published, name
    for i in range(2):
        layer = f"model.layers.{N + i}."
        for name in ("eh_proj", "self_attn.g_proj", "mlp.gate_proj", "transformer.shared_head.output"):
            assert f"{layer}{name}.weight" in published, name

    model, trained = published_round_trip(tmp_path / "pub", published, tmp_path)
    assert model.mtp_config.num_layers == 2
    assert [b.attention_type for d in model.mtp.depths for b in d.blocks] == ["sliding_attention", "full_attention"]
    out = tmp_path / "trained"
    for i in range(2):  # per-depth heads are trained and stay separate from lm_head
        head = f"model.layers.{N + i}.transformer.shared_head.output.weight"
        assert not torch.equal(trained[head], published[head])
    assert torch.equal(trained[moe + "moe.router_bias"], published[moe + "moe.router_bias"])
    published = json.loads((tmp_path / "pub" / "config.json").read_text())
    # the source config, plus the field vLLM builds the attention gates from (transformers' is ``gating``)
    assert json.loads((out / "config.json").read_text()) == {**published, "use_head_wise_attn_gate": True}


def test_mtp_forward_matches_a_plain_pytorch_reference():
    """Depth k: cat[enorm(emb(x_{t+k})), hnorm(h_{k-1})] with (1 + w) norms -> eh_proj -> decoder block
    (sliding at depth 1, full at depth 2) -> shared_head.norm -> the depth's own shared_head.output; the
    block output *before* the norm goes on to depth k+1."""
    torch.manual_seed(0)
    model = MTPModel.from_config(config_with_depths(2), experts_implementation="eager").double()
    with torch.no_grad():
        for depth in model.mtp.depths:
            for norm in (depth.enorm, depth.hnorm, depth.final_norm):
                norm.weight.normal_(0.0, 0.2)
    batch = packed_batch(model.text_config.vocab_size, [[11, 5], [16]])
    ids, seq = batch["input_ids"], batch["seq_idx"]
    final_norm_input = []
    hook = model.backbone.get_decoder().norm.register_forward_pre_hook(lambda _, a: final_norm_input.append(a[0]))
    out = model(**batch)
    hook.remove()

    cfg = model.text_config
    pos = position_in_document(seq)
    s = ids.shape[1]
    in_doc = (seq[:, :, None] == seq[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    window = (torch.arange(s)[:, None] - torch.arange(s)[None, :]) < cfg.sliding_window

    def additive(allowed):
        return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[:, None]

    def rope(theta, factor):
        dim = int(cfg.head_dim * factor)  # partial RoPE: only the first dim channels rotate
        freqs = pos[..., None].double() / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    attention = {
        "sliding_attention": (additive(in_doc & window), rope(10000.0, 1.0)),
        "full_attention": (additive(in_doc), rope(5000000.0, 0.5)),
    }

    def rms1p(x, w):  # Step's (1 + w) RMSNorm
        return (1 + w) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    emb = model.backbone.get_input_embeddings().weight
    (h,) = final_norm_input  # depth 1 reads the backbone state *before* model.norm (vLLM, SGLang)
    assert (h - out.hidden_states).abs().max() > 1e-2
    for k, depth in enumerate(model.mtp.depths, start=1):
        shifted = torch.zeros_like(ids)
        shifted[:, :-k] = torch.where(seq[:, k:] == seq[:, :-k], ids[:, k:], 0)
        x = torch.cat([rms1p(emb[shifted], depth.enorm.weight), rms1p(h, depth.hnorm.weight)], -1)
        x = x @ depth.eh_proj.weight.T
        (block,) = depth.blocks
        assert type(block.mlp).__name__ == "Step3p7MLP"  # dense MTP MLP
        mask, (cos, sin) = attention[block.attention_type]
        x = block(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        normed = rms1p(x, depth.final_norm.weight)
        # Step3p7RMSNorm (also q_norm/k_norm inside the block) computes in float32 even for float64
        # inputs, and the rotary module returns float32-precision cos/sin: agreement at float32 level.
        torch.testing.assert_close(out.mtp_hidden_states[k - 1], normed, rtol=1e-6, atol=1e-6)
        head = model.mtp_heads()[k - 1]
        assert head is depth.head.weight and head is not model.backbone.lm_head.weight
        torch.testing.assert_close(out.mtp_hidden_states[k - 1] @ head.T, normed @ head.T, rtol=1e-6, atol=1e-6)
        h = x  # passes_on = "pre_norm"


def config_with_mtp_entries(limit: float = 0.05, theta: float = 100.0, factor: float = 0.5) -> dict:
    """The debug config.json (D=1, a sliding MTP layer) whose MTP entries differ from every backbone layer:
    a SwiGLU clamp small enough to bite, its own rope_theta and partial rotary factor."""
    raw = debug_model_config("step3p5_debug")
    return {
        **raw,
        "swiglu_limits": raw["swiglu_limits"][:N] + [limit],
        "swiglu_limits_shared": raw["swiglu_limits_shared"][:N] + [limit],
        "rope_theta": raw["rope_theta"][:N] + [theta],
        "partial_rotary_factors": raw["partial_rotary_factors"][:N] + [factor],
    }


def test_mtp_block_uses_its_own_per_layer_entries():
    """transformers trims the MTP entries off swiglu_limits* and resolves rope per layer type; the MTP block
    still runs as transformers' decoder layer N of the padded config would, with rope_theta[N] and
    partial_rotary_factors[N] (a hand-built rope table) and the swiglu_limits_shared[N] clamp."""
    raw = config_with_mtp_entries()
    torch.manual_seed(0)
    model = MTPModel.from_config(raw, experts_implementation="eager").double()
    assert model.text_config.swiglu_limits == raw["swiglu_limits"][:N]  # what transformers keeps
    (block,) = model.mtp.depths[0].blocks
    assert block.attention_type == "sliding_attention" and block.mlp.limit == 0.05

    # Reference: transformers' own layer N of the config with N+1 plain layers (lists untouched).
    full = Step3p7TextConfig.from_dict({**raw, "num_hidden_layers": N + 1, "num_nextn_predict_layers": 0})
    ref = hf.Step3p7DecoderLayer(full, layer_idx=N).double()
    ref.load_state_dict(block.state_dict())
    assert type(ref.mlp) is type(block.mlp) and ref.mlp.limit == 0.05

    s = 12
    pos = torch.arange(s)[None]
    x = torch.randn(1, s, model.text_config.hidden_size, dtype=torch.float64)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & (i - j < full.sliding_window)
    mask = torch.zeros(s, s, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None, None]
    dim = int(full.head_dim * 0.5)  # partial_rotary_factors[N]: half the channels rotate, base 100
    freqs = pos[..., None].double() / 100.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    emb = torch.cat([freqs, freqs], -1)
    expected = ref(x, attention_mask=mask, position_ids=pos, position_embeddings=(emb.cos(), emb.sin()))

    run = model.family.block_runner(model.backbone, x, pos, None)
    torch.testing.assert_close(run(block, x), expected, rtol=1e-6, atol=1e-6)

    # Both entries matter here: the backbone's sliding rope, or no clamp, give other outputs.
    backbone_rope = model.backbone.get_decoder().rotary_emb(x, pos, "sliding_attention")
    other = ref(x, attention_mask=mask, position_ids=pos, position_embeddings=backbone_rope)
    assert not torch.allclose(other, expected, atol=1e-4)
    ref.mlp.limit = float("inf")
    unclamped = ref(x, attention_mask=mask, position_ids=pos, position_embeddings=(emb.cos(), emb.sin()))
    assert not torch.allclose(unclamped, expected, atol=1e-4)


def test_lists_without_mtp_entries_fall_back_to_the_last_backbone_layer_of_the_type():
    lists = ("swiglu_limits", "swiglu_limits_shared", "rope_theta", "partial_rotary_factors")
    short = {k: v[:N] if k in lists else v for k, v in debug_model_config("step3p5_debug").items()}
    # Sliding MTP layer: the last sliding backbone layer is layer 2 (shared clamp 16, theta 1e4, factor 1).
    expected = {
        "layer_type": "sliding_attention",
        "swiglu_limit": 7.0,
        "swiglu_limit_shared": 16.0,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 1.0,
    }
    config = config_from_dict(short)
    assert Step3p5.layer_entries(config, 0, SourceLists.of(config, short)) == expected
    assert Step3p5.layer_entries(config, 0, None) == expected  # no source dict: the trimmed lists
    (block,) = MTPModel.from_config(short).mtp.depths[0].blocks
    assert block.mlp.limit == 16.0


def test_export_keeps_per_layer_lists_consistent_with_d(tmp_path):
    raw = config_with_mtp_entries()
    torch.manual_seed(0)
    ckpt = MTPModel.from_config(raw).save_pretrained(tmp_path / "ckpt")
    (ckpt / "config.json").write_text(json.dumps(raw))  # the hub form: lists padded with the MTP entry
    padded = ("layer_types", "swiglu_limits", "swiglu_limits_shared", "rope_theta", "partial_rotary_factors")

    # D unchanged: untouched, but for the field vLLM builds the attention gates from
    assert MTPModel.from_pretrained(ckpt).export_config() == {**raw, "use_head_wise_attn_gate": True}
    grown = MTPModel.from_pretrained(ckpt, num_layers=3, init="extend")
    out = grown.export_config()
    assert out["num_nextn_predict_layers"] == 3
    for key in padded:  # N + 3 entries; the new depths repeat the checkpoint's MTP entry, as built
        assert out[key] == raw[key] + [raw[key][N]] * 2, key
    assert [b.mlp.limit for d in grown.mtp.depths for b in d.blocks] == [0.05] * 3
    none = MTPModel.from_pretrained(ckpt, num_layers=0, init="from_scratch").export_config()
    assert none["num_nextn_predict_layers"] == 0 and all(none[key] == raw[key][:N] for key in padded)

    # A model built from the dict exports transformers' JSON: also consistent, and it reloads the same.
    scratch = MTPModel.from_config(raw, num_layers=2).export_config()
    assert all(len(scratch[key]) == N + 2 for key in padded)
    again = MTPModel.from_config(scratch)
    (block,) = again.mtp.depths[1].blocks
    assert block.mlp.limit == 0.05
    assert block.self_attn.config.rope_parameters["sliding_attention"]["rope_theta"] == 100.0
