"""The gated delta rule of Qwen3-Next / Qwen3.5's linear attention: chunked against the one-token-at-a-time
definition in float64, and packed rows against each document alone (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from mtp_recipes.families.gated_deltanet import (
    chunked_gated_delta_rule,
    documents_as_rows,
    packed_gated_delta_rule,
    recurrent_gated_delta_rule,
)


def inputs(batch: int, length: int, heads: int = 3, dk: int = 8, dv: int = 5, seed: int = 0):
    """Random q, k (unit length, q scaled), v, log decays g < 0 and write strengths beta in (0, 1), float64."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = torch.nn.functional.normalize(rand(batch, length, heads, dk), dim=-1) * dk**-0.5
    k = torch.nn.functional.normalize(rand(batch, length, heads, dk), dim=-1)
    v = rand(batch, length, heads, dv)
    g = -torch.nn.functional.softplus(rand(batch, length, heads)) * 0.5
    beta = torch.sigmoid(rand(batch, length, heads))
    return q, k, v, g, beta


@pytest.mark.parametrize(("length", "chunk"), [(37, 8), (64, 64), (150, 64)])
def test_chunked_rule_equals_the_definition(length, chunk):
    q, k, v, g, beta = inputs(2, length)
    want = recurrent_gated_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(chunked_gated_delta_rule(q, k, v, g, beta, chunk=chunk), want, rtol=1e-10, atol=1e-10)


def test_documents_become_rows():
    seq_idx = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    row, pos, length = documents_as_rows(seq_idx)
    assert row.tolist() == [[0, 0, 0, 1, 1], [2, 3, 3, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]] and length == 4


def test_packed_rows_equal_each_document_alone():
    """Two rows of packed documents (some longer than a chunk): every output and every input gradient equals the
    document's own, run alone from a zero state; without ``seq_idx`` the state would leak (checked to differ)."""
    lengths = [[70, 5, 21], [1, 95]]
    leaves = [x.requires_grad_() for x in inputs(2, 96, seed=1)]
    seq_idx = torch.tensor([[d for d, n in enumerate(docs) for _ in range(n)] for docs in lengths])
    out = packed_gated_delta_rule(*leaves, seq_idx)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    for b, docs in enumerate(lengths):
        start = 0
        for n in docs:
            span = slice(start, start + n)
            alone = [x[b : b + 1, span].detach().requires_grad_() for x in leaves]
            want = recurrent_gated_delta_rule(*alone)
            torch.testing.assert_close(out[b : b + 1, span], want, rtol=1e-10, atol=1e-10)
            want_grads = torch.autograd.grad((want * probe[b : b + 1, span]).sum(), alone)
            for got, expected in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(got[b : b + 1, span], expected, rtol=1e-9, atol=1e-10)
            start += n
    leaky = packed_gated_delta_rule(*(x.detach() for x in leaves), None)
    assert (leaky[0, 70:75] - out[0, 70:75].detach()).abs().max() > 1e-3


@pytest.mark.gpu
def test_fla_kernel_over_cu_seqlens_equals_the_torch_rule():
    """On CUDA with flash-linear-attention installed the rule is its chunked kernel over ``cu_seqlens``: the same
    outputs as the torch rule over the documents stacked as rows (float32, the kernel's tolerance)."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    lengths = [[70, 5, 21], [1, 95]]
    cuda = [x.float().cuda() for x in inputs(2, 96, seed=1)]
    seq_idx = torch.tensor([[d for d, n in enumerate(docs) for _ in range(n)] for docs in lengths]).cuda()
    got = packed_gated_delta_rule(*cuda, seq_idx)
    want = packed_gated_delta_rule(*(x.cpu() for x in cuda), seq_idx.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)
