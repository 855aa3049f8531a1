"""Main and MTP losses over one chunked cross-entropy, and acceptance metrics.

``mtp_loss`` returns ``λ · Σ_k w_k CE_k`` with depth shares ``w_k`` summing to 1 (``1/D`` each by
default, i.e. ``(λ / D) · Σ_k CE_k``); the caller adds it to ``main_loss``. Normalisers are
passed in rather than computed here whenever the trainer has global counts, because a per
micro-batch mean weights short and long micro-batches alike (Megatron issue #7452).

Both go through :func:`~mtp_recipes.loss.linear_ce.segmented_linear_cross_entropy`. With a shared
head, ``mtp_loss(..., main_hidden=h)`` takes the main loss and every depth as segments of ONE call
(head cast and fp32 gradient buffer made once); ``MTPModel.forward`` does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from mtp_recipes.loss.linear_ce import Impl, SegmentedCE, Teacher, loss_dtype, segmented_linear_cross_entropy
from mtp_recipes.mtp.config import Normalization, check_options, depth_shares
from mtp_recipes.mtp.roll import roll_ids, roll_targets

Count = Union[int, Tensor]


@dataclass
class MTPLossOutput:
    """What one MTP loss call produces.

    ``loss`` is already scaled by ``λ · w_k``; ``per_depth`` holds the unscaled ``CE_k`` for logging,
    detached: the one-pass loss forms gradients for ``loss`` only (its per-token weights are fixed).
    ``num_targets`` are the local valid-target counts per depth. With ``return_accuracy`` the
    per-depth ``predictions`` (argmax ids), ``correct`` and ``valid`` (bool) are ``[B,S]`` tensors,
    enough for :func:`acceptance_stats` and for agreement with the backbone's own argmax.
    """

    loss: Tensor
    per_depth: list[Tensor]
    num_targets: Tensor
    predictions: list[Tensor] | None = None
    correct: list[Tensor] | None = None
    valid: list[Tensor] | None = None
    main_loss: Tensor | None = None
    main_argmax: Tensor | None = None


@dataclass
class AcceptanceStats:
    """Slot counts behind per-depth accuracy and acceptance length, all int64 ``[D]`` tensors.

    Counts rather than ratios so a trainer can add them over micro-batches (``+``) and
    ``all_reduce`` them before dividing.
    """

    correct: Tensor
    valid: Tensor
    cum_correct: Tensor
    cum_valid: Tensor

    def __add__(self, other: AcceptanceStats) -> AcceptanceStats:
        return AcceptanceStats(
            self.correct + other.correct,
            self.valid + other.valid,
            self.cum_correct + other.cum_correct,
            self.cum_valid + other.cum_valid,
        )

    @property
    def accuracy(self) -> Tensor:
        """Top-1 accuracy of each depth on its valid slots (0 where a depth has none)."""
        return self.correct / self.valid.clamp_min(1)

    @property
    def cumulative(self) -> Tensor:
        """``c_k``: share of slots with depths 1..k all valid whose depths 1..k are all right."""
        return self.cum_correct / self.cum_valid.clamp_min(1)

    @property
    def acceptance_length(self) -> Tensor:
        """Expected tokens per step under greedy verification: ``1 + Σ_k c_k``."""
        return 1 + self.cumulative.sum()


def acceptance_stats(correct_per_depth: Sequence[Tensor], valid_per_depth: Sequence[Tensor]) -> AcceptanceStats:
    """Count per-depth and cumulative hits from per-depth bool ``[B,S]`` masks.

    ``c_k`` is taken over slots where depths 1..k all have a target: a slot near a document end
    has no depth-k draft to accept, and counting it as a miss would bias ``c_k`` by document length.
    """
    if len(correct_per_depth) != len(valid_per_depth):
        raise ValueError(f"got {len(correct_per_depth)} correct masks but {len(valid_per_depth)} valid masks")
    correct, valid, cum_correct, cum_valid = [], [], [], []
    all_valid: Tensor | None = None
    all_correct: Tensor | None = None
    for hit, ok in zip(correct_per_depth, valid_per_depth, strict=True):
        hit = hit.bool() & ok.bool()
        all_valid = ok.bool() if all_valid is None else all_valid & ok.bool()
        all_correct = hit if all_correct is None else all_correct & hit
        correct.append(hit.sum())
        valid.append(ok.bool().sum())
        cum_correct.append(all_correct.sum())
        cum_valid.append(all_valid.sum())
    return AcceptanceStats(*(_stack_counts(c) for c in (correct, valid, cum_correct, cum_valid)))


def _stack_counts(counts: list[Tensor]) -> Tensor:
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.int64)


def main_loss(
    hidden: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    *,
    num_label_tokens: Count | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_argmax: bool = False,
    impl: Impl = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Next-token CE of ``hidden [..., H]`` on already-shifted ``labels [...]``, chunked.

    Divided by ``num_label_tokens`` (the trainer's global count) when given, else by the local
    count. With ``return_argmax`` also returns the backbone's argmax in ``labels``' shape.
    ``impl`` selects the linear cross-entropy implementation (:mod:`mtp_recipes.loss.linear_ce`).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    count = (labels != ignore_index).sum() if num_label_tokens is None else num_label_tokens
    dtype = loss_dtype(hidden, head_weight)
    scale = 1 / torch.as_tensor(count, device=hidden.device).to(dtype).clamp_min(1).reshape(1)
    out = segmented_linear_cross_entropy(
        [hidden],
        head_weight,
        [labels],
        scale,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        impl=impl,
        return_argmax=return_argmax,
    )
    return (out.loss, out.argmax[0]) if return_argmax else out.loss


def _validate(
    per_depth_hidden: Sequence[Tensor],
    labels: Tensor,
    head_weight: Tensor | Sequence[Tensor],
    loss_scaling_factor: float,
    normalization: str,
    num_label_tokens: Count | None,
    num_depth_tokens: Sequence[Count] | Tensor | None,
    depth_weights: Sequence[float] | None,
) -> None:
    depths = len(per_depth_hidden)
    check_options({"loss_scaling_factor": loss_scaling_factor, "normalization": normalization})
    if depth_weights is not None:
        check_options({"num_layers": depths, "depth_weights": depth_weights})
    if normalization == "main_tokens" and num_label_tokens is None:
        raise ValueError("normalization='main_tokens' needs num_label_tokens")
    if num_depth_tokens is not None and len(num_depth_tokens) != depths:
        raise ValueError(f"num_depth_tokens has {len(num_depth_tokens)} entries for {depths} depths")
    heads = [head_weight] if isinstance(head_weight, Tensor) else list(head_weight)
    if not isinstance(head_weight, Tensor) and len(heads) != depths:
        raise ValueError(f"got {len(heads)} head weights for {depths} depths (or pass one shared)")
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B,S], got {tuple(labels.shape)}")
    for k, hidden in enumerate(per_depth_hidden, start=1):
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            raise ValueError(
                f"hidden of depth {k} is {tuple(hidden.shape)}, expected [B,S,H] with [B,S] = {tuple(labels.shape)}"
            )
    for k, head in enumerate(heads, start=1):
        if depths and (head.dim() != 2 or head.shape[1] != per_depth_hidden[0].shape[-1]):
            raise ValueError(
                f"head weight {k} is {tuple(head.shape)}, expected [V,H] with H = {per_depth_hidden[0].shape[-1]}"
            )


def mtp_loss(
    per_depth_hidden: Sequence[Tensor],
    labels: Tensor,
    head_weight: Tensor | Sequence[Tensor],
    *,
    loss_scaling_factor: float = 0.1,
    seq_idx: Tensor | None = None,
    normalization: Normalization = "depth_tokens",
    num_label_tokens: Count | None = None,
    num_depth_tokens: Sequence[Count] | Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_accuracy: bool = False,
    impl: Impl = "auto",
    main_hidden: Tensor | None = None,
    depth_weights: Sequence[float] | None = None,
    self_share: float = 0.0,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
) -> MTPLossOutput:
    """``λ · Σ_k w_k CE_k`` over D depths; depth k's targets are ``labels[t+k]`` in-document.

    ``per_depth_hidden[k-1]``: depth k's ``[B,S,H]`` state as its head takes it (normed); ``head_weight``: one
    shared ``[V,H]`` weight or one per depth. ``CE_k`` is depth k's summed CE over ``N_k``: the trainer's global
    ``num_depth_tokens[k-1]`` or the local valid count (``depth_tokens``), or ``num_label_tokens`` for every depth
    (``main_tokens``, which ignores ``num_depth_tokens``). ``depth_weights`` are ``w_k`` (normalised to sum 1;
    ``None``: ``1/D`` each, i.e. ``(λ / D) · Σ_k CE_k``).

    ``self_share`` α > 0: depth k at slot t learns ``(1 - α) · onehot(labels[t+k]) + α · p(t+k)``, ``p`` the
    backbone's own distribution ``softmax(teacher_head @ teacher_hidden)`` (detached; ``teacher_head`` defaults
    to the shared head); slots without a label target at t+k contribute nothing, as with labels.

    ``main_hidden`` (the backbone's final-normed state, shared head only) joins the main next-token CE (over
    ``num_label_tokens``, else the local count) to the same chunked call: ``.loss`` is then
    ``CE_main + λ · Σ_k w_k CE_k`` and ``.main_loss`` / ``.main_argmax`` report the main part.

    Longer than 60 lines because of its keyword signature (a public function's every option, with defaults) and
    this docstring; the body is one chunked call and its bookkeeping.
    """
    _validate(
        per_depth_hidden,
        labels,
        head_weight,
        loss_scaling_factor,
        normalization,
        num_label_tokens,
        num_depth_tokens,
        depth_weights,
    )
    depths = len(per_depth_hidden)
    if depths == 0:
        return _no_depths(labels, return_accuracy)
    targets = [roll_targets(labels, k, seq_idx, ignore_index) for k in range(1, depths + 1)]
    valid = [t != ignore_index for t in targets]
    num_targets = torch.stack([v.sum() for v in valid])
    heads = [head_weight] if isinstance(head_weight, Tensor) else list(head_weight)
    counts = _depth_counts(normalization, num_label_tokens, num_depth_tokens, num_targets)
    counts = counts.to(loss_dtype(per_depth_hidden[0], heads[0])).clamp_min(1)  # CE_k = 0, not NaN, without targets
    shares = torch.tensor(depth_shares(depths, depth_weights), dtype=counts.dtype, device=counts.device)
    scales = loss_scaling_factor * shares / counts
    kwargs = dict(ignore_index=ignore_index, chunk_size=chunk_size, impl=impl, return_argmax=return_accuracy)
    teacher = _teacher(self_share, teacher_hidden, teacher_head, head_weight, labels, seq_idx, depths)
    main = None
    if main_hidden is not None:
        main, parts = _with_main(
            main_hidden, per_depth_hidden, head_weight, labels, targets, scales, num_label_tokens, teacher, kwargs
        )
    else:
        parts = _depth_calls(per_depth_hidden, head_weight, targets, scales, teacher, kwargs)
    per_depth = torch.cat([p.sums for p in parts]) / counts
    out = MTPLossOutput(
        loss=torch.stack([p.loss for p in parts]).sum(), per_depth=list(per_depth.unbind()), num_targets=num_targets
    )
    if main is not None:
        out.main_loss, out.main_argmax = main
    if return_accuracy:
        out.predictions = [a for p in parts for a in p.argmax]
        out.valid = valid
        out.correct = [(p == t) & v for p, t, v in zip(out.predictions, targets, valid, strict=True)]
    return out


def _no_depths(labels: Tensor, return_accuracy: bool) -> MTPLossOutput:
    """The output for D = 0: a zero loss, no depth."""
    out = MTPLossOutput(
        loss=torch.zeros((), device=labels.device),
        per_depth=[],
        num_targets=torch.zeros(0, dtype=torch.int64, device=labels.device),
    )
    if return_accuracy:
        out.predictions, out.correct, out.valid = [], [], []
    return out


def _depth_calls(
    per_depth_hidden: Sequence[Tensor],
    head_weight: Tensor | Sequence[Tensor],
    targets: list[Tensor],
    scales: Tensor,
    teacher: _SelfTeacher | None,
    kwargs: dict[str, Any],
) -> list[SegmentedCE]:
    """The depths' CE: one call with a shared head (cast and gradient accumulated once), else one per head."""
    if isinstance(head_weight, Tensor):
        return [
            segmented_linear_cross_entropy(per_depth_hidden, head_weight, targets, scales, **kwargs, teacher=teacher)
        ]
    return [
        segmented_linear_cross_entropy(
            [h], w, [t], scales[k : k + 1], **kwargs, teacher=None if teacher is None else teacher.depth(k)
        )
        for k, (h, w, t) in enumerate(zip(per_depth_hidden, head_weight, targets, strict=True))
    ]


def _depth_counts(
    normalization: Normalization,
    num_label_tokens: Count | None,
    num_depth_tokens: Sequence[Count] | Tensor | None,
    num_targets: Tensor,
) -> Tensor:
    """``N_k`` per depth: the main count (``main_tokens``), the trainer's global counts, or the local ones."""
    if normalization == "main_tokens":
        return torch.as_tensor(num_label_tokens, device=num_targets.device).expand(len(num_targets))
    if num_depth_tokens is not None:
        return _as_count_tensor(num_depth_tokens, num_targets.device)
    return num_targets


def _with_main(
    main_hidden: Tensor,
    per_depth_hidden: Sequence[Tensor],
    head_weight: Tensor | Sequence[Tensor],
    labels: Tensor,
    targets: list[Tensor],
    scales: Tensor,
    num_label_tokens: Count | None,
    teacher: _SelfTeacher | None,
    kwargs: dict[str, Any],
) -> tuple[tuple[Tensor, Tensor | None], list[SegmentedCE]]:
    """The main CE and every depth as segments of one call: ``((main CE, main argmax), [depths' output])``."""
    if not isinstance(head_weight, Tensor):
        raise ValueError("main_hidden joins the depths' call only with one shared head weight")
    main_count = (labels != kwargs["ignore_index"]).sum() if num_label_tokens is None else num_label_tokens
    main_count = torch.as_tensor(main_count, device=labels.device).to(scales.dtype).clamp_min(1).reshape(1)
    joint = segmented_linear_cross_entropy(
        [main_hidden, *per_depth_hidden],
        head_weight,
        [labels, *targets],
        torch.cat([1 / main_count, scales]),
        **kwargs,
        teacher=None if teacher is None else teacher.after_main(),
    )
    argmax = kwargs["return_argmax"]
    main = (joint.sums[0] / main_count[0], joint.argmax[0] if argmax else None)
    return main, [joint._replace(sums=joint.sums[1:], argmax=joint.argmax[1:] if argmax else None)]


class _SelfTeacher(Teacher):
    def after_main(self) -> Teacher:
        """The same teacher behind a labels-only main segment, for the joint main + depths call."""
        return Teacher(self.hidden, self.weight, [None, *self.index], [0.0, *self.mix])

    def depth(self, k: int) -> Teacher:
        """The teacher of depth k+1 alone (0-based ``k``), for a per-depth head's own call."""
        return Teacher(self.hidden, self.weight, [self.index[k]], [self.mix[k]])


def _teacher(
    share: float,
    hidden: Tensor | None,
    head: Tensor | None,
    head_weight: Tensor | Sequence[Tensor],
    labels: Tensor,
    seq_idx: Tensor | None,
    depths: int,
) -> _SelfTeacher | None:
    """Depth k's soft targets: the backbone's distribution at slot t+k, found by rolling row numbers like labels."""
    if not 0 <= share <= 1:
        raise ValueError(f"self_share must be in [0, 1], got {share}")
    if share == 0:
        return None
    if hidden is None or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"self_share > 0 needs teacher_hidden [B,S,H] matching labels {tuple(labels.shape)}")
    if head is None:
        if not isinstance(head_weight, Tensor):
            raise ValueError("self_share > 0 with per-depth heads needs teacher_head (the backbone's output weight)")
        head = head_weight
    rows = torch.arange(labels.numel(), device=labels.device).view(labels.shape)
    index = [roll_ids(rows, k, seq_idx) for k in range(1, depths + 1)]
    return _SelfTeacher(hidden.detach(), head, index, [float(share)] * depths)


def _as_count_tensor(counts: Sequence[Count] | Tensor, device: torch.device) -> Tensor:
    if isinstance(counts, Tensor):
        return counts.to(device)
    return torch.stack([torch.as_tensor(c, device=device) for c in counts])
