"""ssd_chunk_scan against a sequential per-timestep float64 recurrence with resets at document starts."""

import pytest
import torch
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.families.nemotron_h_mamba import ssd_chunk_scan
from tests.families.nemotron_h_mamba._mamba_reference import random_seq_idx, scan_reference

HEADS, HEAD_DIM, GROUPS, STATE = 4, 3, 2, 5


def packed_rows() -> torch.Tensor:
    """S = 37. Row 0: boundaries exactly at chunk edges for chunk 8 (8, 16, 24) plus length-1 docs; row 1: a
    length-1 doc at a chunk's last position (15) and one as the row's last token."""
    return torch.stack([random_seq_idx([8, 1, 7, 1, 7, 13]), random_seq_idx([15, 1, 9, 11, 1])])


def make_inputs(seq_len: int, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).requires_grad_(requires_grad)

    return {
        "x": r(2, seq_len, HEADS, HEAD_DIM),
        "dt": r(2, seq_len, HEADS, scale=0.5),
        "A": (-torch.rand(HEADS, generator=g) - 0.3).to(dtype).requires_grad_(requires_grad),
        "B": r(2, seq_len, GROUPS, STATE),
        "C": r(2, seq_len, GROUPS, STATE),
        "D": r(HEADS),
        "dt_bias": r(HEADS, scale=0.3),
    }


def reference(t, seq_idx, initial_states=None):
    return scan_reference(
        *(t[k].double() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")),
        dt_softplus=True,
        seq_idx=seq_idx,
        initial_states=None if initial_states is None else initial_states.double(),
    )


def ours(t, chunk_size, seq_idx, initial_states=None):
    return ssd_chunk_scan(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        chunk_size,
        D=t["D"],
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        seq_idx=seq_idx,
        initial_states=initial_states,
        return_final_states=True,
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk_size", [8, 5, 64])
@pytest.mark.parametrize("packed", [True, False])
def test_matches_sequential_reference(dtype, tol, chunk_size, packed):
    seq_idx = packed_rows() if packed else None
    t = make_inputs(37, dtype)
    y, final = ours(t, chunk_size, seq_idx)
    y_ref, final_ref = reference(t, seq_idx)
    assert y.dtype == dtype
    assert (y.double() - y_ref).abs().max() < tol
    assert (final.double() - final_ref).abs().max() < tol


def test_initial_state_feeds_only_the_first_document():
    t = make_inputs(37, torch.float64, seed=1)
    init = torch.randn(2, HEADS, HEAD_DIM, STATE, dtype=torch.float64)
    y, final = ours(t, 8, packed_rows(), init)
    y_ref, final_ref = reference(t, packed_rows(), init)
    assert (y - y_ref).abs().max() < 1e-9
    assert (final - final_ref).abs().max() < 1e-9


def test_single_document_equals_transformers_fallback():
    t = make_inputs(37, torch.float32, seed=2)
    init = torch.randn(2, HEADS, HEAD_DIM, STATE)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 8)
    kwargs = dict(
        D=t["D"],
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        dt_limit=(0.01, float("inf")),
        initial_states=init,
        return_final_states=True,
        z=None,
    )
    y_theirs, final_theirs = hf.mamba2_chunk_scan(*args, **kwargs)
    y_ours, final_ours = ssd_chunk_scan(*args, **kwargs)
    assert (y_ours - y_theirs).abs().max() < 1e-4
    assert (final_ours - final_theirs).abs().max() < 1e-4
    constant = torch.full((2, 37), 5)
    y_const, _ = ssd_chunk_scan(*args, **kwargs, seq_idx=constant)
    assert torch.equal(y_const, y_ours)


def test_gradients_match_reference():
    seq_idx = packed_rows()
    t = make_inputs(37, torch.float64, seed=3, requires_grad=True)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    probe = torch.randn(2, 37, HEADS, HEAD_DIM, dtype=torch.float64)
    y, final = ours(t, 8, seq_idx)
    grads = torch.autograd.grad((y * probe).sum() + final.square().sum(), [t[k] for k in names])
    y_ref, final_ref = reference(t, seq_idx)
    grads_ref = torch.autograd.grad((y_ref * probe).sum() + final_ref.square().sum(), [t[k] for k in names])
    for name, g, r in zip(names, grads, grads_ref):
        assert (g - r).abs().max() < 1e-9, name


def test_low_precision_input_returns_input_dtype():
    t = make_inputs(37, torch.bfloat16)
    y = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], seq_idx=packed_rows())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
