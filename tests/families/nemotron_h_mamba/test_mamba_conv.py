"""causal_conv1d_varlen against a per-position, per-tap float64 loop."""

import pytest
import torch
import torch.nn.functional as F

from mtp_recipes.document_layout import position_in_document
from mtp_recipes.families.nemotron_h_mamba import causal_conv1d_varlen
from tests.families.nemotron_h_mamba._mamba_reference import conv_reference, random_seq_idx

CHANNELS, KERNEL = 6, 4


def packed_rows() -> torch.Tensor:
    # length-1 documents, a document shorter than the kernel, and an id reused later in the row
    return torch.stack([random_seq_idx([5, 1, 1, 3, 9, 4]), torch.tensor([0] * 6 + [1] * 2 + [0] * 8 + [2] * 7)])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(dtype, tol, activation, with_bias):
    torch.manual_seed(0)
    seq_idx = packed_rows()
    x = torch.randn(2, CHANNELS, seq_idx.shape[1], dtype=dtype)
    w = torch.randn(CHANNELS, KERNEL, dtype=dtype)
    b = torch.randn(CHANNELS, dtype=dtype) if with_bias else None
    out = causal_conv1d_varlen(x, w, b, seq_idx, activation)
    ref = conv_reference(x.double(), w.double(), None if b is None else b.double(), seq_idx, activation)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < tol


def test_no_or_constant_seq_idx_is_one_padded_conv():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, CHANNELS, 19), torch.randn(CHANNELS, KERNEL), torch.randn(CHANNELS)
    plain = F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=KERNEL - 1, groups=CHANNELS)[:, :, :19])
    assert torch.allclose(causal_conv1d_varlen(x, w, b, None, "silu"), plain, atol=1e-6)
    constant = torch.full((2, 19), 3)
    assert torch.allclose(causal_conv1d_varlen(x, w, b, constant, "silu"), plain, atol=1e-6)


def test_gradients_match_reference():
    torch.manual_seed(0)
    seq_idx = packed_rows()
    leaves = [
        torch.randn(2, CHANNELS, seq_idx.shape[1], dtype=torch.float64, requires_grad=True),
        torch.randn(CHANNELS, KERNEL, dtype=torch.float64, requires_grad=True),
        torch.randn(CHANNELS, dtype=torch.float64, requires_grad=True),
    ]
    probe = torch.randn(2, CHANNELS, seq_idx.shape[1], dtype=torch.float64)
    ours = torch.autograd.grad((causal_conv1d_varlen(*leaves, seq_idx, "silu") * probe).sum(), leaves)
    ref = torch.autograd.grad((conv_reference(*leaves, seq_idx, "silu") * probe).sum(), leaves)
    for g, r in zip(ours, ref):
        assert (g - r).abs().max() < 1e-9


def test_position_in_document():
    seq_idx = torch.tensor([[4, 4, 4, 7, 9, 9, 4]])
    assert position_in_document(seq_idx).tolist() == [[0, 1, 2, 0, 0, 1, 0]]


def test_seq_idx_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="seq_idx has shape"):
        causal_conv1d_varlen(torch.randn(1, 3, 8), torch.randn(3, 4), seq_idx=torch.zeros(1, 9, dtype=torch.long))
