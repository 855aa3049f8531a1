"""FLOP counter and MFU against hand counts on tiny dense and MoE models."""

import pytest
import torch
from transformers import (
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    NemotronHForCausalLM,
)

from mtp_recipes.metrics import flops_per_token, mfu, peak_flops, peak_flops_for_name
from mtp_recipes.model import MTPModel
from mtp_recipes.train.metrics_log import log_setup
from tests.helpers import debug_model_config, tiny_nemotron
from tests.test_hf_compat import tiny_deepseek

V, H, FF, L, HEADS, KV, HD = 97, 16, 24, 2, 4, 2, 8
ATTN = H * HEADS * HD + 2 * H * KV * HD + HEADS * HD * H  # q, k, v, o


def test_dense_model_matches_hand_count():
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HD,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    per_layer = ATTN + 3 * H * FF + 2 * H  # attention, gated MLP, two norms
    hand = L * per_layer + H + V * H  # final norm, lm_head; embedding excluded
    assert flops_per_token(model) == 6 * hand
    # Causal attention scores at S=128: 3 (fwd+bwd) x 2 GEMMs x 2 FLOP x S/2 keys x heads*head_dim, per layer.
    extra = L * 3 * 2 * 2 * 64 * HEADS * HD
    assert flops_per_token(model, seq_len=128) == pytest.approx(6 * hand + extra)


def test_tied_head_is_still_a_gemm():
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HD,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    assert flops_per_token(model) == 6 * (ATTN + 3 * H * FF + 2 * H + H + V * H)


def test_moe_model_counts_top_k_of_the_routed_experts():
    experts, top_k = 4, 2
    cfg = MixtralConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HD,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(cfg)
    per_layer = ATTN + experts * H + top_k * 3 * H * FF + 2 * H  # router in full, 2 of 4 experts
    assert flops_per_token(model) == 6 * (L * per_layer + H + V * H)


def nemotron_h_hand_count(cfg) -> tuple[float, float]:
    """Active parameters of a Nemotron-H ``[mamba, attention, moe]`` stack counted from its config by hand, and
    its attention layer's (query, value) widths: Mamba2 = in_proj (x, z, B, C, dt), depthwise conv1d with bias,
    dt_bias, A_log, D, gated norm, out_proj; MoE = router in full, top-k of the non-gated experts, shared expert."""
    H, heads, head_dim = cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_head_dim
    inner, bc = heads * head_dim, 2 * cfg.n_groups * cfg.ssm_state_size
    mamba = (inner + inner + bc + heads) * H + (inner + bc) * (cfg.conv_kernel + 1) + 3 * heads + inner + inner * H
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * q * H + 2 * kv * H
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    moe = e * H + k * 2 * cfg.moe_intermediate_size * H + 2 * cfg.moe_shared_expert_intermediate_size * H
    norms = 3 * H + H  # one per block, the final one
    return mamba + attention + moe + norms + cfg.vocab_size * H, (q, q)


def test_mamba_layers_match_a_hand_count():
    cfg = tiny_nemotron()
    model = NemotronHForCausalLM(cfg)
    active, (q, v) = nemotron_h_hand_count(cfg)
    assert flops_per_token(model) == 6 * active
    assert flops_per_token(model, seq_len=128) == pytest.approx(6 * active + 3 * 2 * 64 * (q + v))


def test_mla_layers_match_a_hand_count():
    """DeepSeek-V3's multi-head latent attention: both low-rank paths and their norms; the scores' widths are
    heads x (nope + rope) for queries and keys, heads x v_head_dim for values."""
    cfg = tiny_deepseek()
    model = DeepseekV3ForCausalLM(cfg)
    H, heads = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    mla = cfg.q_lora_rank * (H + 1 + heads * qk) + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * H
    mla += cfg.kv_lora_rank * (1 + heads * (cfg.qk_nope_head_dim + v)) + heads * v * H
    dense = 3 * cfg.intermediate_size * H
    e, k, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    moe = e * H + k * 3 * inter * H + 3 * inter * cfg.n_shared_experts * H
    active = 2 * mla + dense + moe + 2 * 2 * H + H + cfg.vocab_size * H  # two layers' norms, final norm, lm_head
    assert flops_per_token(model) == 6 * active
    scores = 2 * 3 * 2 * 64 * heads * (qk + v)  # two layers at S=128
    assert flops_per_token(model, seq_len=128) == pytest.approx(6 * active + scores)


def test_mtp_model_adds_its_depths_and_one_head_gemm_per_depth():
    """A Nemotron-H MTPModel: the backbone by hand, plus its depth (fusion, its attention and MoE sublayers, their
    norms) and one more head GEMM."""
    cfg = tiny_nemotron()
    raw = {"model_type": "nemotron_h", **cfg.to_diff_dict(), "num_nextn_predict_layers": 1}
    raw["mtp_hybrid_override_pattern"] = "*E"
    model = MTPModel.from_config(raw)
    assert model.mtp.num_layers == 1 and model.family.head == "shared"
    backbone, (q, _) = nemotron_h_hand_count(cfg)
    H = cfg.hidden_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    moe = e * H + k * 2 * cfg.moe_intermediate_size * H + 2 * cfg.moe_shared_expert_intermediate_size * H
    depth = 2 * H + 2 * H * H + (2 * q * H + 2 * kv * H) + moe + 2 * H + H  # enorm, hnorm, eh_proj; blocks; final
    assert flops_per_token(model) == 6 * (backbone + depth + cfg.vocab_size * H)


def test_peak_and_mfu():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("cpu") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None
    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(6e12 / 989e12)
    assert mfu(1000.0, 6e9, None) is None


@pytest.mark.parametrize(
    ("name", "blocks"), [("nemotron_h_debug", "full_attention/moe"), ("step3p5_debug", "Step3p7DecoderLayer")]
)
def test_the_setup_line_names_what_a_depth_holds(name, blocks, caplog, tmp_path):
    """The MTP pattern where the family offers a choice, else the block classes of a depth: never empty."""
    model = MTPModel.from_config(debug_model_config(name))
    assert [type(b).__name__ for b in model.mtp.depths[0].blocks] != []
    with caplog.at_level("INFO", logger="mtp_recipes"):
        log_setup(tmp_path, model, "cpu", 1, 1_000_000)
    assert f"cpu x1 | 1.00M trainable parameters | MTP D=1 {blocks} λ=0.1" in caplog.messages
