"""Fused residual-add + LayerNorm / RMSNorm in Triton: one program per row in the forward, a few rows per program
in the backward with per-program partial sums for dweight / dbias. Contract: fastattn/ops/add_norm.py."""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import next_pow2, sm_count

MAX_COLS = 65536


@triton.jit
def _add_norm_fwd_kernel(
    X,  # pointer to the input, shape (M, N)
    R,  # pointer to the residual, shape (M, N); unused without HAS_RESIDUAL
    W,  # pointer to the weight, shape (N,)
    B,  # pointer to the bias, shape (N,)
    Y,  # pointer to the output, shape (M, N)
    S,  # pointer to s = x + residual, shape (M, N); its dtype rounds s even when STORE_S is off
    Mean,  # pointer to the row means, shape (M,); unused for RMSNorm
    Rstd,  # pointer to the row 1/std, shape (M,)
    N,  # row width
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    STORE_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    off = row * N + cols
    s = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
    s_rounded = s.to(S.dtype.element_ty)
    if STORE_S:
        tl.store(S + off, s_rounded, mask=mask)
    s = s_rounded.to(tl.float32)
    if IS_RMS:
        xc = s
    else:
        mean = tl.math.div_rn(tl.sum(s, axis=0), N * 1.0)  # exact for N = 1, unlike an approximate /
        tl.store(Mean + row, mean)
        xc = tl.where(mask, s - mean, 0.0)
    var = tl.math.div_rn(tl.sum(xc * xc, axis=0), N * 1.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_kernel(
    DY,  # pointer to the output gradient, shape (M, N)
    S,  # pointer to s (x itself without residual), shape (M, N)
    W,  # pointer to the weight, shape (N,)
    Mean,  # pointer to the row means, shape (M,)
    Rstd,  # pointer to the row 1/std, shape (M,)
    DS,  # pointer to the gradient flowing into s (prenorm), shape (M, N)
    DX,  # pointer to the input gradient, shape (M, N)
    DRES,  # pointer to the fp32 residual gradient, shape (M, N)
    DW,  # pointer to the per-program partial weight gradients, shape (programs, N)
    DB,  # pointer to the per-program partial bias gradients, shape (programs, N)
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DS: tl.constexpr,
    IS_RMS: tl.constexpr,
    WRITE_DRES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    n_f = N * 1.0
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    base = row_start.to(tl.int64) * N  # 64-bit row offsets; the loop advances by N
    DY += base
    S += base
    DX += base
    if HAS_DS:
        DS += base
    if WRITE_DRES:
        DRES += base
    for row in range(row_start, row_end):
        s = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = s * rstd
        else:
            xhat = tl.where(mask, (s - tl.load(Mean + row)) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * w
            dw += dy * xhat
        else:
            g = dy
        if HAS_BIAS:
            db += dy
        c1 = tl.math.div_rn(tl.sum(xhat * g, axis=0), n_f)
        if IS_RMS:
            dsum = (g - xhat * c1) * rstd
        else:
            c2 = tl.math.div_rn(tl.sum(g, axis=0), n_f)
            dsum = (g - xhat * c1 - c2) * rstd
        if HAS_DS:
            dsum += tl.load(DS + cols, mask=mask, other=0.0).to(tl.float32)
            DS += N
        tl.store(DX + cols, dsum.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DRES:
            tl.store(DRES + cols, dsum, mask=mask)
            DRES += N
        DY += N
        S += N
        DX += N
    if HAS_WEIGHT:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


def _block_and_warps(n: int, elem_size: int):
    block_n = next_pow2(n)
    # about 8 to 16 elements per thread, between 1 and 16 warps
    num_warps = min(max(block_n * max(elem_size, 2) // 2048, 1), 16)
    return block_n, num_warps


def add_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], eps: float, is_rms: bool, store_s: bool, s_fp32: bool):
    """x, residual: (M, N) contiguous. Returns [y, s (or empty), mean (or empty for RMS), rstd]."""
    M, N = x.shape
    if N > MAX_COLS:
        raise ValueError(f"x: row width {N} exceeds the Triton kernel's {MAX_COLS}")
    s_dtype = torch.float32 if s_fp32 else x.dtype
    y = torch.empty_like(x)
    s = torch.empty((M, N) if store_s else (0,), dtype=s_dtype, device=x.device)
    mean = torch.empty(0 if is_rms else M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return [y, s, mean, rstd]
    block_n, num_warps = _block_and_warps(N, x.element_size())
    _add_norm_fwd_kernel[(M,)](
        x, x if residual is None else residual, x if weight is None else weight,
        x if bias is None else bias, y, s, mean if not is_rms else rstd, rstd, N, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        IS_RMS=is_rms, STORE_S=store_s, BLOCK_N=block_n, num_warps=num_warps)
    return [y, s, mean, rstd]


def _bwd_launch(M: int, N: int, device: torch.device):
    """(programs, num_warps) of the backward. Each program walks its rows one after another, so latency is hidden
    by many programs per SM (a few per SM leave half the bandwidth unused); the (programs, N) float32 partials of
    dweight/dbias are capped near 16 MB."""
    block_n = next_pow2(N)
    num_warps = 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16
    if device.type != "cuda":
        return min(M, 4), num_warps  # the interpreter runs programs one by one
    sms = sm_count(device)
    per_sm = max(1, 64 // num_warps)  # up to 64 resident warps per SM
    return max(1, min(M, sms * per_sm, max(sms, 2**22 // N))), num_warps


def add_norm_bwd(dy: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 weight: Optional[torch.Tensor], ds: Optional[torch.Tensor], has_bias: bool, is_rms: bool,
                 dres_fp32: bool):
    """Returns [dx, dres (or empty), dweight (or empty), dbias (or empty)]; weight sums in float32."""
    M, N = dy.shape
    dev = dy.device
    dx = torch.empty_like(dy)
    dres = torch.empty((M, N) if dres_fp32 else (0,), dtype=torch.float32, device=dev)
    programs, num_warps = _bwd_launch(max(M, 1), N, dev)
    dw = torch.empty((programs, N) if weight is not None else (0,), dtype=torch.float32, device=dev)
    db = torch.empty((programs, N) if has_bias else (0,), dtype=torch.float32, device=dev)
    if M > 0:
        block_n = next_pow2(N)
        _add_norm_bwd_kernel[(programs,)](
            dy, s, dy if weight is None else weight, rstd if is_rms else mean, rstd,
            dy if ds is None else ds, dx, dres if dres_fp32 else dx, dw if weight is not None else dx,
            db if has_bias else dx, M, N, triton.cdiv(M, programs),
            HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DS=ds is not None, IS_RMS=is_rms,
            WRITE_DRES=dres_fp32, BLOCK_N=block_n, num_warps=num_warps)
    else:
        dw.zero_()
        db.zero_()
    return [dx, dres, dw.sum(0) if weight is not None else dw, db.sum(0) if has_bias else db]
