"""Split-KV decode attention (flash-decoding) in Triton: a split kernel, one program per (split of a sequence's keys,
batch and kv head, block of query rows; all on grid axis 0, which CUDA does not cap at 65535 programs), holds the
G * L query rows of its kv head's GQA group (G query heads x L queries: one pass over K/V for the whole group) and
runs an online softmax in base 2 over its keys; a combine kernel merges the splits of each row by their logsumexps.
Keys past a sequence's length are never loaded, nor the V rows of masked keys. Contract:
fastattn/ops/attention/decode.py."""
import torch
import triton
import triton.language as tl

from . import INTERPRETED, next_pow2, sm_count
from .softcap import tanh

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _decode_split_kernel(
    Q, stride_qb, stride_qh, stride_ql,  # (B, H, L, E), unit last stride
    K, stride_kb, stride_kh, stride_ks,  # (B, Hk, S, E)
    V, stride_vb, stride_vh, stride_vs,  # (B, Hk, S, Ev)
    Seqlens,  # (B,) int32 keys per sequence (unused without HAS_LENS)
    Keep, stride_keepb, stride_keeps,  # (B, S) bool, True = the key takes part (unused without HAS_KEEP)
    PartO,  # (B * Hk, NSPLIT, M, Ev) float32: each split's normalised output (unused when DIRECT)
    PartLse,  # (B * Hk, NSPLIT, M) float32: each split's base-2 logsumexp, -inf when it saw no key
    Out,  # (B, H, L, Ev) contiguous: written directly when DIRECT (one split)
    Lse,  # (B, H, L) float32 natural-log logsumexp, +inf for a row with no key (DIRECT)
    H, Hk, L, S, E, EV, M,  # M = (H // Hk) * L query rows per kv head
    sm_scale, softcap,
    NSPLIT: tl.constexpr, HAS_LENS: tl.constexpr, HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)  # ((b * Hk + kv head) * row blocks + row block) * NSPLIT + split
    split = pid % NSPLIT
    row_blocks = tl.cdiv(M, BLOCK_M)
    bk = pid // NSPLIT // row_blocks  # b * Hk + kv head
    b = bk // Hk
    kvh = bk % Hk
    G = H // Hk
    offs_m = (pid // NSPLIT % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r = g * L + i
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < M
    head = kvh * G + offs_m // L
    qi = offs_m % L
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh + qi[:, None] * stride_ql
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if HAS_LENS:
        seqlen = tl.minimum(tl.maximum(tl.load(Seqlens + b), 0), S)
    else:
        seqlen = S
    # this split's keys: an equal share of the sequence's, in whole blocks
    chunk = tl.cdiv(tl.cdiv(seqlen, NSPLIT), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * chunk, seqlen)
    hi = tl.minimum(lo + chunk, seqlen)
    last = qi + seqlen - L  # query i sees keys j <= i + len - L (bottom-right)
    K += b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    Keep += b.to(tl.int64) * stride_keepb
    qk_scale = sm_scale / softcap if SOFTCAP else sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s64 = tl.cast(start, tl.int64)  # the block's first key in int64 (S * stride may pass 2^31)
        in_len = offs_n < hi
        key_ok = in_len
        if HAS_KEEP:
            key_ok = key_ok & (tl.load(Keep + s64 * stride_keeps + tl.arange(0, BLOCK_N) * stride_keeps, mask=in_len,
                                       other=0) != 0)
        k = tl.load(K + s64 * stride_ks + tl.arange(0, BLOCK_N)[:, None] * stride_ks + offs_d[None, :],
                    mask=in_len[:, None] & (offs_d[None, :] < E), other=0.0)
        v = tl.load(V + s64 * stride_vs + tl.arange(0, BLOCK_N)[:, None] * stride_vs + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:
            s = tanh(s * qk_scale) * (softcap * LOG2E)
        else:
            s = s * qk_scale
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= last[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:
        out_rows = (b * H + head).to(tl.int64) * L + qi
        tl.store(Out + out_rows[:, None] * EV + offs_dv[None, :], o.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < EV))
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(Lse + out_rows, lse, mask=row_ok)
    else:
        part = (bk.to(tl.int64) * NSPLIT + split) * M + offs_m
        tl.store(PartO + part[:, None] * EV + offs_dv[None, :], o, mask=row_ok[:, None] & (offs_dv[None, :] < EV))
        lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(PartLse + part, lse2, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    PartO,  # (B * Hk, NSPLIT, M, Ev) float32
    PartLse,  # (B * Hk, NSPLIT, M) float32 base 2, -inf for an empty split
    Out,  # (B, H, L, Ev) contiguous
    Lse,  # (B, H, L) float32
    H, Hk, L, EV, M,
    NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0)  # (b * H + h) * L + i
    i = row % L
    bh = row // L
    b = bh // H
    h = bh % H
    G = H // Hk
    r = (h % G) * L + i
    bk = b * Hk + h // G
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    part = (bk.to(tl.int64) * NSPLIT + offs_s) * M + r
    lse2 = tl.load(PartLse + part, mask=offs_s < NSPLIT, other=float("-inf"))
    mx = tl.max(lse2, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse2 - mx_safe)  # 0 for empty splits
    wsum = tl.sum(w, 0)
    used = lse2 > float("-inf")
    po = tl.load(PartO + part[:, None] * EV + offs_dv[None, :], mask=used[:, None] & (offs_dv[None, :] < EV),
                 other=0.0)
    o = tl.sum(po * w[:, None], 0) / tl.where(wsum != 0, wsum, 1.0)  # (NaN splits: a NaN sum, out and lse)
    tl.store(Out + row.to(tl.int64) * EV + offs_dv, o.to(Out.dtype.element_ty), mask=offs_dv < EV)
    lse = tl.where(wsum != 0, (mx_safe + tl.log2(tl.where(wsum != 0, wsum, 1.0))) * LN2, float("inf"))
    tl.store(Lse + row, lse)


def _num_splits(B: int, Hk: int, row_blocks: int, S: int, block_n: int, device) -> int:
    """Enough programs to fill the GPU (about two per SM), each with at least a few key blocks. From the shapes
    only: a compiled / graphed decode step keeps one launch configuration."""
    sms = sm_count(device) if device.type == "cuda" else 4
    programs = B * Hk * row_blocks
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(S, 4 * block_n), 64))


def decode_fwd(q, k, v, seqlens, keep, scale: float, softcap: float, causal: bool):
    """out (B, H, L, Ev) q.dtype and lse (B, H, L) float32 of decode attention (see the module docstring)."""
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, L, Ev, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    if out.numel() == 0 or B * H * L == 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse
    M = (H // Hk) * L
    block_m = min(64, max(16, next_pow2(M)))
    block_n = 32 if INTERPRETED else 64
    block_d, block_dv = next_pow2(max(E, 16)), next_pow2(max(Ev, 16))
    row_blocks = triton.cdiv(M, block_m)
    nsplit = _num_splits(B, Hk, row_blocks, S, block_n, q.device)
    direct = nsplit == 1
    part_o = out if direct else torch.empty(B * Hk, nsplit, M, Ev, device=q.device, dtype=torch.float32)
    part_lse = lse if direct else torch.empty(B * Hk, nsplit, M, device=q.device, dtype=torch.float32)
    seq = seqlens if seqlens is not None else lse  # a dummy pointer when unused
    kp = keep if keep is not None else lse
    keep_strides = (keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)
    # the interpreter's bf16 tl.dot is broken (triton issue 11584): float32 dots there
    dot_f32 = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    _decode_split_kernel[(B * Hk * row_blocks * nsplit,)](
        q, *q.stride()[:3], k, *k.stride()[:3], v, *v.stride()[:3],
        seq, kp, *keep_strides, part_o, part_lse, out, lse,
        H, Hk, L, S, E, Ev, M, float(scale), float(softcap) if softcap > 0 else 1.0,
        NSPLIT=nsplit, HAS_LENS=seqlens is not None, HAS_KEEP=keep is not None, CAUSAL=bool(causal),
        SOFTCAP=softcap > 0, DIRECT=direct, DOT_F32=dot_f32,
        PRECISION="ieee" if dot_f32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=4, num_stages=2)
    if not direct:
        _decode_combine_kernel[(B * H * L,)](
            part_o, part_lse, out, lse, H, Hk, L, Ev, M,
            NSPLIT=nsplit, BLOCK_S=next_pow2(nsplit), BLOCK_DV=block_dv, num_warps=4)
    return out, lse
