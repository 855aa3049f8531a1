"""FLOP counter and MFU against hand counts on tiny dense and MoE models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from mtp_recipes.metrics import flops_per_token, mfu, peak_flops, peak_flops_for_name
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config

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


def test_mtp_model_adds_its_depths_and_one_head_gemm_per_depth():
    model = MTPModel.from_config(debug_model_config("nemotron_h_debug"))
    cfg = model.text_config
    assert model.mtp.num_layers == 1 and model.family.head == "shared"
    depth = model.mtp.depth(1)
    depth_active = 0.0
    for name, p in depth.named_parameters():
        if p is model.backbone.get_input_embeddings().weight:
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1.0
        depth_active += p.numel() * share
    head = cfg.vocab_size * cfg.hidden_size
    assert flops_per_token(model) == pytest.approx(flops_per_token(model.backbone) + 6 * (depth_active + head))


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
