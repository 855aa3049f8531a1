"""MiMo-V2-Flash: the published layout and config.json in and out, the MTP layer as the engines compute it from the
export, the fields the engines read, and the donor of a new MTP block."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MiMoV2FlashConfig

from mtp_recipes.errors import ConfigError
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, packed_batch, published_round_trip

# A published-style config.json (XiaomiMiMo/MiMo-V2-Flash's own field names, no field for D) at debug size.
HUB = {
    "architectures": ["MiMoV2FlashForCausalLM"],
    "model_type": "mimo_v2_flash",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 24,
    "v_head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 24,
    "swa_v_head_dim": 16,
    "hybrid_layer_pattern": [0, 1, 1],
    "moe_layer_freq": [0, 1, 1],
    "sliding_window": 6,
    "sliding_window_size": 6,
    "rope_theta": 5000000,
    "swa_rope_theta": 10000,
    "partial_rotary_factor": 0.334,
    "layernorm_epsilon": 1e-05,
    "attention_value_scale": 0.707,
    "add_swa_attention_sink_bias": True,
    "add_full_attention_sink_bias": False,
    "n_routed_experts": 4,
    "n_shared_experts": None,
    "num_experts_per_tok": 2,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
}
MTP_LAYER = (  # one published MTP layer's tensors (vLLM mimo_v2_mtp.py names)
    "enorm.weight",
    "hnorm.weight",
    "eh_proj.weight",
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.attention_sink_bias",
    "pre_mlp_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "final_layernorm.weight",
)


def write_published(path) -> dict[str, torch.Tensor]:
    """The backbone from transformers' own save_pretrained (on-disk names, bf16 with its float32 tensors), plus three
    MTP layers at ``model.mtp.layers.{0,1,2}`` under the published names."""
    torch.manual_seed(1)
    config = MiMoV2FlashConfig(**{k: v for k, v in HUB.items() if k != "model_type"})
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path / "full")
    tensors = load_file(path / "full" / "model.safetensors")
    h, heads, kv, dq, dv = 64, 4, 2, 24, 16
    shapes = {
        "eh_proj.weight": (h, 2 * h),
        "self_attn.q_proj.weight": (heads * dq, h),
        "self_attn.k_proj.weight": (kv * dq, h),
        "self_attn.v_proj.weight": (kv * dv, h),
        "self_attn.o_proj.weight": (h, heads * dv),
        "self_attn.attention_sink_bias": (heads,),
        "mlp.gate_proj.weight": (128, h),
        "mlp.up_proj.weight": (128, h),
        "mlp.down_proj.weight": (h, 128),
    }
    for i in range(3):
        for name in MTP_LAYER:
            value = 0.05 * torch.randn(shapes[name]) if name in shapes else 1 + 0.1 * torch.randn(h)
            tensors[f"model.mtp.layers.{i}.{name}"] = value.bfloat16()
    (path / "pub").mkdir()
    save_file(tensors, path / "pub" / "model.safetensors", metadata={"format": "pt"})
    (path / "pub" / "config.json").write_text(json.dumps(HUB))
    return tensors


def test_published_layout_survives_load_train_save(tmp_path):
    published = write_published(tmp_path)
    model, trained = published_round_trip(tmp_path / "pub", published, tmp_path)
    assert model.mtp_config.num_layers == 3  # the published D, which its config.json does not state
    # the window counts the query, on transformers 5.19 (which reads the published sliding_window as is) as on 5.20+
    assert model.text_config.sliding_window == HUB["sliding_window_size"] + 1
    assert not torch.equal(trained["model.mtp.layers.0.eh_proj.weight"], published["model.mtp.layers.0.eh_proj.weight"])
    exported = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert exported == HUB


def test_a_config_whose_own_fields_disagree_with_transformers_is_refused(tmp_path):
    """transformers ignores the hub's field names; the engines read them: a disagreement is one line, not a model
    trained with another attention than the served one."""
    write_published(tmp_path)
    changed = {**HUB, "swa_rope_theta": 20000, "hybrid_layer_pattern": [0, 1, 0]}
    (tmp_path / "pub" / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ConfigError) as err:
        MTPModel.from_pretrained(tmp_path / "pub")
    message = str(err.value)
    assert "swa_rope_theta=20000" in message and "hybrid_layer_pattern=[0, 1, 0]" in message and "\n" not in message


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def engine_mtp_layer(t, prefix, cfg, emb, prev, seq):
    """vLLM's MiMoV2MTPLayer.forward (SGLang's MiMoV2ModelNextN is the same math), from the exported tensors and the
    config.json fields the engines read, in float64, for one packed row: sliding-window attention over the
    ``sliding_window_size`` previous tokens of the same document plus the query, attention sinks in the softmax,
    values scaled, NeoX RoPE on the first ``partial_rotary_factor`` of each head."""
    w = {name: t[prefix + name].double() for name in MTP_LAYER}
    eps = cfg["layernorm_epsilon"]
    x = torch.cat([rms(emb, w["enorm.weight"], eps), rms(prev, w["hnorm.weight"], eps)], -1) @ w["eh_proj.weight"].T
    s = x.shape[0]
    heads, kv, dq, dv = (
        cfg[k] for k in ("swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim")
    )
    a = rms(x, w["input_layernorm.weight"], eps)
    q = (a @ w["self_attn.q_proj.weight"].T).view(s, heads, dq)
    k = (a @ w["self_attn.k_proj.weight"].T).view(s, kv, dq)
    v = (a @ w["self_attn.v_proj.weight"].T).view(s, kv, dv) * cfg["attention_value_scale"]
    pos = torch.cat([torch.arange(int((seq == d).sum())) for d in seq.unique_consecutive()]).double()
    rot = int(dq * cfg["partial_rotary_factor"])
    inv_freq = 1.0 / cfg["swa_rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.cat([pos[:, None] * inv_freq] * 2, -1)[:, None]

    def rope(x):
        r, rest = x[..., :rot], x[..., rot:]
        half = torch.cat([-r[..., rot // 2 :], r[..., : rot // 2]], -1)
        return torch.cat([r * angles.cos() + half * angles.sin(), rest], -1)

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    allowed = (j <= i) & (i - j <= cfg["sliding_window_size"]) & (seq[:, None] == seq[None])
    scores = torch.einsum("ihd,jhd->hij", q, k) * dq**-0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = w["self_attn.attention_sink_bias"][:, None, None].expand(heads, s, 1)
    probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    attn = torch.einsum("hij,jhd->ihd", probs, v).reshape(s, heads * dv) @ w["self_attn.o_proj.weight"].T
    x = x + attn
    m = rms(x, w["pre_mlp_layernorm.weight"], eps)
    gate, up = m @ w["mlp.gate_proj.weight"].T, m @ w["mlp.up_proj.weight"].T
    x = x + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return rms(x, w["final_layernorm.weight"], eps)


def test_mtp_layers_equal_the_engines_math_on_the_export(tmp_path):
    """Two depths trained chained as the engines draft: depth 1 reads the final-normed backbone state, depth 2 the
    state after depth 1's final_layernorm; no embedding zeroed at position 0. Computed by hand from the export of a
    debug model (built by transformers, so the hub fields vLLM reads are the ones the export writes)."""
    torch.manual_seed(0)
    model = MTPModel.from_config(
        debug_model_config("mimo_v2_flash_debug"), num_layers=2, experts_implementation="eager"
    )
    with torch.no_grad():
        for name, param in model.mtp.named_parameters():
            if "norm" in name or "sinks" in name:
                param.normal_(1.0, 0.3)
    model = model.double()
    out_dir = model.save_pretrained(tmp_path / "export")
    cfg = json.loads((out_dir / "config.json").read_text())
    t = load_file(out_dir / "model.safetensors")
    assert cfg["sliding_window_size"] < 10  # the window cuts into the 14-token document

    batch = packed_batch(model.text_config.vocab_size, [[14, 10]], seed=3)
    out = model(**batch)
    ids, seq = batch["input_ids"][0], batch["seq_idx"][0]
    emb = t["model.embed_tokens.weight"].double()
    prev = out.hidden_states[0].double()
    for k in (1, 2):
        shifted = torch.zeros_like(ids)
        shifted[:-k] = torch.where(seq[k:] == seq[:-k], ids[k:], 0)
        prev = engine_mtp_layer(t, f"model.mtp.layers.{k - 1}.", cfg, emb[shifted], prev, seq)
        torch.testing.assert_close(out.mtp_hidden_states[k - 1][0], prev, rtol=1e-6, atol=1e-6)


def test_export_writes_the_fields_the_engines_read():
    """A model built by transformers (no hub fields) exports the published field names with its own values."""
    model = MTPModel.from_config(debug_model_config("mimo_v2_flash_debug"))
    cfg = model.export_config()
    text = model.text_config
    assert cfg["hybrid_layer_pattern"] == [0, 1] and cfg["moe_layer_freq"] == [0, 1]
    assert cfg["sliding_window_size"] == text.sliding_window - 1 == 8
    assert cfg["swa_num_key_value_heads"] == 2 * text.num_key_value_heads
    assert cfg["swa_rope_theta"] == text.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg["layernorm_epsilon"] == text.rms_norm_eps and cfg["add_swa_attention_sink_bias"] is True
    assert cfg["num_nextn_predict_layers"] == 1
    # Reloading the export reads those fields back and agrees with them.
    assert MiMoV2FlashConfig.from_dict(cfg).sliding_window == text.sliding_window


def test_a_new_block_starts_from_the_last_sliding_attention_and_the_dense_mlp():
    model = MTPModel.from_config(debug_model_config("mimo_v2_flash_debug"), init="from_scratch")
    (block,) = model.mtp.depths[0].blocks
    full_dense, sliding_moe = model.backbone.model.layers
    assert sliding_moe.self_attn.layer_type == "sliding_attention" and not hasattr(sliding_moe.mlp, "gate_proj")
    for name, param in block.self_attn.named_parameters():
        assert torch.equal(param, dict(sliding_moe.self_attn.named_parameters())[name]), name
    for name, param in block.mlp.named_parameters():
        assert torch.equal(param, dict(full_dense.mlp.named_parameters())[name]), name
    assert torch.equal(block.input_layernorm.weight, sliding_moe.input_layernorm.weight)


def test_sdpa_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa") as err:
        MTPModel.from_config(debug_model_config("mimo_v2_flash_debug"), attn_implementation="sdpa")
    assert "\n" not in str(err.value) and "eager" in str(err.value)
