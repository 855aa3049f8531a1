"""Mamba2 SSD scan as Triton kernels over packed documents: no ``mamba_ssm`` build, no quadratic tensor.

Why: transformers' torch fallback builds a ``[chunks, chunks]`` fp32 decay tensor per layer (~17 GB at the
anchor's 1.2B shape) and our bounded-memory torch scan is still a chain of small ops on a GPU. These three
kernels keep the recurrent state of one (document, head, value block) on chip and walk its chunks in order,
so the only memory they use is their inputs, outputs and gradients.

The scan is written in its "linear attention with scalar decay" form: with ``q = C``, ``k = B``,
``v = dt * x`` and ``g = dt * A`` (the per-token log decay),

    y_t = sum_{s <= t, same document} (q_t . k_s) exp(G_t - G_s) v_s,    G = cumsum(g) within the document,

which is exactly ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t`` with the state reset at
every document start. Documents are given as ``cu_seqlens`` over the flattened ``[batch * seq]`` tokens (row
ends are document ends), so one program never reads another document's tokens: packing cannot leak.

Per chunk of ``BT`` tokens a program computes the intra-chunk part as a masked ``[BT, BT]`` product and the
carried-in part from the ``[N, BV]`` state, then updates the state. The backward is two more walks: forward
order for ``dq`` (it needs the states), reverse order for ``dk``/``dv`` (they need the state gradients). The
log-decay gradient needs no kernel: ``dL/dG_t = q_t . dq_t - k_t . dk_t`` and ``dg`` is its reverse cumsum
within the document. ``B``/``C`` are read per group (no expansion to heads); their per-head gradients are
summed over the group afterwards.

The chunk length ``BT`` is a blocking choice of the kernel only: the result is the same for any ``BT`` (it is
not the model's ``chunk_size``). All kernels are plain ``@triton.jit`` with fixed block sizes (no autotune), so
they also run in Triton's interpreter (``TRITON_INTERPRET=1``), which is how the CPU tests check them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mtp_recipes.document_layout import document_starts
from mtp_recipes.families.nemotron_h_mamba.ssd import discretized_dt, skip_and_gate

# Launch shape, chosen from sm_80 and sm_90 builds of these kernels (`python scripts/triton_ssd_resources.py
# --sweep`): at N=128, bf16, 8 warps, 32-token chunks use no local-memory spills in any of the three walks with
# Triton 3.8 (torch 2.14.x) and 3.9 (the backward spills at 64 tokens; the forward spills 32 bytes at 64 tokens on
# sm_90 with Triton 3.8; everything spills at 4 warps). BV value columns per program (more programs when heads are
# few); BK covers the whole state dim (a program's state is [BK, BV]).
CHUNK_TOKENS = 32
BACKWARD_CHUNK_TOKENS = 32
VALUE_BLOCK = 32
NUM_WARPS = 8
MIN_DOT = 16  # tl.dot needs every block dim >= 16


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``PRECISION`` is "ieee" for fp32 inputs (no silent TF32), else unused."""
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(cu_seqlens, HEADS_PER_GROUP, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """This program's head, group and value block, its document's token range, and the tiles' index vectors."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    return i_h, i_h // HEADS_PER_GROUP, bos, eos, tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)


@triton.jit
def _load_chunk(q, k, v, g, start, eos, i_g, i_h, o_t, o_k, o_v, GROUPS, HEADS, N, P, BT: tl.constexpr):
    """The chunk of tokens ``[start, start + BT)`` (clipped at ``eos``): its rows, ``q``/``k`` (of head ``i_h``'s
    group), ``v`` block, cumulative log decay ``G``, the chunk's total decay and the causal in-chunk decay."""
    rows = (start + o_t).to(tl.int64)  # int64: token * heads * dims overflows int32 at long batches
    m_t = rows < eos
    m_tk = m_t[:, None] & (o_k < N)[None, :]
    b_q = tl.load(q + rows[:, None] * GROUPS * N + i_g * N + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + rows[:, None] * GROUPS * N + i_g * N + o_k[None, :], mask=m_tk, other=0.0)
    b_v = tl.load(v + _value_offsets(rows, i_h, o_v, HEADS, P), mask=_value_mask(m_t, o_v, P), other=0.0)
    # Padding rows have g = 0, so the cumsum at the last row is the decay of the whole (valid) chunk.
    b_G = tl.cumsum(tl.load(g + rows * HEADS + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
    G_last = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
    causal = o_t[:, None] >= o_t[None, :]
    decay = tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    return rows, m_t, b_q, b_k, b_v, b_G, G_last, decay


@triton.jit
def _value_offsets(rows, i_h, o_v, HEADS, P):
    """Offsets of a ``[BT, BV]`` tile of a ``[T, H, P]`` tensor (v, y and their gradients)."""
    return rows[:, None] * HEADS * P + i_h * P + o_v[None, :]


@triton.jit
def _value_mask(m_t, o_v, P):
    return m_t[:, None] & (o_v < P)[None, :]


@triton.jit
def _store_partial(part, value, rows, m_t, i_h, o_k, TOKENS, HEADS, N):
    """Store one value block's share of dq or dk into ``part [value blocks, T, H, N]`` (summed afterwards)."""
    i_v = tl.program_id(2)
    tl.store(
        part + ((i_v * TOKENS + rows[:, None]) * HEADS + i_h) * N + o_k[None, :],
        value,
        mask=m_t[:, None] & (o_k < N)[None, :],
    )


@triton.jit
def _advance_state(h, b_k, b_v, b_G, G_last, PRECISION: tl.constexpr):
    """The state after the chunk: ``exp(G_last) h + sum_s exp(G_last - G_s) k_s v_s^T`` (fp32)."""
    b_kd = (b_k * tl.exp(G_last - b_G)[:, None]).to(b_v.dtype)
    return h * tl.exp(G_last) + _mm(tl.trans(b_kd), b_v, PRECISION)


@triton.jit
def _ssd_fwd_kernel(
    q,
    k,
    v,
    g,
    o,
    cu_seqlens,
    GROUPS,
    HEADS,
    HEADS_PER_GROUP,
    N,
    P,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y_t = exp(G_t) C_t h_{before chunk} + sum_{s<=t in chunk} (q_t . k_s) exp(G_t - G_s) v_s, one value block."""
    i_h, i_g, bos, eos, o_t, o_k, o_v = _tile(cu_seqlens, HEADS_PER_GROUP, BT, BK, BV)
    h = tl.zeros([BK, BV], dtype=tl.float32)
    for start in range(bos, eos, BT):
        rows, m_t, b_q, b_k, b_v, b_G, G_last, decay = _load_chunk(
            q, k, v, g, start, eos, i_g, i_h, o_t, o_k, o_v, GROUPS, HEADS, N, P, BT
        )
        scores = _mm(b_q, tl.trans(b_k), PRECISION) * decay
        b_o = _mm(scores.to(b_v.dtype), b_v, PRECISION)
        b_o += tl.exp(b_G)[:, None] * _mm(b_q, h.to(b_q.dtype), PRECISION)
        tl.store(
            o + _value_offsets(rows, i_h, o_v, HEADS, P), b_o.to(o.dtype.element_ty), mask=_value_mask(m_t, o_v, P)
        )
        h = _advance_state(h, b_k, b_v, b_G, G_last, PRECISION)


@triton.jit
def _ssd_bwd_dq_kernel(
    q,
    k,
    v,
    g,
    do,
    dq_part,
    cu_seqlens,
    TOKENS,
    GROUPS,
    HEADS,
    HEADS_PER_GROUP,
    N,
    P,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq_t = exp(G_t) h_{before chunk} do_t + sum_{s<=t} (do_t . v_s) exp(G_t - G_s) k_s, for one value block."""
    i_h, i_g, bos, eos, o_t, o_k, o_v = _tile(cu_seqlens, HEADS_PER_GROUP, BT, BK, BV)
    h = tl.zeros([BK, BV], dtype=tl.float32)
    for start in range(bos, eos, BT):
        rows, m_t, b_q, b_k, b_v, b_G, G_last, decay = _load_chunk(
            q, k, v, g, start, eos, i_g, i_h, o_t, o_k, o_v, GROUPS, HEADS, N, P, BT
        )
        b_do = tl.load(do + _value_offsets(rows, i_h, o_v, HEADS, P), mask=_value_mask(m_t, o_v, P), other=0.0)
        weights = _mm(b_do, tl.trans(b_v), PRECISION) * decay
        b_dq = _mm(weights.to(b_k.dtype), b_k, PRECISION)
        b_dq += tl.exp(b_G)[:, None] * _mm(b_do, tl.trans(h).to(b_do.dtype), PRECISION)
        _store_partial(dq_part, b_dq, rows, m_t, i_h, o_k, TOKENS, HEADS, N)
        h = _advance_state(h, b_k, b_v, b_G, G_last, PRECISION)


@triton.jit
def _ssd_bwd_dkv_kernel(
    q,
    k,
    v,
    g,
    do,
    dk_part,
    dv,
    cu_seqlens,
    TOKENS,
    GROUPS,
    HEADS,
    HEADS_PER_GROUP,
    N,
    P,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Reverse walk with the state gradient dh (of the state after the chunk): dk (one value block's part), dv."""
    i_h, i_g, bos, eos, o_t, o_k, o_v = _tile(cu_seqlens, HEADS_PER_GROUP, BT, BK, BV)
    n_chunks = tl.cdiv(eos - bos, BT)
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, n_chunks):
        rows, m_t, b_q, b_k, b_v, b_G, G_last, decay = _load_chunk(
            q, k, v, g, bos + (n_chunks - 1 - i) * BT, eos, i_g, i_h, o_t, o_k, o_v, GROUPS, HEADS, N, P, BT
        )
        b_do = tl.load(do + _value_offsets(rows, i_h, o_v, HEADS, P), mask=_value_mask(m_t, o_v, P), other=0.0)
        to_end = tl.exp(G_last - b_G)[:, None]
        scores = _mm(b_q, tl.trans(b_k), PRECISION) * decay  # [query t, key s]
        b_dv = _mm(tl.trans(scores).to(b_do.dtype), b_do, PRECISION) + to_end * _mm(b_k, dh.to(b_k.dtype), PRECISION)
        tl.store(
            dv + _value_offsets(rows, i_h, o_v, HEADS, P), b_dv.to(dv.dtype.element_ty), mask=_value_mask(m_t, o_v, P)
        )
        weights = _mm(b_do, tl.trans(b_v), PRECISION) * decay
        b_dk = _mm(tl.trans(weights).to(b_q.dtype), b_q, PRECISION)
        b_dk += to_end * _mm(b_v, tl.trans(dh).to(b_v.dtype), PRECISION)
        _store_partial(dk_part, b_dk, rows, m_t, i_h, o_k, TOKENS, HEADS, N)
        b_qd = (b_q * tl.exp(b_G)[:, None]).to(b_do.dtype)
        dh = dh * tl.exp(G_last) + _mm(tl.trans(b_qd), b_do, PRECISION)


def _blocks(state_size: int, head_dim: int) -> tuple[int, int]:
    """(BK, BV): the whole state dim in one block, value columns in blocks of at most ``VALUE_BLOCK``."""
    bk = max(MIN_DOT, triton.next_power_of_2(state_size))
    bv = max(MIN_DOT, min(VALUE_BLOCK, triton.next_power_of_2(head_dim)))
    return bk, bv


def _precision(v: torch.Tensor) -> str:
    """fp32 callers (references, tests) get fp32 products; TF32 would cost them ~1e-3. bf16 ignores it."""
    return "ieee" if v.dtype == torch.float32 else "tf32"


def _reverse_cumsum_in_documents(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``out_t = sum_{r >= t, r in t's document} values_r`` for ``values [T, H]`` over flattened documents."""
    suffix = values.flip(0).cumsum(0).flip(0)
    suffix = torch.cat([suffix, suffix.new_zeros(1, values.shape[1])])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    after_document = torch.repeat_interleave(cu_seqlens[1:].long(), lengths.long())
    return suffix[:-1] - suffix[after_document]


class SSDScan(torch.autograd.Function):
    """``y [T, H, P]`` from ``q``/``k [T, G, N]``, ``v [T, H, P]``, log decay ``g [T, H]`` (fp32), ``cu_seqlens``."""

    @staticmethod
    def forward(ctx, q, k, v, g, cu_seqlens, chunk_tokens, backward_chunk_tokens):  # type: ignore[override]
        heads, head_dim = v.shape[1:]
        groups, state_size = q.shape[1], q.shape[2]
        bk, bv = _blocks(state_size, head_dim)
        n_docs = cu_seqlens.numel() - 1
        grid = (n_docs, heads, triton.cdiv(head_dim, bv))
        y = torch.empty_like(v)
        _ssd_fwd_kernel[grid](
            q,
            k,
            v,
            g,
            y,
            cu_seqlens,
            groups,
            heads,
            heads // groups,
            state_size,
            head_dim,
            BT=chunk_tokens,
            BK=bk,
            BV=bv,
            PRECISION=_precision(v),
            num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(q, k, v, g, cu_seqlens)
        ctx.chunk_tokens = backward_chunk_tokens
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        q, k, v, g, cu_seqlens = ctx.saved_tensors
        dy = dy.contiguous()
        tokens, heads, head_dim = v.shape
        groups, state_size = q.shape[1], q.shape[2]
        bk, bv = _blocks(state_size, head_dim)
        n_v = triton.cdiv(head_dim, bv)
        grid = (cu_seqlens.numel() - 1, heads, n_v)
        shape = dict(
            TOKENS=tokens,
            GROUPS=groups,
            HEADS=heads,
            HEADS_PER_GROUP=heads // groups,
            N=state_size,
            P=head_dim,
            BT=ctx.chunk_tokens,
            BK=bk,
            BV=bv,
            PRECISION=_precision(v),
            num_warps=NUM_WARPS,
        )
        # Per-head, per-value-block partial sums in fp32 (at the anchor's 1.2B shape 2 x 134 MB per value block,
        # freed with the layer's backward). Every token lies in one document, so the kernels write every row.
        dq_part = torch.empty(n_v, tokens, heads, state_size, device=q.device, dtype=torch.float32)
        dk_part = torch.empty_like(dq_part)
        dv = torch.empty_like(v)
        _ssd_bwd_dq_kernel[grid](q, k, v, g, dy, dq_part, cu_seqlens, **shape)
        _ssd_bwd_dkv_kernel[grid](q, k, v, g, dy, dk_part, dv, cu_seqlens, **shape)
        dq_heads = dq_part.sum(0).view(tokens, groups, heads // groups, state_size)
        dk_heads = dk_part.sum(0).view(tokens, groups, heads // groups, state_size)
        d_cum = (q.float()[:, :, None] * dq_heads).sum(-1) - (k.float()[:, :, None] * dk_heads).sum(-1)
        dg = _reverse_cumsum_in_documents(d_cum.view(tokens, heads), cu_seqlens)
        return dq_heads.sum(2).to(q.dtype), dk_heads.sum(2).to(k.dtype), dv, dg, None, None, None


def ssd_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
    backward_chunk_tokens: int = BACKWARD_CHUNK_TOKENS,
) -> torch.Tensor:
    """Differentiable SSD scan of flattened packed documents (see the module docstring for the formula).

    ``q``/``k [T, G, N]`` (``C``/``B``), ``v [T, H, P]`` (``dt * x``), ``g [T, H]`` (``dt * A``, cast to fp32),
    ``cu_seqlens [docs + 1]`` increasing from 0 to ``T`` (every token in one document, none empty). ``H`` must be
    a multiple of ``G``.
    """
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape[1] % q.shape[1]:
        raise ValueError(f"heads ({v.shape[1]}) must be a multiple of groups ({q.shape[1]})")
    for tokens in (chunk_tokens, backward_chunk_tokens):
        if tokens < MIN_DOT or tokens & (tokens - 1):
            raise ValueError(f"chunk lengths must be powers of two >= {MIN_DOT}, got {tokens}")
    return SSDScan.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g.float().contiguous(),
        cu_seqlens.to(device=v.device, dtype=torch.int32).contiguous(),
        chunk_tokens,
        backward_chunk_tokens,
    )


def cu_seqlens_from_seq_idx(
    seq_idx: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Document offsets over the flattened ``[batch * seq_len]`` tokens: every row start and every id change.

    Without ``seq_idx`` every row is one document. (``nonzero`` syncs with the host: the grid needs the count.)
    """
    if seq_idx is None:
        return torch.arange(0, (batch + 1) * seq_len, seq_len, device=device, dtype=torch.int32)
    starts = document_starts(seq_idx.to(device))
    starts[:, 0] = True
    offsets = starts.flatten().nonzero().squeeze(1)
    return torch.cat([offsets, offsets.new_tensor([batch * seq_len])]).to(torch.int32)


def ssd_chunk_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Mamba2 scan of :func:`.ssd.ssd_chunk_scan` (same arguments and result, no initial or
    final states) on these kernels: ``x [b, S, h, p]``, ``dt [b, S, h]``, ``A [h]``, ``B``/``C [b, S, g, n]``.

    ``dt``, the decay and the epilogue are computed in fp32; ``dt * x``, ``B`` and ``C`` enter the kernels in
    ``x``'s dtype (bf16 in training, as in mamba_ssm's kernels).
    """
    batch, seq_len, heads, head_dim = x.shape
    tokens = batch * seq_len
    dt = discretized_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)
    v = (x.float() * dt[..., None]).to(x.dtype).reshape(tokens, heads, head_dim)
    g = (dt * A.float()).reshape(tokens, heads)
    q = C.to(x.dtype).reshape(tokens, *C.shape[2:])
    k = B.to(x.dtype).reshape(tokens, *B.shape[2:])
    cu_seqlens = cu_seqlens_from_seq_idx(seq_idx, batch, seq_len, x.device)
    y = ssd_scan(q, k, v, g, cu_seqlens).view(batch, seq_len, heads, head_dim)
    return skip_and_gate(y, x, D, z)  # in fp32, back to x.dtype
