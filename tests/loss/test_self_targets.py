"""Self-distilled MTP targets: depth k at slot t learns the backbone's own detached distribution at t+k."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtp_recipes.loss import mtp_loss
from mtp_recipes.loss.linear_ce import Teacher, segmented_linear_cross_entropy
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, packed_batch

I = -100
B, S, H, V = 2, 12, 8, 61


def _batch(seed: int, depths: int = 3, shared: bool = True):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(B, S, H, generator=g)
    hiddens = [torch.randn(B, S, H, generator=g) for _ in range(depths)]
    head = torch.randn(V, H, generator=g)
    heads = head if shared else [torch.randn(V, H, generator=g) for _ in range(depths)]
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < 0.2] = I
    seq_idx = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [1] * 3])
    labels[0, 4] = labels[0, 8] = labels[1, 8] = labels[:, -1] = I
    return main, hiddens, head, heads, labels, seq_idx


def _reference(main, hiddens, head, heads, labels, seq_idx, lam, alpha, weights, joint):
    """Float64, full [B,S,V] logits, targets from the rules themselves (no roll helpers)."""

    def leaf(x):
        return x.detach().double().clone().requires_grad_()

    m, hs = leaf(main), [leaf(h) for h in hiddens]
    shared = isinstance(heads, torch.Tensor)
    ws = leaf(heads) if shared else [leaf(w) for w in heads]
    teacher = torch.softmax(main.detach().double() @ head.detach().double().T, dim=-1)  # detached: a fixed target
    per_depth = []
    for k, h in enumerate(hs, start=1):
        log_q = torch.log_softmax(h @ (ws if shared else ws[k - 1]).T, dim=-1)
        total, count = torch.zeros((), dtype=torch.float64), 0
        for b in range(B):
            for t in range(S):
                src = t + k
                if src >= S or seq_idx[b, src] != seq_idx[b, t] or labels[b, src] == I:
                    continue
                target = alpha * teacher[b, src]
                target = target + (1 - alpha) * torch.nn.functional.one_hot(labels[b, src], V).double()
                total = total - (target * log_q[b, t]).sum()
                count += 1
        per_depth.append(total / max(count, 1))
    loss = lam * sum(w * p for w, p in zip(weights, per_depth)) / sum(weights)
    if joint:
        main_ce = torch.nn.functional.cross_entropy((m @ ws.T).reshape(-1, V), labels.reshape(-1), ignore_index=I)
        loss = loss + main_ce
    loss.backward()
    grad_w = ws.grad if shared else [w.grad for w in ws]
    return loss.detach(), [p.detach() for p in per_depth], [h.grad for h in hs], grad_w, m.grad


def _close(got, ref, tol=1e-9):
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "alpha, shared, joint",
    [(1.0, True, False), (1.0, True, True), (0.3, True, True), (1.0, False, False), (0.3, False, False)],
)
def test_self_targets_match_the_float64_materialised_reference(alpha, shared, joint):
    main, hiddens, head, heads, labels, seq_idx = _batch(seed=int(alpha * 10) + 2 * shared + joint, shared=shared)
    main, hiddens = main.double(), [h.double() for h in hiddens]  # float64 end to end: exact up to summation order
    head = head.double()
    heads = head if shared else [w.double() for w in heads]
    weights = [1.0, 0.6, 0.36]
    m = main.clone().requires_grad_()
    hs = [h.clone().requires_grad_() for h in hiddens]
    ws = heads.clone().requires_grad_() if shared else [w.clone().requires_grad_() for w in heads]
    out = mtp_loss(
        hs,
        labels,
        ws,
        loss_scaling_factor=0.3,
        seq_idx=seq_idx,
        chunk_size=5,
        depth_weights=weights,
        self_share=alpha,
        teacher_hidden=m,
        teacher_head=None if shared else head,
        main_hidden=m if joint else None,
    )
    out.loss.backward()
    ref_loss, ref_pd, ref_gh, ref_gw, ref_gm = _reference(
        main, hiddens, head, heads, labels, seq_idx, 0.3, alpha, weights, joint
    )
    _close(out.loss, ref_loss)
    for got, ref in zip(out.per_depth, ref_pd):
        _close(got, ref)
    for got, ref in zip(hs, ref_gh):
        _close(got.grad, ref)
    for got, ref in zip([ws] if shared else ws, [ref_gw] if shared else ref_gw):
        _close(got.grad, ref)
    if joint:  # the teacher is detached: the main states get the main CE's gradient only
        _close(m.grad, ref_gm)
    else:
        assert m.grad is None
    labels_only = mtp_loss(hiddens, labels, heads, loss_scaling_factor=0.3, seq_idx=seq_idx, depth_weights=weights)
    assert not torch.allclose(torch.stack(labels_only.per_depth), torch.stack(out.per_depth))  # the check can fail


def test_slots_without_a_label_target_contribute_nothing():
    main, hiddens, head, _, labels, seq_idx = _batch(seed=3)
    hs = [h.clone().requires_grad_() for h in hiddens]
    out = mtp_loss(hs, labels, head, seq_idx=seq_idx, self_share=1.0, teacher_hidden=main, chunk_size=4)
    out.loss.backward()
    for k, h in enumerate(hs, start=1):
        masked = torch.ones(B, S, dtype=torch.bool)
        for b in range(B):
            for t in range(S - k):
                if seq_idx[b, t + k] == seq_idx[b, t] and labels[b, t + k] != I:
                    masked[b, t] = False
        assert masked.any() and (~masked).any()
        assert (h.grad[masked] == 0).all() and (h.grad[~masked].abs().sum(-1) > 0).all()
        assert out.num_targets[k - 1] == (~masked).sum()
    # the teacher at a masked source slot does not matter either: change the states at the last slot of every row
    other = main.clone()
    other[:, -1] += 5.0
    again = mtp_loss(hiddens, labels, head, seq_idx=seq_idx, self_share=1.0, teacher_hidden=other, chunk_size=4)
    torch.testing.assert_close(again.loss, out.loss, rtol=1e-6, atol=0)  # labels[:, -1] are ignored


def test_mix_zero_is_the_labels_loss():
    main, hiddens, head, _, labels, _ = _batch(seed=4, depths=1)
    h = hiddens[0].requires_grad_()
    plain = segmented_linear_cross_entropy([h], head, [labels], torch.tensor([0.1]), chunk_size=5)
    (g_plain,) = torch.autograd.grad(plain.loss, h)
    rows = torch.arange(B * S).view(B, S)
    mixed = segmented_linear_cross_entropy(
        [h], head, [labels], torch.tensor([0.1]), chunk_size=5, teacher=Teacher(main, head, [rows], [0.0])
    )
    (g_mixed,) = torch.autograd.grad(mixed.loss, h)
    torch.testing.assert_close(mixed.loss, plain.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_mixed, g_plain, rtol=1e-5, atol=1e-7)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("depths", [1, 3])
def test_no_tensor_of_tokens_by_vocab_for_either_distribution(depths):
    main, hiddens, head, _, labels, seq_idx = _batch(seed=5, depths=depths)
    hs = [h.requires_grad_() for h in hiddens]
    w = head.requires_grad_()
    with _LargestTensor() as mode:
        out = mtp_loss(
            hs,
            labels,
            w,
            seq_idx=seq_idx,
            self_share=1.0,
            teacher_hidden=main,
            chunk_size=4,
            main_hidden=main.requires_grad_(),
        )
        out.loss.backward()
    assert mode.largest < B * S * V  # one segment's [tokens, vocab] never exists, whatever D
    assert mode.largest <= max((depths + 1) * B * S * H, 4 * V, V * H)


@pytest.mark.parametrize("targets", ["self", "mix"])
def test_the_model_trains_its_depths_on_its_own_distribution(targets):
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config("nemotron_h_debug"), targets=targets, self_weight=0.25)
    batch = packed_batch(model.text_config.vocab_size, [[10, 14], [24]])
    out = model(**batch)
    head = model.backbone.get_output_embeddings().weight.detach().double()
    teacher = torch.softmax(out.hidden_states.detach().double() @ head.T, -1)
    log_q = torch.log_softmax(out.mtp_hidden_states[0].detach().double() @ head.T, -1)
    alpha = 1.0 if targets == "self" else 0.25
    labels, seq_idx = batch["labels"], batch["seq_idx"]
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if seq_idx[b, t + 1] != seq_idx[b, t] or labels[b, t + 1] == I:
                continue
            target = alpha * teacher[b, t + 1] + (1 - alpha) * torch.nn.functional.one_hot(
                labels[b, t + 1], head.shape[0]
            )
            total, count = total - (target * log_q[b, t]).sum(), count + 1
    torch.testing.assert_close(out.mtp_losses[0].double(), total / count, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, out.main_loss + 0.1 * out.mtp_losses[0], rtol=1e-6, atol=0)
