import pytest
import torch
import torch.nn.functional as F

from mtp_recipes.loss import MTPLossOutput, linear_cross_entropy, main_loss, mtp_loss
from mtp_recipes.loss.mtp import AcceptanceStats, acceptance_stats
from mtp_recipes.mtp.roll import count_depth_targets

I = -100
B, S, H, V, D = 2, 12, 8, 31, 3


def _rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _batch(seed=0, shared=True, depths=D):
    gen = torch.Generator().manual_seed(seed)
    hiddens = [torch.randn(B, S, H, generator=gen) for _ in range(depths)]
    heads = torch.randn(V, H, generator=gen) if shared else [torch.randn(V, H, generator=gen) for _ in range(depths)]
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < 0.2] = I
    seq_idx = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [1] * 3], dtype=torch.int32)
    labels[0, 4] = labels[0, 8] = labels[1, 8] = labels[:, -1] = I  # last token of each document
    return hiddens, heads, labels, seq_idx


def _reference(hiddens, heads, labels, lam, seq_idx, normalization, num_label_tokens=None, weights=None):
    """Float64 loop over (k, b, t), targets straight from spec §3 (no roll helpers); ``weights``: w_k."""
    depths = len(hiddens)
    hs = [h.detach().double().requires_grad_() for h in hiddens]
    shared = isinstance(heads, torch.Tensor)
    ws = heads.detach().double().requires_grad_() if shared else [w.detach().double().requires_grad_() for w in heads]
    per_depth, counts, correct = [], [], []
    for k in range(1, depths + 1):
        w = ws if shared else ws[k - 1]
        total, count = torch.zeros((), dtype=torch.float64), 0
        hits = torch.zeros(B, S, dtype=torch.bool)
        for b in range(B):
            for t in range(S):
                src = t + k
                if src >= S or labels[b, src] == I:
                    continue
                if seq_idx is not None and seq_idx[b, src] != seq_idx[b, t]:
                    continue
                target = int(labels[b, src])
                logits = w @ hs[k - 1][b, t]
                total = total + torch.logsumexp(logits, 0) - logits[target]
                count += 1
                hits[b, t] = int(logits.argmax()) == target
        denom = num_label_tokens if normalization == "main_tokens" else count
        per_depth.append(total / max(denom, 1))
        counts.append(count)
        correct.append(hits)
    weights = [1.0] * depths if weights is None else weights
    loss = lam * sum(w * p for w, p in zip(weights, per_depth)) / sum(weights)
    loss.backward()
    grads_w = ws.grad if shared else [w.grad for w in ws]
    per_depth = [p.detach() for p in per_depth]
    return loss.detach(), per_depth, counts, [h.grad for h in hs], grads_w, correct


def _run(hiddens, heads, labels, **kwargs):
    hs = [h.clone().requires_grad_() for h in hiddens]
    ws = (
        heads.clone().requires_grad_()
        if isinstance(heads, torch.Tensor)
        else [w.clone().requires_grad_() for w in heads]
    )
    out = mtp_loss(hs, labels, ws, **kwargs)
    out.loss.backward()
    grads_w = ws.grad if isinstance(ws, torch.Tensor) else [w.grad for w in ws]
    return out, [h.grad for h in hs], grads_w


@pytest.mark.parametrize("normalization", ["depth_tokens", "main_tokens"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("use_seq_idx", [True, False])
def test_matches_loop_reference(normalization, shared, use_seq_idx):
    hiddens, heads, labels, seq_idx = _batch(seed=int(shared) + 2 * int(use_seq_idx), shared=shared)
    sidx = seq_idx if use_seq_idx else None
    n_main = int((labels != I).sum())
    kwargs = dict(loss_scaling_factor=0.3, seq_idx=sidx, normalization=normalization, chunk_size=7)
    if normalization == "main_tokens":
        kwargs["num_label_tokens"] = n_main
    out, gh, gw = _run(hiddens, heads, labels, return_accuracy=True, **kwargs)
    ref_loss, ref_pd, ref_counts, ref_gh, ref_gw, ref_correct = _reference(
        hiddens, heads, labels, 0.3, sidx, normalization, n_main
    )
    assert isinstance(out, MTPLossOutput)
    assert _rel_err(out.loss, ref_loss) < 1e-5
    assert len(out.per_depth) == D
    for got, ref in zip(out.per_depth, ref_pd):
        assert _rel_err(got, ref) < 1e-5
    assert out.num_targets.tolist() == ref_counts
    for got, ref in zip(gh, ref_gh):
        assert _rel_err(got, ref) < 1e-5
    for got, ref in zip([gw] if shared else gw, [ref_gw] if shared else ref_gw):
        assert _rel_err(got, ref) < 1e-5
    for k in range(D):
        assert torch.equal(out.correct[k], ref_correct[k])
        assert int(out.valid[k].sum()) == ref_counts[k]


@pytest.mark.parametrize("shared", [True, False])
def test_depth_weights_match_the_weighted_loop_reference(shared):
    hiddens, heads, labels, seq_idx = _batch(seed=12 + int(shared), shared=shared)
    weights = [3.0, 1.0, 0.5]
    out, gh, gw = _run(
        hiddens, heads, labels, loss_scaling_factor=0.3, seq_idx=seq_idx, chunk_size=5, depth_weights=weights
    )
    ref_loss, ref_pd, _, ref_gh, ref_gw, _ = _reference(
        hiddens, heads, labels, 0.3, seq_idx, "depth_tokens", weights=weights
    )
    assert _rel_err(out.loss, ref_loss) < 1e-5
    for got, ref in zip(out.per_depth, ref_pd):  # logged CE_k stay unweighted
        assert _rel_err(got, ref) < 1e-5
    for got, ref in zip([*gh, *([gw] if shared else gw)], [*ref_gh, *([ref_gw] if shared else ref_gw)]):
        assert _rel_err(got, ref) < 1e-5
    equal = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, loss_scaling_factor=0.3)
    assert not torch.allclose(out.loss, equal.loss)  # the weights matter


def test_equal_depth_weights_are_the_depth_mean():
    hiddens, heads, labels, seq_idx = _batch(seed=14)
    plain, gh, gw = _run(hiddens, heads, labels, loss_scaling_factor=0.3, seq_idx=seq_idx)
    same, gh2, gw2 = _run(hiddens, heads, labels, loss_scaling_factor=0.3, seq_idx=seq_idx, depth_weights=[2.0] * D)
    assert torch.allclose(same.loss, 0.3 / D * torch.stack(plain.per_depth).sum(), rtol=1e-6)
    assert torch.allclose(same.loss, plain.loss, rtol=1e-6)
    for a, b in zip([*gh, gw], [*gh2, gw2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_seq_idx_changes_the_loss():
    hiddens, heads, labels, seq_idx = _batch(seed=5)
    with_docs = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx)
    without = mtp_loss(hiddens, labels, heads)
    assert (with_docs.num_targets < without.num_targets).all()
    assert not torch.allclose(with_docs.loss, without.loss)


def test_global_depth_counts():
    hiddens, heads, labels, seq_idx = _batch(seed=6)
    local = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx)
    counts = count_depth_targets(labels, D, seq_idx)
    assert counts[1:].tolist() == local.num_targets.tolist()
    for given in (counts[1:], counts[1:].tolist(), list(counts[1:].unbind())):
        same = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, num_depth_tokens=given)
        assert torch.allclose(same.loss, local.loss, rtol=1e-6)
    scale = torch.tensor([2, 3, 5])
    other = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, num_depth_tokens=counts[1:] * scale)
    for got, ref, s in zip(other.per_depth, local.per_depth, scale.tolist()):
        assert torch.allclose(got, ref / s, rtol=1e-6)
    expected = 0.1 / D * sum(p / s for p, s in zip(local.per_depth, scale.tolist()))
    assert torch.allclose(other.loss, expected)


def test_main_tokens_divides_every_depth_by_the_label_count():
    hiddens, heads, labels, seq_idx = _batch(seed=7)
    local = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx)
    out = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, normalization="main_tokens", num_label_tokens=1000)
    for got, ref, n in zip(out.per_depth, local.per_depth, local.num_targets.tolist()):
        assert torch.allclose(got, ref * n / 1000, rtol=1e-6)
    ignored = mtp_loss(
        hiddens,
        labels,
        heads,
        seq_idx=seq_idx,
        normalization="main_tokens",
        num_label_tokens=1000,
        num_depth_tokens=[1, 1, 1],
    )
    assert ignored.loss.item() == out.loss.item()


def test_scaling_factor_and_depth_mean():
    hiddens, heads, labels, seq_idx = _batch(seed=8)
    out = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, loss_scaling_factor=0.5)
    assert torch.allclose(out.loss, 0.5 / D * torch.stack(out.per_depth).sum())
    zero = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, loss_scaling_factor=0.0)
    assert zero.loss.item() == 0.0
    assert torch.allclose(torch.stack(zero.per_depth), torch.stack(out.per_depth))


def test_depth_without_targets_is_zero_not_nan():
    gen = torch.Generator().manual_seed(9)
    labels = torch.randint(0, V, (1, 3), generator=gen)
    hiddens = [torch.randn(1, 3, H, generator=gen, requires_grad=True) for _ in range(3)]
    out = mtp_loss(hiddens, labels, torch.randn(V, H, generator=gen))
    assert out.num_targets.tolist() == [2, 1, 0]
    assert out.per_depth[2].item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert (hiddens[2].grad == 0).all() and hiddens[0].grad.abs().sum() > 0


def test_zero_depths():
    _, heads, labels, _ = _batch()
    out = mtp_loss([], labels, heads, return_accuracy=True)
    assert out.loss.item() == 0.0 and out.per_depth == [] and out.correct == []
    out = mtp_loss([], labels, [], normalization="main_tokens", num_label_tokens=3)
    assert out.loss.item() == 0.0


def test_predictions_are_the_head_argmax():
    hiddens, heads, labels, seq_idx = _batch(seed=10, shared=False)
    out = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, return_accuracy=True)
    for h, w, pred in zip(hiddens, heads, out.predictions):
        assert torch.equal(pred, (h @ w.T).argmax(-1))
    plain = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx)
    assert plain.correct is None and plain.predictions is None
    assert plain.loss.item() == out.loss.item()


def test_bfloat16_hidden_and_head():
    hiddens, heads, labels, seq_idx = _batch(seed=11)
    hb = [h.bfloat16() for h in hiddens]
    out = mtp_loss(hb, labels, heads.bfloat16(), seq_idx=seq_idx)
    ref = mtp_loss([h.float() for h in hb], labels, heads.bfloat16().float(), seq_idx=seq_idx)
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss, ref.loss, rtol=1e-6)


def test_errors():
    hiddens, heads, labels, seq_idx = _batch()
    cases = [
        (dict(normalization="tokens"), "normalization must be"),
        (dict(normalization="main_tokens"), "needs num_label_tokens"),
        (dict(loss_scaling_factor=-0.1), "loss_scaling_factor"),
        (dict(num_depth_tokens=[1, 2]), "num_depth_tokens has 2"),
        (dict(depth_weights=[1.0, 2.0]), "depth_weights has 2 entries for 3"),
        (dict(depth_weights=[1.0, -1.0, 1.0]), "depth_weights must be >= 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            mtp_loss(hiddens, labels, heads, **kwargs)
    with pytest.raises(ValueError, match="head weights for 3 depths"):
        mtp_loss(hiddens, labels, [heads, heads])
    with pytest.raises(ValueError, match="head weight 1"):
        mtp_loss(hiddens, labels, heads[:, :4])
    with pytest.raises(ValueError, match="hidden of depth 2"):
        mtp_loss([hiddens[0], hiddens[1][:, :5]], labels, heads)
    with pytest.raises(ValueError, match="labels must be"):
        mtp_loss(hiddens, labels.view(-1), heads)
    with pytest.raises(ValueError, match="seq_idx shape"):
        mtp_loss(hiddens, labels, heads, seq_idx=seq_idx[:, :5])


def test_main_loss():
    hiddens, heads, labels, _ = _batch(seed=12)
    h = hiddens[0].clone().requires_grad_()
    loss, pred = main_loss(h, labels, heads, chunk_size=5, return_argmax=True)
    loss.backward()
    h_ref = hiddens[0].double().requires_grad_()
    ref = F.cross_entropy((h_ref @ heads.double().T).view(-1, V), labels.view(-1))
    ref.backward()
    assert _rel_err(loss, ref.detach()) < 1e-5 and _rel_err(h.grad, h_ref.grad) < 1e-5
    assert torch.equal(pred, (hiddens[0] @ heads.T).argmax(-1))
    n = int((labels != I).sum())
    scaled = main_loss(hiddens[0], labels, heads, num_label_tokens=torch.tensor(4 * n))
    assert torch.allclose(scaled, loss.detach() / 4, rtol=1e-6)
    total = linear_cross_entropy(hiddens[0].view(-1, H), heads, labels.view(-1))
    assert torch.allclose(scaled, total / (4 * n), rtol=1e-6)
    with pytest.raises(ValueError, match="does not match labels"):
        main_loss(hiddens[0][:, :4], labels, heads)


def test_acceptance_stats():
    valid = [torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 1, 0, 0]])]
    # slot 3 of depth 1 is "right" but has no target: it must not count
    correct = [torch.tensor([[1, 0, 1, 1]]), torch.tensor([[1, 1, 0, 0]])]
    stats = acceptance_stats([c.bool() for c in correct], [v.bool() for v in valid])
    assert stats.correct.tolist() == [2, 2] and stats.valid.tolist() == [3, 2]
    assert stats.cum_correct.tolist() == [2, 1] and stats.cum_valid.tolist() == [3, 2]
    assert torch.allclose(stats.accuracy, torch.tensor([2 / 3, 1.0]))
    assert torch.allclose(stats.cumulative, torch.tensor([2 / 3, 0.5]))
    assert abs(stats.acceptance_length.item() - (1 + 2 / 3 + 0.5)) < 1e-6
    both = stats + stats
    assert both.cum_correct.tolist() == [4, 2]
    assert torch.allclose(both.acceptance_length, stats.acceptance_length)
    empty = acceptance_stats([], [])
    assert isinstance(empty, AcceptanceStats) and empty.acceptance_length.item() == 1.0
    with pytest.raises(ValueError, match="valid masks"):
        acceptance_stats(correct, valid[:1])


def test_acceptance_from_mtp_output():
    hiddens, heads, labels, seq_idx = _batch(seed=13)
    labels = torch.where(labels == I, labels, 0)  # one class: the heads hit it on some slots
    out = mtp_loss(hiddens, labels, heads, seq_idx=seq_idx, return_accuracy=True)
    stats = acceptance_stats(out.correct, out.valid)
    assert stats.valid.tolist() == out.num_targets.tolist()
    assert (stats.cum_correct <= stats.correct).all()
    assert 1.0 <= stats.acceptance_length.item() <= 1 + D


def test_main_hidden_joins_the_shared_head_call():
    """main + depths in one call == main_loss + mtp_loss separately: values, argmax and gradients (float64)."""
    from mtp_recipes.loss import main_loss

    torch.manual_seed(3)
    hiddens, head, labels, seq_idx = _batch(seed=11, shared=True)
    hiddens = [h.double().detach().requires_grad_() for h in hiddens]
    head = head.double().detach().requires_grad_()
    main_h = torch.randn_like(hiddens[0]).requires_grad_()
    joint = mtp_loss(
        hiddens, labels, head, seq_idx=seq_idx, main_hidden=main_h, num_label_tokens=17, return_accuracy=True
    )
    grads = torch.autograd.grad(joint.loss, [main_h, head, *hiddens])

    main, argmax = main_loss(main_h, labels, head, num_label_tokens=17, return_argmax=True)
    depth = mtp_loss(hiddens, labels, head, seq_idx=seq_idx)
    ref = torch.autograd.grad(main + depth.loss, [main_h, head, *hiddens])
    assert torch.allclose(joint.loss, main + depth.loss, rtol=1e-12)
    assert torch.allclose(joint.main_loss, main.detach(), rtol=1e-12)
    assert torch.equal(joint.main_argmax, argmax)
    for a, b in zip(joint.per_depth, depth.per_depth):
        assert torch.allclose(a, b, rtol=1e-12)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="shared head"):
        mtp_loss(hiddens, labels, [head] * D, seq_idx=seq_idx, main_hidden=main_h)
