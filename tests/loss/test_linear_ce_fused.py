"""The one-pass linear cross-entropy ("fused" eager and "compiled" with torch.compile/inductor) on CPU.

Every compiled case uses the same vocabulary and hidden size so the compiled step is built about
once per dtype (plus one dynamic-shape rebuild for a short last chunk).
"""

import pytest
import torch
import torch.nn.functional as F

from mtp_recipes.loss import main_loss, mtp_loss
from mtp_recipes.loss.linear_ce import (
    _accumulate,
    default_chunk_size,
    linear_cross_entropy,
    resolve_impl,
    segmented_linear_cross_entropy,
)

IGNORE = -100
N, H, V = 48, 16, 61
FAST = ["fused", "compiled"]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _case(dtype=torch.float32, seed=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, H, generator=gen) * 2).to(dtype)
    weight = torch.randn(V, H, generator=gen).to(dtype)
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.2] = IGNORE
    targets[:16] = IGNORE  # one whole chunk ignored at chunk_size 16
    return hidden, weight, targets


def _reference(hidden, weight, targets, reduction):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(hidden, weight, targets, reduction, impl, chunk_size=16):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=chunk_size, impl=impl)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n", [N, 37])  # 3 full chunks; 2 full chunks and a short one
def test_float32_matches_float64_reference(impl, reduction, n):
    hidden, weight, targets = _case(n=n)
    loss, gh, gw = _ours(hidden, weight, targets, reduction, impl)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets, reduction)
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32
    assert _rel_err(loss, ref_loss) < 1e-5
    assert _rel_err(gh, ref_gh) < 1e-5 and _rel_err(gw, ref_gw) < 1e-5
    assert (gh[:16] == 0).all()


@pytest.mark.parametrize("impl", FAST)
def test_bfloat16_inputs(impl):
    """bf16 logits and gradients (the GPU fast path): bf16-level error against float64 on the same inputs."""
    hidden, weight, targets = _case(torch.bfloat16, seed=1)
    loss, gh, gw = _ours(hidden, weight, targets, "mean", impl)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets, "mean")
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert _rel_err(loss, ref_loss) < 5e-3
    assert _rel_err(gh, ref_gh) < 2e-2 and _rel_err(gw, ref_gw) < 2e-2


@pytest.mark.parametrize("impl", FAST)
def test_upstream_scale_frozen_head_and_argmax(impl):
    hidden, weight, targets = _case(seed=2)
    h = hidden.clone().requires_grad_()
    loss, pred = linear_cross_entropy(h, weight, targets, chunk_size=16, impl=impl, return_argmax=True)
    (3 * loss).backward()
    ref_loss, ref_gh, _ = _reference(hidden, weight, targets, "sum")
    assert weight.grad is None and _rel_err(h.grad, 3 * ref_gh) < 1e-5
    assert torch.equal(pred, (hidden @ weight.T).argmax(-1)) and not pred.requires_grad


def test_segments_with_their_own_scales():
    """Main + two depths in one call, each weighted by its own normaliser, as one scalar loss."""
    gen = torch.Generator().manual_seed(3)
    hiddens = [torch.randn(2, 8, H, generator=gen, requires_grad=True) for _ in range(3)]
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    targets = [torch.randint(0, V, (2, 8), generator=gen) for _ in range(3)]
    targets[1][0, :3] = IGNORE
    scales = torch.tensor([0.5, 0.1, 0.02])
    out = segmented_linear_cross_entropy(hiddens, weight, targets, scales, chunk_size=16, impl="fused")
    out.loss.backward()
    ref_h = [h.detach().double().requires_grad_() for h in hiddens]
    ref_w = weight.detach().double().requires_grad_()
    sums = [
        F.cross_entropy((h @ ref_w.T).view(-1, V), t.view(-1), reduction="sum")
        for h, t in zip(ref_h, targets, strict=True)
    ]
    ref = sum(s * c for s, c in zip(sums, scales.tolist(), strict=True))
    ref.backward()
    assert _rel_err(out.loss, ref.detach()) < 1e-5 and not out.sums.requires_grad
    assert _rel_err(out.sums, torch.stack(sums).detach()) < 1e-5
    assert _rel_err(weight.grad, ref_w.grad) < 1e-5
    for h, r in zip(hiddens, ref_h, strict=True):
        assert _rel_err(h.grad, r.grad) < 1e-5


@pytest.mark.parametrize("shared", [True, False])
def test_mtp_and_main_loss_agree_across_impls(shared):
    gen = torch.Generator().manual_seed(4)
    hiddens = [torch.randn(2, 12, H, generator=gen) for _ in range(3)]
    heads = torch.randn(V, H, generator=gen) if shared else [torch.randn(V, H, generator=gen) for _ in range(3)]
    labels = torch.randint(0, V, (2, 12), generator=gen)
    labels[:, -2:] = IGNORE
    seq_idx = torch.tensor([[0] * 7 + [1] * 5, [0] * 12], dtype=torch.int32)
    results = {}
    for impl in ("torch", "fused"):
        hs = [h.clone().requires_grad_() for h in hiddens]
        ws = heads.clone().requires_grad_() if shared else [w.clone().requires_grad_() for w in heads]
        out = mtp_loss(hs, labels, ws, seq_idx=seq_idx, chunk_size=10, impl=impl, return_accuracy=True)
        main = main_loss(hs[0], labels, ws if shared else ws[0], chunk_size=10, impl=impl)
        (out.loss + main).backward()
        grads_w = [ws.grad] if shared else [w.grad for w in ws]
        results[impl] = (out, main.detach(), [h.grad for h in hs], grads_w)
    (ref, ref_main, ref_gh, ref_gw), (got, got_main, gh, gw) = results["torch"], results["fused"]
    assert _rel_err(got.loss.detach(), ref.loss.detach().double()) < 1e-6
    assert _rel_err(got_main, ref_main.double()) < 1e-6
    for a, b in zip(got.per_depth, ref.per_depth, strict=True):
        assert _rel_err(a, b.double()) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(got.predictions, ref.predictions, strict=True))
    for a, b in zip(gh + gw, ref_gh + ref_gw, strict=True):
        assert _rel_err(a, b.double()) < 1e-5


def test_eval_without_grad_and_errors():
    hidden, weight, targets = _case(seed=5)
    with torch.no_grad():
        fused = linear_cross_entropy(hidden, weight, targets, impl="compiled")
    assert _rel_err(fused, _reference(hidden, weight, targets, "sum")[0]) < 1e-5
    h = hidden.clone().requires_grad_()
    with pytest.raises(ValueError, match="needs reduction"):
        linear_cross_entropy(h, weight, targets, reduction="none", impl="fused")
    with pytest.raises(ValueError, match="impl must be"):
        linear_cross_entropy(h, weight, targets, impl="triton")


def test_selection_and_chunk_sizes():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "compiled"
    assert resolve_impl("fused", torch.device("cpu")) == "fused"
    assert default_chunk_size(131072, "compiled") == 4096
    assert default_chunk_size(131072, "torch") == 512


def test_fp32_accumulation_of_bf16_products():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(8, 300, generator=gen).bfloat16(), torch.randn(300, 5, generator=gen).bfloat16()
    acc = torch.zeros(8, 5)
    for _ in range(3):
        _accumulate(acc, a, b)
    ref = 3 * (a.double() @ b.double())
    assert _rel_err(acc, ref) < 1e-6
