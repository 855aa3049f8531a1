"""Chunked linear cross-entropy: ``CE(hidden @ weight.T, targets)`` with no ``[N, V]`` logits.

With a 128k vocabulary the logits of one 8k-token micro-batch take 4 GiB in fp32, and the main loss
plus D MTP depths would each need them. Two implementations walk over token chunks:

* ``"torch"`` (:class:`_LinearCrossEntropy`): the forward pass keeps only the per-token
  log-sum-exp and the backward pass recomputes each chunk's logits, all in fp32 (fp64 for fp64
  inputs). Exact up to summation order, works for any upstream gradient (``reduction="none"``),
  and is the CPU default. On a GPU it costs a fourth GEMM and fp32 GEMMs for bf16 inputs.
* ``"fused"`` / ``"compiled"`` (:class:`_FusedLinearCrossEntropy`): one pass, Liger / Cut-CE
  style. Each chunk's logits are made in the input dtype, turned into ``softmax - onehot`` right
  away and consumed by the two gradient GEMMs, so backward only rescales stored gradients: three
  GEMMs per token instead of four, and ``grad_weight`` accumulated in fp32 across chunks. This
  needs the weight of every token in the final loss up front, so it computes ``Σ_i w_i CE_i``
  (:func:`_weighted_linear_cross_entropy`). ``"compiled"`` runs the per-chunk softmax-gradient
  step through ``torch.compile``, which fuses its elementwise passes over ``[chunk, V]``; on an
  H100 that took the loss from 1.8x to 1.2x the three-GEMM floor (T=8192, H=4096, V=131072, bf16).

``impl="auto"`` picks ``"compiled"`` for CUDA tensors and ``"torch"`` elsewhere.

Under autocast both Functions turn it off inside and cast explicitly: the GEMM inputs are rounded
to autocast's dtype (what ``F.linear`` would use) while logits, log-sum-exp and softmax stay fp32,
and gradients come back in the input dtypes. The recompute path's backward rebuilds exactly the
logits its forward took the log-sum-exp of; the one-pass path rounds ``softmax - onehot`` to
autocast's dtype for its two gradient GEMMs. (Left to autocast, the recompute path's forward saw
bf16 logits and its backward fp32 ones, 9 % off float64 at logit magnitudes of ~20; bf16 logits
alone, as the one-pass path makes for bf16 inputs, are 1.5-2.5 % off there.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

Reduction = Literal["sum", "mean", "none"]
Impl = Literal["auto", "torch", "fused", "compiled"]
SoftmaxGradStep = Callable[[Tensor, Tensor, Tensor, int, torch.dtype], "tuple[Tensor, Tensor]"]

# Budget of one chunk's logits, in elements. The torch path holds about two fp32 buffers of 2**26
# (256 MiB each). The fused path holds the input-dtype logits and gradient of a chunk (under autocast
# fp32 logits, so half as much again); 2**29 makes 4096 tokens at V=131k, the chunk size that
# measured fastest on an H100 (T=8192, H=4096, V=131072, bf16).
_CHUNK_LOGIT_ELEMENTS = 2**26
_FUSED_CHUNK_LOGIT_ELEMENTS = 2**29


def default_chunk_size(vocab_size: int, impl: Impl = "torch") -> int:
    """Tokens per chunk that keep one chunk of logits within the implementation's budget."""
    budget = _CHUNK_LOGIT_ELEMENTS if impl == "torch" else _FUSED_CHUNK_LOGIT_ELEMENTS
    return max(1, budget // max(1, vocab_size))


def resolve_impl(impl: Impl, device: torch.device) -> Impl:
    """The concrete implementation ``impl`` stands for on ``device``."""
    if impl not in ("auto", "torch", "fused", "compiled"):
        raise ValueError(f"impl must be 'auto', 'torch', 'fused' or 'compiled', got {impl!r}")
    if impl == "auto":
        return "compiled" if device.type == "cuda" else "torch"
    return impl


def loss_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype losses come back in: fp32, or fp64 when an input is fp64."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _autocast_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype | None:
    """Autocast's dtype when it is on for the inputs' device; fp64 inputs opt out, as they do for
    autocast's own ops."""
    device = hidden.device.type
    if torch.float64 in (hidden.dtype, weight.dtype) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _rounded(x: Tensor, gemm_dtype: torch.dtype, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``gemm_dtype`` and held in ``dtype``: fp32 GEMMs on bf16-rounded inputs give
    the fp32-accumulated logits of a bf16 GEMM, identically in forward and backward."""
    return x.to(gemm_dtype).to(dtype)


# ---- the recompute path ------------------------------------------------------------------------
class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token CE (0 on ignored tokens) and, on request, the per-token argmax."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        chunk_size: int,
        want_argmax: bool,
    ) -> tuple[Tensor, Tensor]:
        dtype = loss_dtype(hidden, weight)
        gemm_dtype = _autocast_dtype(hidden, weight) or torch.promote_types(hidden.dtype, weight.dtype)
        num_tokens = hidden.shape[0]
        loss = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
        lse = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
        argmax = hidden.new_empty(num_tokens if want_argmax else 0, dtype=torch.long)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = _rounded(weight, gemm_dtype, dtype)  # one cast per call, not per chunk
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                logits = _rounded(hidden[start:end], gemm_dtype, dtype) @ weight_c.T
                tgt = targets[start:end]
                valid = tgt != ignore_index
                chunk_lse = torch.logsumexp(logits, dim=-1)
                tgt_logit = logits.gather(1, torch.where(valid, tgt, 0).unsqueeze(1)).squeeze(1)
                loss[start:end] = torch.where(valid, chunk_lse - tgt_logit, 0.0)
                lse[start:end] = chunk_lse
                if want_argmax:
                    argmax[start:end] = logits.argmax(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.gemm_dtype = gemm_dtype
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor, _grad_argmax: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        dtype = lse.dtype
        num_tokens = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = _rounded(weight, ctx.gemm_dtype, dtype)
            grad_hidden = torch.empty_like(hidden) if need_h else None
            grad_weight = torch.zeros_like(weight_c) if need_w else None
            for start in range(0, num_tokens, ctx.chunk_size):
                end = min(start + ctx.chunk_size, num_tokens)
                hidden_c = _rounded(hidden[start:end], ctx.gemm_dtype, dtype)
                tgt = targets[start:end]
                valid = tgt != ctx.ignore_index
                # d CE / d logits = softmax - onehot(target), scaled by the incoming per-token grad.
                grad_logits = (hidden_c @ weight_c.T).sub_(lse[start:end].unsqueeze(1)).exp_()
                rows = torch.arange(end - start, device=hidden.device)
                grad_logits[rows, torch.where(valid, tgt, 0)] -= valid.to(dtype)
                grad_logits.mul_(torch.where(valid, grad_loss[start:end].to(dtype), 0.0).unsqueeze(1))
                if need_h:
                    grad_hidden[start:end] = (grad_logits @ weight_c).to(hidden.dtype)
                if need_w:
                    grad_weight.addmm_(grad_logits.T, hidden_c)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


# ---- the one-pass path -------------------------------------------------------------------------
def softmax_grad_step(
    logits: Tensor, targets: Tensor, token_weight: Tensor, ignore_index: int, grad_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """One chunk's per-token CE and ``w_i · (softmax - onehot)``, from logits in any float dtype.

    The maths runs in at least fp32 and the gradient comes back in ``grad_dtype``, the dtype of the
    GEMMs that consume it, so the chunk is read once and written once. Written as plain tensor ops
    (no in-place updates) so ``torch.compile`` can fuse it into a couple of passes over ``[chunk, V]``.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=1)
    ce = torch.where(valid, lse - z.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0)
    onehot = torch.arange(z.shape[1], device=z.device) == safe.unsqueeze(1)
    scale = torch.where(valid, token_weight.to(z.dtype), 0.0)
    grad = (torch.exp(z - lse.unsqueeze(1)) - onehot.to(z.dtype)) * scale.unsqueeze(1)
    return ce, grad.to(grad_dtype)


@functools.cache
def compiled_softmax_grad_step() -> SoftmaxGradStep:
    """:func:`softmax_grad_step` through ``torch.compile``, made on first use (importing the compiler costs a
    second at every process start). ``dynamic=None`` recompiles once with a symbolic chunk length when the last
    (shorter) chunk arrives, instead of once per distinct length."""
    return torch.compile(softmax_grad_step, dynamic=None)


@functools.cache
def _has_fp32_out_gemm(device_type: str) -> bool:
    """Whether ``mm`` and ``addmm`` with ``out_dtype=float32`` (bf16 inputs, fp32 output) run on this device."""
    acc = torch.zeros(2, 2, device=device_type)
    a = torch.ones(2, 2, device=device_type, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        out = torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool((acc == 2).all()) and out.dtype == torch.float32 and bool((out == 2).all())


def _matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``dtype`` (the inputs' or fp32), ``a`` and ``b`` sharing one dtype: fp32 out of a
    bf16 GEMM where the device has one, else of an fp32 GEMM on the exactly upcast inputs."""
    if a.dtype == dtype:
        return a @ b
    if _has_fp32_out_gemm(a.device.type):
        return torch.mm(a, b, out_dtype=dtype)
    return a.to(dtype) @ b.to(dtype)


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 (or fp64), ``a`` and ``b`` sharing any float dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _has_fp32_out_gemm(acc.device.type):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # e.g. CPU bf16: upcast the chunk (cheap next to the [V, H] accumulator)
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``Σ_i w_i CE_i`` with both gradients formed in the forward pass, chunk by chunk.

    Returns the weighted loss (differentiable), the per-token CE and the argmax (neither
    differentiable). Backward only multiplies the stored gradients by the incoming scalar.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        token_weight: Tensor,
        ignore_index: int,
        chunk_size: int,
        want_argmax: bool,
        step: SoftmaxGradStep,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = hidden.shape[0]
        ce = torch.zeros(num_tokens, dtype=loss_dtype(hidden, weight), device=hidden.device)
        # Without autocast the logits are made in the inputs' dtype: bf16 for bf16 weights, the
        # GPU fast path. Under autocast the GEMM inputs take its dtype and the logits stay fp32.
        gemm_dtype = _autocast_dtype(hidden, weight)
        logits_dtype = torch.promote_types(hidden.dtype, weight.dtype) if gemm_dtype is None else ce.dtype
        gemm_dtype = gemm_dtype or logits_dtype
        argmax = hidden.new_empty(num_tokens if want_argmax else 0, dtype=torch.long)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=ce.dtype, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(gemm_dtype)  # a no-op when both are bf16: the GEMMs stay in bf16
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                hidden_c = hidden[start:end].to(gemm_dtype)
                logits = _matmul(hidden_c, weight_c.T, logits_dtype)
                ce[start:end], grad_logits = step(
                    logits, targets[start:end], token_weight[start:end], ignore_index, gemm_dtype
                )
                if want_argmax:
                    argmax[start:end] = logits.argmax(dim=-1)
                if need_h:
                    grad_hidden[start:end] = _matmul(grad_logits, weight_c, logits_dtype)
                if need_w:
                    _accumulate(grad_weight, grad_logits.T, hidden_c)
        loss = (ce * token_weight.to(ce.dtype)).sum()
        # Held until backward in the weight's dtype: 1 GiB instead of 2 at V=131k, H=4096, bf16.
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(ce, argmax)
        return loss, ce, argmax

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_ce: Tensor | None, _grad_argmax: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype if grad_hidden is not None else grad_weight.dtype)
        return (
            None if grad_hidden is None else grad_hidden * scale,
            None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype),
            *([None] * 6),
        )


# ---- soft targets ------------------------------------------------------------------------------
class _SoftLinearCrossEntropy(torch.autograd.Function):
    """``Σ_i w_i · H(target_i, softmax(hidden_i @ weight.T))`` for a mixed target, in one pass.

    Token i's target distribution is ``(1 - α_i) · onehot(targets_i) + α_i · softmax(teacher_i)``, with
    teacher logits ``teacher_hidden[teacher_index_i] @ teacher_weight.T`` recomputed chunk by chunk from
    the (detached) teacher states, never stored: no ``[N, V]`` tensor of either distribution exists,
    only one chunk of each. Ignored targets contribute nothing, whatever ``α_i``. Both gradients are
    formed in the forward pass, as on the one-pass path, so the teacher's logits are made once; the
    teacher gets no gradient (it is a fixed target). Returns the weighted loss, the per-token CE and
    the argmax.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        token_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_index: Tensor,
        alpha: Tensor,
        ignore_index: int,
        chunk_size: int,
        want_argmax: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = loss_dtype(hidden, weight)
        gemm_dtype = _autocast_dtype(hidden, weight) or torch.promote_types(hidden.dtype, weight.dtype)
        num_tokens = hidden.shape[0]
        ce = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
        argmax = hidden.new_empty(num_tokens if want_argmax else 0, dtype=torch.long)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = _rounded(weight, gemm_dtype, dtype)
            teacher_c = weight_c if teacher_weight is weight else _rounded(teacher_weight, gemm_dtype, dtype)
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                hidden_c = _rounded(hidden[start:end], gemm_dtype, dtype)
                logits = hidden_c @ weight_c.T
                tgt = targets[start:end]
                valid = tgt != ignore_index
                a = torch.where(valid, alpha[start:end].to(dtype), 0.0)
                target_dist = torch.zeros_like(logits)
                target_dist.scatter_(1, torch.where(valid, tgt, 0).unsqueeze(1), (valid.to(dtype) - a).unsqueeze(1))
                soft = a > 0
                if bool(soft.any()):
                    rows = teacher_index[start:end][soft]
                    teacher_logits = _rounded(teacher_hidden[rows], gemm_dtype, dtype) @ teacher_c.T
                    target_dist[soft] += a[soft].unsqueeze(1) * torch.softmax(teacher_logits, dim=1)
                log_probs = torch.log_softmax(logits, dim=1)
                ce[start:end] = -(target_dist * log_probs).sum(dim=1)
                if want_argmax:
                    argmax[start:end] = logits.argmax(dim=-1)
                scale = torch.where(valid, token_weight[start:end].to(dtype), 0.0).unsqueeze(1)
                grad_logits = (log_probs.exp_().mul_(valid.unsqueeze(1)) - target_dist).mul_(scale)
                if need_h:
                    grad_hidden[start:end] = (grad_logits @ weight_c).to(hidden.dtype)
                if need_w:
                    grad_weight.addmm_(grad_logits.T, hidden_c)
        loss = (ce * token_weight.to(dtype)).sum()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(ce, argmax)
        return loss, ce, argmax

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_ce: Tensor | None, _grad_argmax: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            *([None] * 9),
        )


class Teacher(NamedTuple):
    """Soft targets for :func:`segmented_linear_cross_entropy`: segment ``j``'s token ``i`` also learns
    ``softmax(hidden[index[j][i]] @ weight.T)`` with share ``mix[j]`` (``1 - mix[j]`` stays on its label).

    ``hidden [..., H]`` (flattened to rows) and ``weight [V, H]`` are detached; ``index[j]`` has the shape of
    ``targets[j]`` and holds row numbers into the flattened ``hidden``, or is ``None`` for a labels-only
    segment (then ``mix[j]`` must be 0).
    """

    hidden: Tensor
    weight: Tensor
    index: Sequence[Tensor | None]
    mix: Sequence[float]


# ---- public API --------------------------------------------------------------------------------
class _WeightedCE(NamedTuple):
    """Result of :func:`_weighted_linear_cross_entropy`."""

    loss: Tensor
    """``Σ_i w_i CE_i``, differentiable."""
    per_token: Tensor
    """``CE_i`` (0 on ignored tokens), detached: for logging and per-segment sums."""
    argmax: Tensor | None
    """Per-token top-1 id when asked for, else ``None``."""


def _validate(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N,H] and weight [V,H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != [N] = {tuple(hidden.shape[:1])}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _needs_grad(hidden: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _weighted_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weight: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    impl: Impl = "auto",
    return_argmax: bool = False,
) -> _WeightedCE:
    """``Σ_i token_weight_i · CE(hidden_i @ weight.T, targets_i)``, chunked, plus the per-token CE.

    This is the form the one-pass path needs: the gradient of each token is formed in the forward
    pass, so its weight in the final loss (a normaliser such as ``1 / N`` or ``λ / (D · N_k)``)
    must be known then. ``token_weight [N]`` is treated as a constant (no gradient). Concatenate
    several losses that share ``weight`` (main head and MTP depths) into one call so the head is
    cast, and its fp32 gradient buffer allocated, once. Without gradients (eval) the forward-only
    recompute path runs whatever ``impl`` says, since there is nothing to fuse.
    """
    _validate(hidden, weight, targets, chunk_size)
    if token_weight.shape != targets.shape:
        raise ValueError(f"token_weight shape {tuple(token_weight.shape)} != targets {tuple(targets.shape)}")
    targets, token_weight = targets.long(), token_weight.detach()
    impl = resolve_impl(impl, hidden.device)
    if impl == "torch" or not _needs_grad(hidden, weight):
        chunk = chunk_size or default_chunk_size(weight.shape[0], "torch")
        per_token, argmax = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk, return_argmax)
        loss = (per_token * token_weight.to(per_token.dtype)).sum()
        per_token = per_token.detach()
    else:
        chunk = chunk_size or default_chunk_size(weight.shape[0], impl)
        step = compiled_softmax_grad_step() if impl == "compiled" else softmax_grad_step
        loss, per_token, argmax = _FusedLinearCrossEntropy.apply(
            hidden, weight, targets, token_weight, ignore_index, chunk, return_argmax, step
        )
    return _WeightedCE(loss, per_token, argmax if return_argmax else None)


class SegmentedCE(NamedTuple):
    """Result of :func:`segmented_linear_cross_entropy`."""

    loss: Tensor
    """``Σ_j scale_j · Σ_{i in segment j} CE_i``, differentiable."""
    sums: Tensor
    """``[J]`` unweighted CE sum of each segment, detached (for logging)."""
    argmax: list[Tensor] | None
    """Per segment, the top-1 ids in that segment's target shape, when asked for."""


def segmented_linear_cross_entropy(
    hiddens: Sequence[Tensor],
    weight: Tensor,
    targets: Sequence[Tensor],
    scales: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    impl: Impl = "auto",
    return_argmax: bool = False,
    teacher: Teacher | None = None,
) -> SegmentedCE:
    """Several losses on one shared head in one chunked call: segment ``j`` is ``hiddens[j] [..., H]``
    against ``targets[j] [...]``, every one of its tokens weighted by ``scales[j]``.

    The main loss and the MTP depths of a shared-head model are such segments (``scales`` =
    ``1 / N_main`` and ``λ · w_k / N_k``). One call casts the head and allocates its fp32 gradient
    accumulator once for all of them, at the price of concatenating the hidden states.

    With ``teacher`` the targets are mixed with soft ones (:class:`Teacher`), and the loss is the cross-entropy
    against the mixture, formed by :class:`_SoftLinearCrossEntropy` (one implementation, whatever ``impl``).
    """
    if not (len(hiddens) == len(targets) == scales.numel()) or not hiddens:
        raise ValueError(f"got {len(hiddens)} hiddens, {len(targets)} targets and {scales.numel()} scales")
    flat_h = [h.reshape(-1, h.shape[-1]) for h in hiddens]
    flat_t = [t.reshape(-1) for t in targets]
    sizes = [t.numel() for t in flat_t]
    token_weight = scales.detach().repeat_interleave(torch.tensor(sizes, device=scales.device))
    hidden = flat_h[0] if len(flat_h) == 1 else torch.cat(flat_h)
    target = flat_t[0] if len(flat_t) == 1 else torch.cat(flat_t)
    if teacher is None:
        out = _weighted_linear_cross_entropy(
            hidden,
            weight,
            target,
            token_weight,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            impl=impl,
            return_argmax=return_argmax,
        )
    else:
        out = _soft_linear_cross_entropy(
            hidden, weight, target, token_weight, teacher, sizes, targets, ignore_index, chunk_size, return_argmax
        )
    sums = torch.stack([part.sum() for part in out.per_token.split(sizes)])
    argmax = None
    if out.argmax is not None:
        argmax = [a.view(t.shape) for a, t in zip(out.argmax.split(sizes), targets, strict=True)]
    return SegmentedCE(out.loss, sums, argmax)


def _soft_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    token_weight: Tensor,
    teacher: Teacher,
    sizes: list[int],
    targets: Sequence[Tensor],
    ignore_index: int,
    chunk_size: int | None,
    return_argmax: bool,
) -> _WeightedCE:
    """The flattened call of :func:`segmented_linear_cross_entropy` with soft targets."""
    _validate(hidden, weight, target, chunk_size)
    if not (len(teacher.index) == len(teacher.mix) == len(sizes)):
        raise ValueError(
            f"teacher has {len(teacher.index)} indices and {len(teacher.mix)} mixes for {len(sizes)} segments"
        )
    teacher_hidden = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
    teacher_weight = teacher.weight if teacher.weight is weight else teacher.weight.detach()
    if teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(
            f"teacher weight {tuple(teacher_weight.shape)} does not match its states {tuple(teacher_hidden.shape)}"
        )
    index, alpha = [], []
    for idx, mix, t in zip(teacher.index, teacher.mix, targets, strict=True):
        if not 0 <= mix <= 1 or (idx is None and mix != 0):
            raise ValueError(f"teacher mix must be in [0, 1] (0 for a segment without teacher index), got {mix}")
        if idx is not None and idx.shape != t.shape:
            raise ValueError(f"teacher index {tuple(idx.shape)} does not match targets {tuple(t.shape)}")
        rows = torch.zeros(t.numel(), dtype=torch.long, device=t.device) if idx is None else idx.reshape(-1).long()
        index.append(rows)
        alpha.append(torch.full((t.numel(),), float(mix), dtype=torch.float64, device=t.device))
    chunk = chunk_size or default_chunk_size(weight.shape[0], "torch")
    if not _needs_grad(hidden, weight):
        hidden, weight = hidden.detach(), weight.detach()
    loss, per_token, argmax = _SoftLinearCrossEntropy.apply(
        hidden,
        weight,
        target.long(),
        token_weight,
        teacher_hidden,
        teacher_weight,
        torch.cat(index),
        torch.cat(alpha),
        ignore_index,
        chunk,
        return_argmax,
    )
    return _WeightedCE(loss, per_token, argmax if return_argmax else None)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
    return_argmax: bool = False,
    impl: Impl = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden [N,H] @ weight[V,H].T`` against ``targets [N]``, chunked over N.

    Same values and gradients as ``F.cross_entropy(hidden @ weight.T, targets, ...)`` (including
    ``mean`` over zero valid targets giving NaN), but the loss is returned in fp32 (fp64 for fp64
    inputs) whatever the input dtype, and gradients come back in the input dtypes. With
    ``return_argmax`` also returns the per-token top-1 prediction ``[N]`` (no grad) from the same
    chunk loop, for accuracy metrics at no extra matmul.

    ``impl`` picks the implementation (module docstring). ``reduction="none"`` with gradients has
    no fixed per-token weights, so ``"auto"`` takes the recompute path for it and an explicit
    ``"fused"`` / ``"compiled"`` is an error.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    _validate(hidden, weight, targets, chunk_size)
    if reduction == "none":
        if impl in ("fused", "compiled") and _needs_grad(hidden, weight):
            raise ValueError(f"impl={impl!r} needs reduction 'sum' or 'mean' (per-token weights known up front)")
        chunk = chunk_size or default_chunk_size(weight.shape[0], "torch")
        resolve_impl(impl, hidden.device)  # validates the name
        per_token, argmax = _LinearCrossEntropy.apply(
            hidden, weight, targets.long(), ignore_index, chunk, return_argmax
        )
        return (per_token, argmax) if return_argmax else per_token
    valid = targets != ignore_index
    scale = 1.0 if reduction == "sum" else 1.0 / valid.sum()  # 1/0 = inf: NaN loss, as F.cross_entropy
    dtype = loss_dtype(hidden, weight)
    token_weight = torch.as_tensor(scale, dtype=dtype, device=hidden.device).expand(targets.shape)
    out = _weighted_linear_cross_entropy(
        hidden,
        weight,
        targets,
        token_weight,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        impl=impl,
        return_argmax=return_argmax,
    )
    return (out.loss, out.argmax) if return_argmax else out.loss
