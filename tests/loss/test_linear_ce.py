import math

import pytest
import torch
import torch.nn.functional as F

from mtp_recipes.loss.linear_ce import default_chunk_size, linear_cross_entropy

I = -100


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _case(n=37, h=16, v=53, dtype=torch.float32, seed=0, ignore_frac=0.2, ignore=I):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * 2).to(dtype)
    weight = torch.randn(v, h, generator=gen).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = ignore
    targets[:7] = ignore  # a fully ignored chunk for chunk_size <= 7
    return hidden, weight, targets


def _reference(hidden, weight, targets, reduction, ignore=I):
    """Materialised float64 cross-entropy with its gradients."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=ignore, reduction=reduction)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    return loss.detach(), h.grad, w.grad


def _ours(hidden, weight, targets, reduction, chunk_size, ignore=I):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, ignore_index=ignore, reduction=reduction, chunk_size=chunk_size)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 1000, None])
def test_float32_matches_float64_reference(reduction, chunk_size):
    hidden, weight, targets = _case()
    loss, gh, gw = _ours(hidden, weight, targets, reduction, chunk_size)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert _rel_err(loss, ref_loss) < 1e-5
    assert _rel_err(gh, ref_gh) < 1e-5
    assert _rel_err(gw, ref_gw) < 1e-5
    assert (gh[:7] == 0).all()  # ignored tokens get no gradient


def test_matches_materialised_float32_cross_entropy():
    hidden, weight, targets = _case(seed=3)
    got = linear_cross_entropy(hidden, weight, targets, reduction="mean", chunk_size=5)
    ref = F.cross_entropy(hidden @ weight.T, targets)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_weighted_upstream_gradient_with_reduction_none():
    hidden, weight, targets = _case(seed=4)
    scale = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(9))
    h = hidden.clone().requires_grad_()
    per_token = linear_cross_entropy(h, weight, targets, reduction="none", chunk_size=6)
    (per_token * scale).sum().backward()
    h_ref = hidden.double().requires_grad_()
    ref = F.cross_entropy(h_ref @ weight.double().T, targets, reduction="none")
    (ref * scale.double()).sum().backward()
    assert _rel_err(h.grad, h_ref.grad) < 1e-5


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bfloat16_inputs(reduction):
    # Logits and accumulation run in fp32 from the exact bf16 values, so the loss matches the
    # fp64 reference to fp32 accuracy; gradients are rounded once to bf16 (8 mantissa bits,
    # relative step 2**-8), hence the 1e-2 tolerance on them.
    hidden, weight, targets = _case(dtype=torch.bfloat16, seed=1)
    loss, gh, gw = _ours(hidden, weight, targets, reduction, chunk_size=8)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets, reduction)
    assert loss.dtype == torch.float32
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert _rel_err(loss, ref_loss) < 1e-5
    assert _rel_err(gh, ref_gh) < 1e-2
    assert _rel_err(gw, ref_gw) < 1e-2


def test_custom_ignore_index_and_int32_targets():
    hidden, weight, targets = _case(seed=2, ignore=-1)
    loss, gh, gw = _ours(hidden, weight, targets.int(), "mean", chunk_size=4, ignore=-1)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets, "mean", ignore=-1)
    assert _rel_err(loss, ref_loss) < 1e-5
    assert _rel_err(gh, ref_gh) < 1e-5 and _rel_err(gw, ref_gw) < 1e-5


def test_all_targets_ignored():
    hidden, weight, _ = _case(n=9)
    targets = torch.full((9,), I)
    loss, gh, gw = _ours(hidden, weight, targets, "sum", chunk_size=4)
    assert loss.item() == 0.0
    assert (gh == 0).all() and (gw == 0).all()
    mean = linear_cross_entropy(hidden, weight, targets, reduction="mean")
    assert math.isnan(mean.item())  # same as F.cross_entropy on zero valid targets
    assert math.isnan(F.cross_entropy(hidden @ weight.T, targets).item())


def test_frozen_head_gets_no_grad():
    hidden, weight, targets = _case(seed=5)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, chunk_size=10).backward()
    _, ref_gh, _ = _reference(hidden, weight, targets, "sum")
    assert weight.grad is None
    assert _rel_err(h.grad, ref_gh) < 1e-5


def test_argmax_matches_materialised_argmax_and_does_not_change_loss():
    hidden, weight, targets = _case(seed=6)
    loss, pred = linear_cross_entropy(hidden, weight, targets, chunk_size=6, return_argmax=True)
    plain = linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    assert torch.equal(pred, (hidden @ weight.T).argmax(-1))
    assert pred.dtype == torch.long and not pred.requires_grad
    assert loss.item() == plain.item()


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck_float64(reduction):
    hidden, weight, _ = _case(n=6, h=4, v=5, dtype=torch.float64, seed=7)
    targets = torch.tensor([I, 2, 0, I, 4, 1])
    hidden.requires_grad_()
    weight.requires_grad_()

    def fn(h, w):
        return linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_empty_input():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and weight.grad.abs().sum().item() == 0.0


def test_default_chunk_size():
    assert default_chunk_size(2**17) == 512
    assert default_chunk_size(2**30) == 1
    assert default_chunk_size(1) == 2**26


def test_errors():
    hidden, weight, targets = _case(n=4)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden.unsqueeze(0), weight, targets)
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
