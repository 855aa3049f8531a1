"""Our Mamba2 mixer forward: a float64 loop reference, transformers' own mixer, and packed rows == documents alone."""

import pytest
import torch
import torch.nn.functional as F
from transformers import NemotronHConfig
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.document_layout import seq_idx_from_position_ids
from mtp_recipes.families.nemotron_h_mamba import (
    BoundaryAwareMamba2Mixer,
    mamba2_mixer_forward,
    use_boundary_aware_mamba,
)
from tests.families.nemotron_h_mamba._mamba_reference import conv_reference, random_seq_idx, scan_reference
from tests.helpers import tiny_nemotron

LENGTHS = [7, 13, 9]  # chunk_size 8: boundaries inside chunks, one doc spanning a chunk edge


def tiny_config() -> NemotronHConfig:
    """The tiny Nemotron-H with every layer type, computing in float64 end to end (grouped_mm experts refuse
    fp64, eager attention softmaxes in fp32)."""
    return tiny_nemotron(
        layers_block_type=["linear_attention", "full_attention", "mlp", "moe"],
        experts_implementation="eager",
        attn_implementation="sdpa",
    )


def reference_mixer(mixer: torch.nn.Module, h: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The Mamba2 mixer written out in float64 from its parameters: loops over time, no mtp_recipes code."""
    cfg = mixer.config
    heads, head_dim, groups, state = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    inner = heads * head_dim
    p = {name: t.detach().double() for name, t in mixer.named_parameters()}
    batch, seq_len, _ = h.shape
    zxbcdt = h.double() @ p["in_proj.weight"].T
    gate, xbc, dt = zxbcdt.split([inner, inner + 2 * groups * state, heads], dim=-1)
    xbc = conv_reference(xbc.transpose(1, 2), p["conv1d.weight"][:, 0], p["conv1d.bias"], seq_idx, "silu")
    x, B, C = xbc.transpose(1, 2).split([inner, groups * state, groups * state], dim=-1)
    dt = F.softplus(dt + p["dt_bias"]).clamp(min=cfg.time_step_min)
    y, _ = scan_reference(
        x.reshape(batch, seq_len, heads, head_dim),
        dt,
        -torch.exp(p["A_log"]),
        B.reshape(batch, seq_len, groups, state),
        C.reshape(batch, seq_len, groups, state),
        D=p["D"],
        seq_idx=seq_idx,
    )
    y = y.reshape(batch, seq_len, groups, -1) * F.silu(gate).reshape(batch, seq_len, groups, -1)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)
    return (y.reshape(batch, seq_len, inner) * p["norm.weight"]) @ p["out_proj.weight"].T


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hf.NemotronHModel(tiny_config()).double().eval()


@pytest.fixture(scope="module")
def packed():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, sum(LENGTHS)))
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, position_ids, seq_idx_from_position_ids(position_ids)


def random_mixer() -> hf.NemotronHMamba2Mixer:
    """A float64 mixer with every parameter away from its init (A_log, D, dt_bias, norm would be trivial)."""
    torch.manual_seed(3)
    mixer = hf.NemotronHMamba2Mixer(tiny_config(), layer_idx=0).double()
    with torch.no_grad():
        for param in mixer.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return mixer


@pytest.mark.parametrize("seq_idx", [None, random_seq_idx(LENGTHS)[None].expand(2, -1)], ids=["unpacked", "packed"])
def test_mixer_forward_equals_float64_reference(seq_idx):
    mixer = random_mixer()
    h = torch.randn(2, sum(LENGTHS), 32, dtype=torch.float64)
    ours = mamba2_mixer_forward(mixer, h, seq_idx)
    assert (ours - reference_mixer(mixer, h, seq_idx)).abs().max() < 1e-10


@pytest.mark.parametrize("training", [False, True])
def test_mixer_forward_equals_transformers_mixer_unpacked(training):
    """transformers' own forward, unpacked. Its torch scan casts to float32 whatever the input dtype, so the
    two agree to float32 rounding (outputs are O(1)); the float64 test above pins our exact value."""
    mixer = random_mixer().train(training)
    h = torch.randn(2, sum(LENGTHS), 32, dtype=torch.float64)
    theirs = mixer(h)
    assert type(mixer) is hf.NemotronHMamba2Mixer
    assert theirs.abs().max() > 0.1
    assert (mamba2_mixer_forward(mixer, h) - theirs).abs().max() < 1e-5


def test_padding_mask_zeroes_like_transformers():
    """Right-padded, unpacked batch with a 2D mask: same outputs on real tokens as transformers' mixer."""
    mixer = random_mixer()
    h = torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    ours = mamba2_mixer_forward(mixer, h, attention_mask=mask)
    theirs = mixer(h, attention_mask=mask)
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-5
    unmasked = mamba2_mixer_forward(mixer, h)
    assert (unmasked - ours)[1, :9].abs().max() < 1e-12  # causal: padding at the end changes nothing before it


def run_alone(model, ids):
    # use_cache=False everywhere: with a cache, transformers skips packed-sequence detection for attention.
    outs, start = [], 0
    for n in LENGTHS:
        outs.append(model(input_ids=ids[:, start : start + n], use_cache=False).last_hidden_state)
        start += n
    return torch.cat(outs, dim=1)


def run_packed(model, packed, **kwargs):
    ids, position_ids, seq_idx = packed
    return model(input_ids=ids, position_ids=position_ids, use_cache=False, seq_idx=seq_idx, **kwargs)


@pytest.fixture(scope="module")
def ours(model):
    assert use_boundary_aware_mamba(model) == 1
    return model


@pytest.mark.parametrize("training", [False, True])
def test_packed_row_equals_documents_alone(ours, packed, training):
    ids = packed[0]
    alone = run_alone(ours, ids)
    ours.train(training)
    try:
        out = run_packed(ours, packed).last_hidden_state
    finally:
        ours.eval()
    # transformers' MoE router computes in float32 whatever the model dtype: rows of other lengths round
    # differently there (~3e-8); a leak between documents is > 1e-2 (test below)
    assert (out - alone).abs().max() < 1e-6


def test_without_seq_idx_documents_leak(ours, packed):
    """The test above can fail: dropping seq_idx lets the first document's state reach the others."""
    ids, position_ids, _ = packed
    leaky = ours(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
    diff = (leaky - run_alone(ours, ids)).abs().amax(dim=-1)[0]
    assert diff[: LENGTHS[0]].max() < 1e-9
    assert diff[LENGTHS[0] :].max() > 1e-2


def test_causal_lm_passes_seq_idx_and_trains(packed):
    torch.manual_seed(0)
    lm = hf.NemotronHForCausalLM(tiny_config()).double().train()
    use_boundary_aware_mamba(lm)
    ids = packed[0]
    out = run_packed(lm, packed, labels=ids)
    out.loss.backward()
    mixer = lm.model.layers[0].mixer
    grads = (mixer.A_log, mixer.D, mixer.dt_bias, mixer.conv1d.weight, mixer.norm.weight, mixer.in_proj.weight)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in grads)
    alone = torch.cat(
        [lm(input_ids=ids[:, s : s + n], use_cache=False).logits for s, n in zip([0, 7, 20], LENGTHS)], dim=1
    )
    assert (out.logits - alone).abs().max() < 1e-6  # float32 MoE router, as above


def test_generation_with_a_cache_runs_transformers_forward():
    """Cached decoding is transformers' own path: greedy generation is unchanged by the class change."""
    torch.manual_seed(0)
    lm = hf.NemotronHForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 64, (1, 6))
    before = lm.generate(prompt, max_new_tokens=5, do_sample=False)
    use_boundary_aware_mamba(lm)
    after = lm.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(before, after)


def test_class_change_is_idempotent_and_keeps_the_state_dict(model):
    fresh = hf.NemotronHModel(tiny_config())
    keys = set(fresh.state_dict())
    assert use_boundary_aware_mamba(fresh) == 1
    assert use_boundary_aware_mamba(fresh) == 0
    mixer = fresh.layers[0].mixer
    assert type(mixer) is BoundaryAwareMamba2Mixer and isinstance(mixer, hf.NemotronHMamba2Mixer)
    assert set(fresh.state_dict()) == keys
    assert type(hf.NemotronHModel(tiny_config()).layers[0].mixer) is hf.NemotronHMamba2Mixer  # transformers untouched


def test_seq_idx_from_position_ids_follows_transformers_packing_rule():
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6]])
    assert seq_idx_from_position_ids(position_ids).tolist() == find_packed_sequence_indices(position_ids).tolist()
