"""The linear cross-entropy under bf16 autocast with fp32 weights (the one-GPU default).

Logits of std ~20, as trained models produce, make the softmax sensitive to how the logits are
rounded: bf16 logits alone put the gradients 1.5-2.5 % off float64 there, and a backward whose
logits differ from the forward's log-sum-exp about 9 %. Rounding the GEMM inputs to bf16, which
autocast asks for, costs about 1 %.
"""

import pytest
import torch
import torch.nn.functional as F

from mtp_recipes.loss.linear_ce import linear_cross_entropy

IGNORE = -100
N, H, V = 64, 64, 257
IMPLS = ["torch", "fused", "compiled"]


def _norm_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def _case(seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (20 / H**0.5)  # logits of std ~20
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.2] = IGNORE
    return hidden.to(device), weight.to(device), targets.to(device)


def _reference(hidden, weight, targets):
    """Materialised float64 cross-entropy of the same (fp32) inputs, with its gradients."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.T
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="mean")
    loss.backward()
    return loss.detach(), h.grad, w.grad, logits.detach()


def _ours(impl, hidden, weight, targets, *, autocast=True, backward_inside=False):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, w, targets, reduction="mean", chunk_size=16, impl=impl)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_gradients_within_2_percent_of_float64(impl, device):
    hidden, weight, targets = _case(device=device)
    ref_loss, ref_gh, ref_gw, ref_logits = _reference(hidden, weight, targets)
    assert 15 < ref_logits.std().item() < 25
    loss, gh, gw = _ours(impl, hidden, weight, targets)
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 2e-3 * ref_loss.item()
    assert _norm_rel(gh, ref_gh) < 0.02
    assert _norm_rel(gw, ref_gw) < 0.02


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_rounds_only_the_gemm_inputs(impl):
    """Under autocast: the loss of fp32 logits from bf16-rounded inputs, and (recompute path) the
    very gradients of those rounded inputs; the one-pass path also rounds ``softmax - onehot``."""
    hidden, weight, targets = _case(seed=1)
    loss, gh, gw = _ours(impl, hidden, weight, targets)
    rounded = _ours(impl, hidden.bfloat16().float(), weight.bfloat16().float(), targets, autocast=False)
    assert torch.equal(loss, rounded[0])
    for got, ref in zip((gh, gw), rounded[1:], strict=True):
        if impl == "torch":
            assert torch.equal(got, ref)
        else:
            assert _norm_rel(got, ref.double()) < 4e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_inside_autocast_changes_nothing(impl):
    """On CPU the backward runs on the calling thread, so autocast is still on if it is called there."""
    hidden, weight, targets = _case(seed=2)
    outside = _ours(impl, hidden, weight, targets)
    inside = _ours(impl, hidden, weight, targets, backward_inside=True)
    for a, b in zip(outside, inside, strict=True):
        assert torch.equal(a, b)
