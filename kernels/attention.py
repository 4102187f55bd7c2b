"""Flash attention (FlashAttention-2 schedule) in Triton: forward with an online softmax in base 2 that saves the
logsumexp, backward as a dK/dV kernel (one program per key block and KV head, looping over the query heads of its
GQA group: no atomics, no repeated K/V) and a dQ kernel. Masks are read tile by tile through their strides.
Contract (shapes, lse, dropout counters): fastattn/ops/attention/dispatch.py. With VARLEN the same kernels run packed
variable-length sequences (fastattn/ops/attention/varlen.py): batch b's rows start at CuQ[b] / CuK[b] of the packed
q / k, v; L and S are then the longest sequence's lengths, the padded geometry of lse and the dropout counters."""
import dataclasses
import os

import torch
import triton
import triton.language as tl

from . import INTERPRETED, next_pow2
from .dropout import philox_keep, philox_words
from .softcap import tanh_sech2

LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in base 2 (exp2): x * LOG2E
LN2 = tl.constexpr(0.6931471805599453)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _scores(q, kT, offs_m, offs_n, L, S,
            Mask, stride_mm, stride_mn,  # this (batch, head)'s mask, or a dummy
            slope,  # this head's ALiBi slope (unused without HAS_ALIBI)
            sm_scale, softcap, diag_offset, window_left, window_right,
            MASKED: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of a (BLOCK_M, BLOCK_N) tile in base 2, -inf where masked; also the softcap's derivative factor
    1 - tanh(x / softcap)^2 for the backward (without SOFTCAP: the scores, unused)."""
    s = tl.dot(q, kT, input_precision=PRECISION)
    if SOFTCAP:
        capped, dcap = tanh_sech2(s * (sm_scale / softcap))
        s = capped * (softcap * LOG2E)
    else:
        dcap = s
        s = s * (sm_scale * LOG2E)
    if HAS_ALIBI:
        dist = tl.abs(offs_m[:, None] + diag_offset - offs_n[None, :]).to(tl.float32)
        s = s - (slope * LOG2E) * dist
    if MASK_KIND != 0:
        in_bounds = (offs_m[:, None] < L) & (offs_n[None, :] < S)
        mptr = Mask + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn  # (L * S may pass 2^31)
        if MASK_KIND == 1:
            s = tl.where(tl.load(mptr, mask=in_bounds, other=0) != 0, s, float("-inf"))
        else:
            s = s + tl.load(mptr, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    if MASKED:
        keep = offs_n[None, :] < S
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] >= offs_m[:, None] + diag_offset - window_left)
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag_offset + window_right)
        s = tl.where(keep, s, float("-inf"))
    return s, dcap


@triton.jit
def _head_bias(Mask, stride_mb, stride_mh, Alibi, b, h, bh, HAS_ALIBI: tl.constexpr):
    """Head (b, h)'s mask pointer and ALiBi slope, found once per program (per head in the dK/dV kernel)."""
    Mask += b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + bh)
    return Mask, slope


@triton.jit
def _seq_bounds(CuQ, CuK, b, L, S, diag_offset, align_br, VARLEN: tl.constexpr):
    """Batch b's first query and key rows (int64), its query and key counts, and its causal diagonal: read from the
    cumulative lengths for packed sequences (bottom-right aligned per sequence when align_br), else (0, 0, L, S,
    diag_offset)."""
    q0 = 0
    k0 = 0
    Lb = L
    Sb = S
    diag = diag_offset
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        Lb = tl.load(CuQ + b + 1) - q0
        Sb = tl.load(CuK + b + 1) - k0
        diag = diag_offset + align_br * (Sb - Lb)
        q0 = q0.to(tl.int64)
        k0 = k0.to(tl.int64)
    return q0, k0, Lb, Sb, diag


@triton.jit
def _dropout_keep(seed, rng_offset, bh, offs_m, offs_n, L, S, dropout_p, DROPOUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep flags of the (offs_m, offs_n) tile at dispatch.py's counters (rows S rounded up to 4 apart). DROPOUT 2
    (a multiple-of-4 offset; offs_n starts at one): one Philox4x32 evaluation gives four keys; 1: one per key."""
    row = rng_offset + (bh.to(tl.int64) * L + offs_m[:, None]) * ((S + 3) // 4 * 4)
    if DROPOUT == 2:
        first = tl.split(tl.split(tl.reshape(offs_n, (BLOCK_N // 4, 2, 2)))[0])[0]  # offs_n[4c]: a block's first key
        return tl.reshape(philox_words(seed, (row + first[None, :]) >> 2), (BLOCK_M, BLOCK_N)) >= dropout_p
    return philox_keep(seed, row + offs_n[None, :], dropout_p)


@triton.jit
def _key_range(start_m, L, S, diag_offset, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, mid) key blocks need no element masks, [mid, hi) do (tails, the causal diagonal, windows)."""
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag_offset)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + diag_offset - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, start_m + BLOCK_M + diag_offset + window_right)
        mid = lo
    elif CAUSAL:
        mid = tl.maximum(0, tl.minimum(S, start_m + diag_offset + 1) // BLOCK_N * BLOCK_N)
    else:
        mid = S // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    mid = tl.minimum(tl.maximum(mid, lo), hi)
    return lo, mid, hi


@triton.jit
def _query_range(start_n, L, S, diag_offset, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query rows that see keys [start_n, start_n + BLOCK_N): [lo, mid) need element masks, [mid, hi) do not."""
    lo = 0
    hi = L
    if CAUSAL:
        lo = tl.maximum(0, start_n - diag_offset)
    if HAS_WINDOW:
        lo = tl.maximum(lo, start_n - diag_offset - window_right)
        hi = tl.minimum(L, start_n + BLOCK_N - 1 - diag_offset + window_left + 1)
    lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        mid = hi
    elif CAUSAL:  # rows from start_n + BLOCK_N - 1 - diag_offset on see the whole key block
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
    else:
        mid = lo
    mid = tl.where(start_n + BLOCK_N > S, hi, mid)  # the key tail block stays masked throughout
    hi = tl.maximum(hi, lo)
    mid = tl.minimum(tl.maximum(mid, lo), hi)
    return lo, mid, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q,  # running output, row sums and row maxima; the query tile
               K, V, stride_kn, stride_vn,  # this head's K and V
               offs_m, offs_d, offs_dv, start, end, bh, L, S, E, EV,  # the tile and the key range [start, end)
               RL, RS,  # the dropout counters' (padded) geometry: L, S but for packed sequences
               Mask, stride_mm, stride_mn, slope,  # this head's mask and ALiBi slope
               sm_scale, softcap, diag_offset, window_left, window_right,  # score transforms
               dropout_p, seed, rng_offset,
               MASKED: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        Kb = K + tl.cast(start_n, tl.int64) * stride_kn  # the block's first row in int64 (S * stride may pass 2^31)
        kT = tl.load(Kb + tl.arange(0, BLOCK_N)[None, :] * stride_kn + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0).to(DOT_DTYPE)
        s, _ = _scores(q, kT, offs_m, offs_n, L, S, Mask, stride_mm, stride_mn, slope,
                       sm_scale, softcap, diag_offset, window_left, window_right,
                       MASKED, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_offset, bh, offs_m, offs_n, RL, RS, dropout_p, DROPOUT, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        Vb = V + tl.cast(start_n, tl.int64) * stride_vn
        v = tl.load(Vb + tl.arange(0, BLOCK_N)[:, None] * stride_vn + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, L, E), (B, Hk, S, E), (B, Hk, S, EV); last dim contiguous
    Out,  # (B, H, L, EV)
    Lse,  # (B, H, L) float32, natural log; +inf for rows with no key
    Mask,  # (B, H, L, S) strided view (bool or float), or a dummy
    Alibi,  # (B, H) float32 slopes, or a dummy
    CuQ, CuK,  # VARLEN: (B + 1,) int32 cumulative query and key counts; else dummies
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, L, S, E, EV,
    sm_scale, softcap, diag_offset, window_left, window_right, dropout_p, seed, rng_offset, align_br,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(2), tl.program_id(1)  # heads and batch on axes of their own (each up to 65535 programs)
    bh = b * H + h
    q0, k0, Lb, Sb, diag = _seq_bounds(CuQ, CuK, b, L, S, diag_offset, align_br, VARLEN)
    if VARLEN:
        if start_m >= Lb:  # past this sequence's queries (its padded lse rows were filled by the launcher)
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # the tile's first row in int64 (a head or row may start past 2^31 elements), rows within it in int32
    b64, h64, m64 = b.to(tl.int64), h.to(tl.int64), tl.cast(q0 + start_m, tl.int64)
    rows = tl.arange(0, BLOCK_M)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm + rows[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < Lb) & (offs_d[None, :] < E), other=0.0).to(DOT_DTYPE)
    kvh64 = (h // GROUP).to(tl.int64)
    K += b64 * stride_kb + kvh64 * stride_kh + k0 * stride_kn
    V += b64 * stride_vb + kvh64 * stride_vh + k0 * stride_vn
    Mask, slope = _head_bias(Mask, stride_mb, stride_mh, Alibi, b, h, bh, HAS_ALIBI)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    lo, mid, hi = _key_range(start_m, Lb, Sb, diag, window_left, window_right, BLOCK_M, BLOCK_N, CAUSAL,
                             HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q,
                               K, V, stride_kn, stride_vn,
                               offs_m, offs_d, offs_dv, lo, mid, bh, Lb, Sb, E, EV, L, S,
                               Mask, stride_mm, stride_mn, slope,
                               sm_scale, softcap, diag, window_left, window_right,
                               dropout_p, seed, rng_offset,
                               False, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT,
                               DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q,
                               K, V, stride_kn, stride_vn,
                               offs_m, offs_d, offs_dv, mid, hi, bh, Lb, Sb, E, EV, L, S,
                               Mask, stride_mm, stride_mn, slope,
                               sm_scale, softcap, diag, window_left, window_right,
                               dropout_p, seed, rng_offset,
                               True, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT,
                               DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(empty, float("inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < Lb)
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + m64 * stride_om + rows[:, None] * stride_om + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lb) & (offs_dv[None, :] < EV))


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut,  # (B, H, L, EV), through their strides
    Delta,  # (B, H, L) float32, contiguous: rowsum(dout * out)
    CuQ,  # VARLEN: (B + 1,) int32 cumulative query counts; else a dummy
    stride_ob, stride_oh, stride_om, stride_gb, stride_gh, stride_gm,
    H, L, EV,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    bh = b * H + h
    q0, _, Lb, _, _ = _seq_bounds(CuQ, CuQ, b, L, L, 0, 0, VARLEN)
    offs_d = tl.arange(0, BLOCK_DV)
    o = _load_rows(Out + b * stride_ob + h * stride_oh + q0 * stride_om, offs_m, Lb, stride_om, EV, offs_d,
                   tl.float32)
    do = _load_rows(DOut + b * stride_gb + h * stride_gh + q0 * stride_gm, offs_m, Lb, stride_gm, EV, offs_d,
                    tl.float32)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < Lb)


@triton.jit
def _load_rows(X, offs, n_rows, stride, width, offs_d, DOT_DTYPE: tl.constexpr):
    """Rows offs (those < n_rows) of a (.., width) matrix at X whose rows are ``stride`` apart, zero-padded to the
    tile, as DOT_DTYPE."""
    mask = (offs[:, None] < n_rows) & (offs_d[None, :] < width)
    return tl.load(X + offs[:, None].to(tl.int64) * stride + offs_d[None, :], mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _load_q_side(Q, DOut, Lse, Delta, bh, offs_m, offs_d, offs_dv, L, E, EV, RL, stride_qm, stride_gm,
                 DOT_DTYPE: tl.constexpr):
    """A query block's q, dout (Q, DOut: this head's rows), logsumexp (base 2; +inf past L) and delta (lse and delta
    rows RL apart)."""
    q = _load_rows(Q, offs_m, L, stride_qm, E, offs_d, DOT_DTYPE)
    do = _load_rows(DOut, offs_m, L, stride_gm, EV, offs_dv, DOT_DTYPE)
    q_row = bh.to(tl.int64) * RL + offs_m
    lse = tl.load(Lse + q_row, mask=offs_m < L, other=float("inf")) * LOG2E
    delta = tl.load(Delta + q_row, mask=offs_m < L, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_tile(q, k, v, do, lse, delta,  # the query side's tiles and the key side's
              offs_m, offs_n, bh, L, S, RL, RS,
              Mask, stride_mm, stride_mn, slope,  # this head's mask and ALiBi slope
              sm_scale, softcap, diag_offset, window_left, window_right,  # score transforms
              dropout_p, seed, rng_offset,
              MASKED: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of the backward: P as the forward applied it to V (dropout included) and dS.
    P is 0 where masked, for rows past L and for empty rows (their lse is +inf)."""
    s, dcap = _scores(q, tl.trans(k), offs_m, offs_n, L, S, Mask, stride_mm, stride_mn, slope,
                      sm_scale, softcap, diag_offset, window_left, window_right,
                      MASKED, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, PRECISION)
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, rng_offset, bh, offs_m, offs_n, RL, RS, dropout_p, DROPOUT, BLOCK_M, BLOCK_N)
        pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * dcap
    return pd, ds


@triton.jit
def _dkdv_inner(dk, dv, k, v,  # running dK, dV; the key block
                Q, DOut, Lse, Delta,  # the query side (Q, DOut: this head's rows), read one block at a time
                offs_n, offs_d, offs_dv, start, end, bh, L, S, E, EV,  # the block and the query range [start, end)
                RL, RS, stride_qm, stride_gm,
                Mask, stride_mm, stride_mn, slope,  # this head's mask and ALiBi slope
                sm_scale, softcap, diag_offset, window_left, window_right,  # score transforms
                dropout_p, seed, rng_offset,
                MASKED: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _load_q_side(Q, DOut, Lse, Delta, bh, offs_m, offs_d, offs_dv, L, E, EV, RL, stride_qm,
                                         stride_gm, DOT_DTYPE)
        pd, ds = _bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, bh, L, S, RL, RS,
                           Mask, stride_mm, stride_mn, slope,
                           sm_scale, softcap, diag_offset, window_left, window_right,
                           dropout_p, seed, rng_offset,
                           MASKED, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT, PRECISION,
                           BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(pd.to(DOT_DTYPE)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut,  # (B, H, L, E), (B, Hk, S, E), (B, Hk, S, EV), (B, H, L, EV) through their strides
    Lse, Delta,  # (B, H, L) float32, contiguous
    DK, DV,  # (B, Hk, S, E), (B, Hk, S, EV) through their strides
    Mask, Alibi, CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Hk, GROUP, L, S, E, EV,
    sm_scale, softcap, diag_offset, window_left, window_right, dropout_p, seed, rng_offset, align_br,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    b, hk = tl.program_id(2), tl.program_id(1)
    q0, k0, Lb, Sb, diag = _seq_bounds(CuQ, CuK, b, L, S, diag_offset, align_br, VARLEN)
    if VARLEN:
        if start_n >= Sb:  # past this sequence's keys
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    K += k0 * stride_kn
    V += k0 * stride_vn
    DK += k0 * stride_dkn
    DV += k0 * stride_dvn
    Q += q0 * stride_qm
    DOut += q0 * stride_gm
    k = _load_rows(K + b64 * stride_kb + hk64 * stride_kh, offs_n, Sb, stride_kn, E, offs_d, DOT_DTYPE)
    v = _load_rows(V + b64 * stride_vb + hk64 * stride_vh, offs_n, Sb, stride_vn, EV, offs_dv, DOT_DTYPE)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    lo, mid, hi = _query_range(start_n, Lb, Sb, diag, window_left, window_right, BLOCK_M, BLOCK_N, CAUSAL,
                               HAS_WINDOW)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        HeadMask, slope = _head_bias(Mask, stride_mb, stride_mh, Alibi, b, h, bh, HAS_ALIBI)
        Qh = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DOut + b64 * stride_gb + h.to(tl.int64) * stride_gh
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lse, Delta,
                             offs_n, offs_d, offs_dv, lo, mid, bh, Lb, Sb, E, EV, L, S, stride_qm, stride_gm,
                             HeadMask, stride_mm, stride_mn, slope,
                             sm_scale, softcap, diag, window_left, window_right,
                             dropout_p, seed, rng_offset,
                             True, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT,
                             DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lse, Delta,
                             offs_n, offs_d, offs_dv, mid, hi, bh, Lb, Sb, E, EV, L, S, stride_qm, stride_gm,
                             HeadMask, stride_mm, stride_mn, slope,
                             sm_scale, softcap, diag, window_left, window_right,
                             dropout_p, seed, rng_offset,
                             False, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT,
                             DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
    dk = dk * sm_scale
    rows = offs_n[:, None].to(tl.int64)
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + rows * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < Sb) & (offs_d[None, :] < E))
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + rows * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < Sb) & (offs_dv[None, :] < EV))


@triton.jit
def _dq_inner(dq, q, do, lse, delta,  # running dQ; the query block's tiles
              K, V,  # this head's K and V, read one block at a time
              offs_m, offs_d, offs_dv, start, end, bh, L, S, E, EV,  # the block and the key range [start, end)
              RL, RS, stride_kn, stride_vn,
              Mask, stride_mm, stride_mn, slope,  # this head's mask and ALiBi slope
              sm_scale, softcap, diag_offset, window_left, window_right,  # score transforms
              dropout_p, seed, rng_offset,
              MASKED: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, S, stride_kn, E, offs_d, DOT_DTYPE)
        v = _load_rows(V, offs_n, S, stride_vn, EV, offs_dv, DOT_DTYPE)
        _, ds = _bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, bh, L, S, RL, RS,
                          Mask, stride_mm, stride_mn, slope,
                          sm_scale, softcap, diag_offset, window_left, window_right,
                          dropout_p, seed, rng_offset,
                          MASKED, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT, PRECISION,
                          BLOCK_M, BLOCK_N)
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut,  # through their strides, as in the dK/dV kernel
    Lse, Delta,
    DQ,  # (B, H, L, E) through its strides
    Mask, Alibi, CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm, stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Hk, GROUP, L, S, E, EV,
    sm_scale, softcap, diag_offset, window_left, window_right, dropout_p, seed, rng_offset, align_br,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(2), tl.program_id(1)  # heads and batch on axes of their own (each up to 65535 programs)
    bh = b * H + h
    q0, k0, Lb, Sb, diag = _seq_bounds(CuQ, CuK, b, L, S, diag_offset, align_br, VARLEN)
    if VARLEN:
        if start_m >= Lb:  # past this sequence's queries
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)
    Q += q0 * stride_qm
    DOut += q0 * stride_gm
    DQ += q0 * stride_dqm
    q, do, lse, delta = _load_q_side(Q + b64 * stride_qb + h64 * stride_qh, DOut + b64 * stride_gb + h64 * stride_gh,
                                     Lse, Delta, bh, offs_m, offs_d, offs_dv, Lb, E, EV, L, stride_qm, stride_gm,
                                     DOT_DTYPE)
    K += b64 * stride_kb + hk64 * stride_kh + k0 * stride_kn
    V += b64 * stride_vb + hk64 * stride_vh + k0 * stride_vn
    Mask, slope = _head_bias(Mask, stride_mb, stride_mh, Alibi, b, h, bh, HAS_ALIBI)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, mid, hi = _key_range(start_m, Lb, Sb, diag, window_left, window_right, BLOCK_M, BLOCK_N, CAUSAL,
                             HAS_WINDOW)
    dq = _dq_inner(dq, q, do, lse, delta, K, V,
                   offs_m, offs_d, offs_dv, lo, mid, bh, Lb, Sb, E, EV, L, S, stride_kn, stride_vn,
                   Mask, stride_mm, stride_mn, slope,
                   sm_scale, softcap, diag, window_left, window_right,
                   dropout_p, seed, rng_offset,
                   False, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT,
                   DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, K, V,
                   offs_m, offs_d, offs_dv, mid, hi, bh, Lb, Sb, E, EV, L, S, stride_kn, stride_vn,
                   Mask, stride_mm, stride_mn, slope,
                   sm_scale, softcap, diag, window_left, window_right,
                   dropout_p, seed, rng_offset,
                   True, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, DROPOUT,
                   DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lb) & (offs_d[None, :] < E))


@triton.jit
def _dropout_mask_kernel(Keep, bh0, L, S, dropout_p, seed, rng_offset, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """The keep mask the attention kernels draw: (B, H, L, S), (batch, head) pairs from bh0 on axis 2."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = bh0 + tl.program_id(2)
    keep = _dropout_keep(seed, rng_offset, bh, offs_m, offs_n, L, S, dropout_p, DROPOUT, BLOCK_M, BLOCK_N)
    off = (bh.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :]
    tl.store(Keep + off, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ---- launchers ----------------------------------------------------------------------------------------------
def _head_block(d: int) -> int:
    return max(16, next_pow2(d))


def _dropout_mode(p) -> int:
    """0: no dropout; 2: an offset that is a multiple of 4 (the API's), four keys a Philox evaluation; 1: any other."""
    return 0 if p.dropout_p == 0 else 2 if p.offset % 4 == 0 else 1


def _common(q, k, v, mask, alibi, p, varlen=None):
    """Kernel arguments shared by the forward and the backward kernels. varlen: None, or (cu_q, cu_k, align_br,
    max_q, max_k) for packed sequences, q, k, v then being views with batch stride 0 (_packed_view) and (L, S) the
    longest sequence's (max_q, max_k)."""
    B, H, L, E = q.shape
    Hk, S, EV = k.shape[1], k.shape[2], v.shape[-1]
    if varlen is not None:
        L, S = varlen[3], varlen[4]
    big = L + S + 1  # an unbounded window side, as a bound that never binds
    has_window = (p.window_left, p.window_right) != (-1, -1)
    if mask is None:
        mask_kind, mask_arg, mstrides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
        mask_arg, mstrides = mask, mask.stride()
        if mask_kind == MASK_BOOL:
            mask_arg = mask.view(torch.uint8)  # same strides, stride-0 broadcasts included
            mstrides = mask_arg.stride()
    if q.dtype == torch.float32 or INTERPRETED:  # the interpreter's bf16 dot is broken: compute in fp32 there
        dot_dtype, precision = tl.float32, "ieee"
    else:
        dot_dtype, precision = (tl.float16 if q.dtype == torch.float16 else tl.bfloat16), "tf32"
    cu_q, cu_k, align_br = varlen[:3] if varlen is not None else (q, q, 0)
    scalars = (p.scale, p.softcap if p.softcap > 0 else 1.0, p.diag_offset,
               p.window_left if p.window_left >= 0 else big, p.window_right if p.window_right >= 0 else big,
               p.dropout_p, p.seed, p.offset, int(align_br))
    flags = dict(MASK_KIND=mask_kind, CAUSAL=p.causal, HAS_WINDOW=has_window, HAS_ALIBI=alibi is not None,
                 SOFTCAP=p.softcap > 0, DROPOUT=_dropout_mode(p), DOT_DTYPE=dot_dtype, PRECISION=precision,
                 VARLEN=varlen is not None, BLOCK_D=_head_block(E), BLOCK_DV=_head_block(EV))
    alibi_arg = q if alibi is None else alibi
    # with CAUSAL: what the autotuner keys on (_launch)
    key = (E, EV, q.dtype, mask_arg.dtype, alibi_arg.dtype, varlen is not None)
    return (B, H, Hk, L, S, E, EV), mask_arg, mstrides, alibi_arg, (cu_q, cu_k), scalars, flags, key


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel and head-dim class (<= 64, <= 128, <= 256);
# autotuned on GPU (FASTATTN_AUTOTUNE=0 keeps the first), one config in the interpreter. The backward's 128-wide
# tiles are FA2's and the Triton tutorial's shapes (why: benchmarks/results/2026-11-26-h100-run3).
_CONFIGS = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3)],
            128: [(128, 64, 8, 3), (128, 128, 8, 2)],
            256: [(64, 32, 8, 2), (64, 64, 8, 1)]},
    # head dims <= 64 without (32, 128, 4, 3): on an H100 (Triton 3.6, run 4) it gave dK off by 0.2 under a causal
    # mask, forced or autotuned, where the other tiles and the same tile at 128 were exact
    "dkdv": {64: [(64, 64, 4, 2), (64, 128, 8, 2)],
             128: [(32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 4, 3), (64, 128, 8, 2)],
             256: [(32, 32, 8, 1), (16, 32, 4, 1)]},
    "dq": {64: [(128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
           128: [(64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2)],
           256: [(32, 32, 8, 1), (32, 16, 4, 1)]},
}


def _dim_class(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _tuned(kernel, which: str):
    """kernel autotuned over _CONFIGS[which] for its head-dim class (keyed on the head dims and causality)."""
    if INTERPRETED:
        return kernel
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for cls, group in _CONFIGS[which].items() for (m, n, w, st) in group]
    classes = [cls for cls, group in _CONFIGS[which].items() for _ in group]
    first_only = os.environ.get("FASTATTN_AUTOTUNE", "1") == "0"

    def prune(configs_, named_args, **kwargs):
        cls = _dim_class(max(named_args["E"], named_args["EV"]))
        keep = [c for c, k in zip(configs, classes) if k == cls]
        return keep[:1] if first_only else keep

    return triton.autotune(configs, key=["E", "EV", "CAUSAL"], prune_configs_by={"early_config_prune": prune})(kernel)


_KERNELS = {"fwd": (_attn_fwd_kernel, _tuned(_attn_fwd_kernel, "fwd")),
            "dkdv": (_attn_bwd_dkdv_kernel, _tuned(_attn_bwd_dkdv_kernel, "dkdv")),
            "dq": (_attn_bwd_dq_kernel, _tuned(_attn_bwd_dq_kernel, "dq"))}
_INTERPRETER_CONFIG = (32, 32, 4, 1)
# kernel name -> (BLOCK_M, BLOCK_N, num_warps, num_stages) launched instead of the autotuner's pick: tests run every
# GPU candidate through it (the autotuner would only ever run the one it picks).
FORCED_CONFIG = {}
# (kernel name, autotune key) -> the config the autotuner picked, launched directly from then on: the autotuner's
# own dispatch (its key over every argument, the config's kwargs merged) cost ~20 us of host time a launch on an
# H100 host (run 4), where the kernels are tens of microseconds
PICKED = {}


def _launch(which: str, grid, *args, key, **kwargs):
    """Launch kernel ``which``: the forced config, the interpreter's, the autotuner's pick for this key once it has
    made one, else the autotuner. key: what the autotuner's own key tells apart besides CAUSAL (E, EV and the tensor
    arguments' dtypes: _common's (E, EV, q's, the mask argument's, the ALiBi argument's), the rest being q's or
    float32)."""
    raw, tuned = _KERNELS[which]
    config = FORCED_CONFIG.get(which) or (_INTERPRETER_CONFIG if INTERPRETED else None)
    if config is None:
        key = (which, kwargs["CAUSAL"], *key)
        config = PICKED.get(key)
        if config is None:
            out = tuned[grid](*args, **kwargs)
            best = getattr(tuned, "best_config", None)  # set by the run above (Triton >= 2.1)
            if best is not None and best.pre_hook is None:
                PICKED[key] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
            return out
    m, n, w, st = config
    return raw[grid](*args, **kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)


def _empty_in_order_of(t, shape, dtype):
    """An empty tensor of the 4-D ``shape`` laid out in t's dimension order, its last dim last: out for a (B, H, L, E)
    view of a (B, L, H, E) projection is (B, L, H, EV) in memory, so the caller's way back to (B, L, H * EV) is a view
    rather than a copy (the CPU backend does the same)."""
    s0, s1, s2, _ = t.stride()
    if s0 >= s1 >= s2:  # t's own order: (B, H, L, E)
        return torch.empty(shape, dtype=dtype, device=t.device)
    order = sorted(range(3), key=lambda d: -t.stride(d)) + [3]
    return torch.empty([shape[d] for d in order], dtype=dtype, device=t.device).permute(
        *[order.index(d) for d in range(4)])


def attention_fwd(q, k, v, mask, alibi, p):
    """q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, EV), last dims contiguous -> out (laid out in q's dimension
    order), lse (see the contract)."""
    B, H, L, _ = q.shape
    out = _empty_in_order_of(q, (B, H, L, v.shape[-1]), q.dtype)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or L == 0:
        return out.zero_(), lse.fill_(float("inf"))
    _fwd(q, k, v, out, lse, mask, alibi, p, None)
    return out, lse


GRID_Z = 65535  # a CUDA grid's most blocks on axis z, where the attention kernels put the batch


def _batch_chunks(q, k, p, varlen):
    """For a batch past GRID_Z: (index, params, varlen) of each launch of at most GRID_Z batches, the dropout offset
    moved past the earlier batches' counters (_dropout_keep's (b * H + h, row) layout) so each draws what one launch
    would; else None."""
    B, H = q.shape[:2]
    grid_z = GRID_Z
    if B <= grid_z:
        return None
    L, S = (q.shape[2], k.shape[2]) if varlen is None else varlen[3:5]
    per_batch = H * L * ((S + 3) // 4 * 4)
    chunks = []
    for b0 in range(0, B, grid_z):
        b1 = min(B, b0 + grid_z)
        vl = None if varlen is None else (varlen[0][b0:b1 + 1], varlen[1][b0:b1 + 1], *varlen[2:])
        chunks.append((slice(b0, b1), dataclasses.replace(p, offset=p.offset + b0 * per_batch), vl))
    return chunks


def _cut(t, i):
    return None if t is None else t[i]


def _fwd(q, k, v, out, lse, mask, alibi, p, varlen):
    chunks = _batch_chunks(q, k, p, varlen)
    if chunks is not None:
        for i, pc, vl in chunks:
            _fwd(q[i], k[i], v[i], out[i], lse[i], _cut(mask, i), _cut(alibi, i), pc, vl)
        return
    (B, H, Hk, L, S, E, EV), mask_arg, ms, alibi_arg, cu, scalars, flags, key = _common(q, k, v, mask, alibi, p,
                                                                                        varlen)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), H, B)  # noqa: E731
    _launch(
        "fwd", grid, q, k, v, out, lse, mask_arg, alibi_arg, *cu,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *ms,
        H, H // Hk, L, S, E, EV, *scalars, key=key, **flags)


def attention_bwd(dout, q, k, v, out, lse, mask, alibi, p, into=None):
    """Gradients of the forward above: dq (B, H, L, E), dk (B, Hk, S, E), dv (B, Hk, S, EV), each in its input's
    dimension order, or written into ``into`` = (dq, dk, dv) (views with a unit last stride) when given."""
    B, H, L, E = q.shape
    Hk, S, EV = k.shape[1], k.shape[2], v.shape[-1]
    # read through their strides (no copies of views of a packed projection)
    if into is not None:
        dq, dk, dv = into
    else:
        dq = _empty_in_order_of(q, (B, H, L, E), q.dtype)
        dk, dv = _empty_in_order_of(k, (B, Hk, S, E), k.dtype), _empty_in_order_of(v, (B, Hk, S, EV), v.dtype)
    if L == 0 or S == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(dout, q, k, v, out, lse.contiguous(), mask, alibi, p, (dq, dk, dv), None)
    return dq, dk, dv


def _bwd(dout, q, k, v, out, lse, mask, alibi, p, grads, varlen):
    chunks = _batch_chunks(q, k, p, varlen)
    if chunks is not None:
        for i, pc, vl in chunks:
            _bwd(dout[i], q[i], k[i], v[i], out[i], lse[i], _cut(mask, i), _cut(alibi, i), pc,
                 tuple(g[i] for g in grads), vl)
        return
    (B, H, Hk, L, S, E, EV), mask_arg, ms, alibi_arg, cu, scalars, flags, key = _common(q, k, v, mask, alibi, p,
                                                                                        varlen)
    dq, dk, dv = grads
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    pre_m = 64 if not INTERPRETED else 32
    _attn_bwd_preprocess[(triton.cdiv(L, pre_m), H, B)](out, dout, delta, cu[0], *out.stride()[:3],
                                                        *dout.stride()[:3], H, L, EV, VARLEN=flags["VARLEN"],
                                                        BLOCK_M=pre_m, BLOCK_DV=flags["BLOCK_DV"])
    args = (q, k, v, dout, lse, delta)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    tail = (*ms, H, Hk, H // Hk, L, S, E, EV, *scalars)
    dkdv_grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), Hk, B)  # noqa: E731
    dq_grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), H, B)  # noqa: E731
    _launch("dkdv", dkdv_grid, *args, dk, dv, mask_arg, alibi_arg, *cu, *strides, *dk.stride()[:3],
            *dv.stride()[:3], *tail, key=key, **flags)
    _launch("dq", dq_grid, *args, dq, mask_arg, alibi_arg, *cu, *strides, *dq.stride()[:3], *tail, key=key,
            **flags)


# ---- packed variable-length sequences (fastattn/ops/attention/varlen.py states the contract) -----------------
def _packed_view(t, batch: int):
    """A packed (T, heads, D) tensor as the (batch, heads, T, D) view the kernels index with VARLEN: batch stride 0,
    each batch's rows offset by its cumulative length inside the kernel."""
    return t.as_strided((batch, t.shape[1], t.shape[0], t.shape[2]), (0, t.stride(1), t.stride(0), t.stride(2)))


def attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p, bottom_right):
    """q (Tq, H, E), k (Tk, Hk, E), v (Tk, Hk, EV), cu_q / cu_k (B + 1,) int32 -> out (Tq, H, EV), lse (B, H, max_q)
    float32 (+inf past each sequence's queries)."""
    B = cu_q.shape[0] - 1
    out = torch.empty((q.shape[0], q.shape[1], v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.full((B, q.shape[1], max_q), float("inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or B == 0 or max_q == 0:
        return out.zero_(), lse
    if max_k == 0 or k.shape[1] == 0:
        return out.zero_(), lse
    _fwd(*(_packed_view(t, B) for t in (q, k, v, out)), lse, None, alibi, p, (cu_q, cu_k, bottom_right, max_q, max_k))
    return out, lse


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, p, bottom_right):
    """Gradients of attention_varlen_fwd: dq, dk, dv packed like q, k, v."""
    B = cu_q.shape[0] - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or max_q == 0 or max_k == 0 or q.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    views = [_packed_view(t, B) for t in (dout, q, k, v, out)]
    grads = [_packed_view(t, B) for t in (dq, dk, dv)]
    _bwd(*views, lse.contiguous(), None, alibi, p, grads, (cu_q, cu_k, bottom_right, max_q, max_k))
    return dq, dk, dv


def dropout_mask(p, B, H, L, S, device, grid_z=GRID_Z):
    """The (B, H, L, S) keep mask the kernels above draw for these parameters (returned attention weights, double
    backward, tests): (batch, head) pairs in launches of at most grid_z (a CUDA grid's limit on axis z)."""
    keep = torch.empty((B, H, L, S), dtype=torch.int8, device=device)
    for bh0 in range(0, B * H, grid_z):
        _dropout_mask_kernel[(triton.cdiv(L, 32), triton.cdiv(S, 32), min(grid_z, B * H - bh0))](
            keep, bh0, L, S, p.dropout_p, p.seed, p.offset, DROPOUT=_dropout_mode(p), BLOCK_M=32, BLOCK_N=32)
    return keep.bool()
