"""A tiny Nemotron-H (M * - E) in float64: a packed row must equal its documents run one by one."""

import pytest
import torch
from transformers import NemotronHConfig
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.mamba import (
    BoundaryAwareNemotronHMamba2Mixer,
    restore_default_mamba,
    use_boundary_aware_mamba,
)
from mtp_recipes.packed import seq_idx_from_position_ids

LENGTHS = [7, 13, 9]  # chunk_size 8: boundaries inside chunks, one doc spanning a chunk edge


def tiny_config() -> NemotronHConfig:
    return NemotronHConfig(
        vocab_size=64, hidden_size=32, layers_block_type=["linear_attention", "full_attention", "mlp", "moe"],
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_shared_expert_intermediate_size=16,
        # float64 end to end: grouped_mm experts refuse fp64, eager attention softmaxes in fp32
        experts_implementation="eager", attn_implementation="sdpa",
    )


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


@pytest.fixture
def patched(model):
    assert use_boundary_aware_mamba(model) == 1
    yield model
    assert restore_default_mamba(model) == 1


def test_unpatched_fallback_leaks_across_documents(model, packed):
    ids, position_ids, seq_idx = packed
    leaky = model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
    diff = (leaky - run_alone(model, ids)).abs().amax(dim=-1)[0]
    assert diff[: LENGTHS[0]].max() < 1e-5  # the first document has nothing to leak from
    assert diff[LENGTHS[0] :].max() > 1e-2
    # Handing transformers seq_idx does not help without the CUDA kernels: 5.23 refuses it (older 5.x ignore it).
    try:
        ignored = run_packed(model, packed).last_hidden_state
    except ValueError as err:
        assert "packed sequences" in str(err)
    else:
        assert (ignored - run_alone(model, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("training", [False, True])
def test_patched_packed_row_equals_documents_alone(patched, packed, training):
    ids = packed[0]
    alone = run_alone(patched, ids)
    patched.train(training)
    try:
        out = run_packed(patched, packed).last_hidden_state
    finally:
        patched.eval()
    assert (out - alone).abs().max() < 1e-9


def test_causal_lm_passes_seq_idx_and_trains(packed):
    torch.manual_seed(0)
    lm = hf.NemotronHForCausalLM(tiny_config()).double().train()
    use_boundary_aware_mamba(lm)
    ids = packed[0]
    out = run_packed(lm, packed, labels=ids)
    out.loss.backward()
    mixer = lm.model.layers[0].mixer
    assert all(torch.isfinite(p.grad).all() for p in (mixer.A_log, mixer.D, mixer.dt_bias, mixer.conv1d.weight))
    alone = torch.cat([lm(input_ids=ids[:, s : s + n], use_cache=False).logits
                       for s, n in zip([0, 7, 20], LENGTHS)], dim=1)
    assert (out.logits - alone).abs().max() < 1e-9


def test_padding_mask_path_unchanged(patched):
    """Right-padded, unpacked batch: the attention_mask -> apply_mask_to_padding_states path is upstream's."""
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    ours = patched(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    restore_default_mamba(patched)
    try:
        theirs = patched(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        use_boundary_aware_mamba(patched)
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-5  # transformers' scan computes in fp32


def test_patch_is_idempotent_and_reversible(model):
    keys = set(model.state_dict())
    assert use_boundary_aware_mamba(model) == 1
    assert use_boundary_aware_mamba(model) == 0
    mixer = model.layers[0].mixer
    assert type(mixer) is BoundaryAwareNemotronHMamba2Mixer and isinstance(mixer, hf.NemotronHMamba2Mixer)
    assert set(model.state_dict()) == keys
    assert restore_default_mamba(model) == 1
    assert type(model.layers[0].mixer) is hf.NemotronHMamba2Mixer
    assert hf.causal_conv1d_fn.__module__ == hf.__name__  # transformers itself was never modified


def test_seq_idx_from_position_ids_follows_transformers_packing_rule():
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6]])
    assert seq_idx_from_position_ids(position_ids).tolist() == find_packed_sequence_indices(position_ids).tolist()
