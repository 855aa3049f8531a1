"""Chunked linear cross-entropy: ``CE(hidden @ weight.T, targets)`` with no ``[N, V]`` logits.

With a 128k vocabulary the logits of one 8k-token micro-batch take 4 GiB in fp32, and the main loss
plus D MTP depths would each need them (spec §3). Here the forward pass walks over token chunks
and keeps only the per-token log-sum-exp; the backward pass recomputes each chunk's logits to form
the gradients. Logits, softmax and gradient accumulation are in fp32 (fp64 for fp64 inputs), so
values and gradients equal the materialised computation up to summation order.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

Reduction = Literal["sum", "mean", "none"]

# Budget of one chunk's logits, in elements: 2**26 fp32 values = 256 MiB. Forward (logsumexp's
# temporary) and backward (softmax formed in place) hold at most about two such buffers at a time.
_CHUNK_LOGIT_ELEMENTS = 2**26


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of fp32 logits stays near 256 MiB."""
    return max(1, _CHUNK_LOGIT_ELEMENTS // max(1, vocab_size))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


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
        dtype = _compute_dtype(hidden, weight)
        weight_c = weight.to(dtype)  # one upcast per call, not per chunk
        num_tokens = hidden.shape[0]
        loss = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
        lse = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
        argmax = hidden.new_empty(num_tokens if want_argmax else 0, dtype=torch.long)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = hidden[start:end].to(dtype) @ weight_c.T
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
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_argmax: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        dtype = lse.dtype
        weight_c = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight_c) if need_w else None
        num_tokens = hidden.shape[0]
        for start in range(0, num_tokens, ctx.chunk_size):
            end = min(start + ctx.chunk_size, num_tokens)
            hidden_c = hidden[start:end].to(dtype)
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


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
    return_argmax: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden [N,H] @ weight[V,H].T`` against ``targets [N]``, chunked over N.

    Same values and gradients as ``F.cross_entropy(hidden @ weight.T, targets, ...)`` (including
    ``mean`` over zero valid targets giving NaN), but the loss is returned in fp32 (fp64 for fp64
    inputs) whatever the input dtype, and gradients come back in the input dtypes. With
    ``return_argmax`` also returns the per-token top-1 prediction ``[N]`` (no grad) from the same
    chunk loop, for accuracy metrics at no extra matmul.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            "expected hidden [N,H] and weight [V,H], "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != [N] = {tuple(hidden.shape[:1])}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    per_token, argmax = _LinearCrossEntropy.apply(
        hidden, weight, targets.long(), ignore_index, chunk_size, return_argmax
    )
    if reduction == "sum":
        loss = per_token.sum()
    elif reduction == "mean":
        loss = per_token.sum() / (targets != ignore_index).sum()
    else:
        loss = per_token
    return (loss, argmax) if return_argmax else loss
