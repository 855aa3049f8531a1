"""Gated DeltaNet (Qwen3-Next, Qwen3.5) for packed rows: the conv window and the recurrent state restart at every
document start (``seq_idx``).

transformers' linear-attention layers run one recurrence over the whole row, so a packed row leaks each document's
state into the next. :func:`deltanet_forward` computes the layer's training output from its own parameters
(``conv1d``, ``dt_bias``, ``A_log``, ``norm``, ``out_proj`` and the family's input projections): causal conv +
SiLU that never reads across a document start (the Mamba2 mixer's conv kernels), the gated delta rule per
document, the gated RMSNorm and ``out_proj``. On CUDA with the ``fla`` package installed the rule is its
``chunk_gated_delta_rule`` over ``cu_seqlens``; anywhere else the chunked torch rule below, over the documents
stacked as rows.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp_recipes import hf_compat
from mtp_recipes.document_layout import position_in_document
from mtp_recipes.families.nemotron_h_mamba import kernels

CHUNK = 64


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """The rule one token at a time (the definition): with ``q``, ``k`` ``[B, S, H, Dk]`` (L2-normalised, ``q``
    scaled by ``Dk ** -0.5``), ``v`` ``[B, S, H, Dv]``, log decays ``g`` and write strengths ``beta`` ``[B, S, H]``,
    ``S_t = e^{g_t} S_{t-1} + k_t (beta_t (v_t - e^{g_t} S_{t-1}^T k_t))^T`` and ``o_t = S_t^T q_t``."""
    batch, length, heads, dk = k.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1])
    out = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t]))
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], delta)
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(out, dim=1)


def chunked_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """:func:`recurrent_gated_delta_rule` for rows that each hold one document, ``chunk`` tokens at a time.

    Inside a chunk the sequential updates fold into one unit lower-triangular solve (the WY form of the delta rule):
    with cumulative log decays ``G``, ``A_ij = beta_i k_i.k_j e^{G_i - G_j}`` (j < i), ``U = (I + A)^-1 (beta v)`` and
    ``W = (I + A)^-1 (beta k e^G)``; a chunk then reads the carried state once (``U - W S``) and updates it once.
    """
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    pad = -length % chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    n = (length + pad) // chunk

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, ...] -> [B, H, n, chunk, ...]
        return x.reshape(batch, n, chunk, heads, *x.shape[3:]).movedim(3, 1)

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    cum = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    system = torch.eye(chunk, dtype=q.dtype, device=q.device) + (
        (beta[..., None] * k) @ k.transpose(-1, -2) * decay
    ).tril(-1)
    u = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(
        system, beta[..., None] * k * cum.exp()[..., None], upper=False, unitriangular=True
    )
    attend = (q @ k.transpose(-1, -2)) * decay
    q_read = q * cum.exp()[..., None]
    k_write = k * (cum[..., -1:] - cum).exp()[..., None]
    state = q.new_zeros(batch, heads, dk, dv)
    out = []
    for i in range(n):
        fresh = u[:, :, i] - w[:, :, i] @ state
        out.append(q_read[:, :, i] @ state + attend[:, :, i] @ fresh)
        state = state * cum[:, :, i, -1, None, None].exp() + k_write[:, :, i].transpose(-1, -2) @ fresh
    return torch.stack(out, dim=2).movedim(1, 3).reshape(batch, n * chunk, heads, dv)[:, :length]


def documents_as_rows(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(row, position, length)``: where each token of a packed ``[B, S]`` batch goes when every document becomes
    its own row (``row`` and ``position`` per token, ``length`` the longest document)."""
    pos = position_in_document(seq_idx)
    starts = pos == 0
    row = starts.flatten().cumsum(0).view_as(seq_idx) - 1
    return row, pos, int(pos.max()) + 1


def packed_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seq_idx: torch.Tensor | None,
) -> torch.Tensor:
    """The gated delta rule with the state reset at every document start: ``fla``'s kernel over ``cu_seqlens`` on
    CUDA when installed, else :func:`chunked_gated_delta_rule` over the documents stacked as rows (zero padding after
    a document never reaches it: the rule is causal)."""
    kernel = fla_kernel(q)
    if kernel is not None:
        return kernel(q, k, v, g, beta, seq_idx)
    if seq_idx is None:
        return chunked_gated_delta_rule(q, k, v, g, beta)
    row, pos, length = documents_as_rows(seq_idx)
    rows = int(row.max()) + 1

    def stack(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(rows, length, *x.shape[2:])
        out[row, pos] = x
        return out

    return chunked_gated_delta_rule(*(stack(x) for x in (q, k, v, g, beta)))[row, pos]


def fla_kernel(q: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """``fla``'s chunked kernel for CUDA tensors when the package is installed, else ``None``."""
    if not q.is_cuda or not _has_fla():
        return None
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def run(q, k, v, g, beta, seq_idx):
        batch, length = q.shape[:2]
        flat = (x.reshape(1, batch * length, *x.shape[2:]) for x in (q, k, v, g, beta))
        if seq_idx is None:
            starts = torch.arange(0, batch * length + 1, length, device=q.device)
        else:
            first = (position_in_document(seq_idx) == 0).flatten().nonzero().squeeze(1)
            starts = torch.cat([first, first.new_tensor([batch * length])])
        out, _ = chunk_gated_delta_rule(*flat, scale=1.0, cu_seqlens=starts.long())
        return out.reshape(batch, length, *out.shape[2:])

    return run


@functools.cache
def _has_fla() -> bool:
    return importlib.util.find_spec("fla") is not None


def l2_normalised(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dimension, as the layer normalises queries and keys."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def deltanet_forward(
    layer: nn.Module,
    mixed_qkv: torch.Tensor,
    z: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    seq_idx: torch.Tensor | None,
) -> torch.Tensor:
    """A Gated DeltaNet layer's output from its projections: ``mixed_qkv [B, S, 2 Hk Dk + Hv Dv]`` (the conv input),
    the output gate ``z [B, S, Hv, Dv]`` and the write / decay inputs ``b``, ``a`` ``[B, S, Hv]``.

    Causal conv + activation (no tap reads across a document start) -> split into q, k, v -> ``beta = sigmoid(b)``,
    ``g = -e^{A_log} softplus(a + dt_bias)`` -> L2-normalised q, k (q scaled by ``Dk ** -0.5``), value heads sharing a
    key head -> the gated delta rule per document -> gated RMSNorm with ``z`` -> ``out_proj``; the rule in float32
    (float64 for float64 inputs), as transformers' torch path.
    """
    batch, length, _ = mixed_qkv.shape
    hk, dk, hv, dv = layer.num_k_heads, layer.head_k_dim, layer.num_v_heads, layer.head_v_dim
    conv = kernels.causal_conv1d(
        mixed_qkv.transpose(1, 2), layer.conv1d.weight.squeeze(1), layer.conv1d.bias, seq_idx, layer.activation
    ).transpose(1, 2)
    q, k, v = conv.split([hk * dk, hk * dk, hv * dv], dim=-1)
    compute = torch.promote_types(mixed_qkv.dtype, torch.float32)
    q = l2_normalised(q.reshape(batch, length, hk, dk).to(compute)).repeat_interleave(hv // hk, dim=2) * dk**-0.5
    k = l2_normalised(k.reshape(batch, length, hk, dk).to(compute)).repeat_interleave(hv // hk, dim=2)
    v = v.reshape(batch, length, hv, dv).to(compute)
    beta = b.to(compute).sigmoid()
    g = -layer.A_log.to(compute).exp() * F.softplus(a.to(compute) + layer.dt_bias.to(compute))
    core = packed_gated_delta_rule(q, k, v, g, beta, seq_idx).to(mixed_qkv.dtype)
    normed = layer.norm(core.reshape(-1, dv), z.reshape(-1, dv)).reshape(batch, length, hv * dv)
    return layer.out_proj(normed)


def zero_padding(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the states of padding tokens (a 2D ``[B, S]`` mask, 1 = token), as the layer does before projecting."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)


class PackedForward:
    """The training forward of a Gated DeltaNet layer, mixed in before transformers' class (a subclass that adds no
    state, swapped in with ``hf_compat.swap_class``): packed documents stay apart. A call with a cache (generation),
    or with positional arguments, is transformers' own forward. Subclasses say how the layer's projections give
    ``(mixed_qkv, z, b, a)`` in :meth:`projections`."""

    def projections(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or hf_compat.passed_cache(kwargs) is not None:
            return super().forward(hidden_states, *args, **kwargs)
        hidden = zero_padding(hidden_states, kwargs.get("attention_mask"))
        return deltanet_forward(self, *self.projections(hidden), kwargs.get("seq_idx"))
