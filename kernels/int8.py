"""INT8 GEMM with int32 accumulation and a fused dequant epilogue (W8A8), weight-only int8 GEMM (W8A16), and
row-wise int8 quantization, in Triton. Contract: fastattn/ops/int8.py."""
import os

import torch
import triton
import triton.language as tl

from . import INTERPRETED, next_pow2

_MM_SHAPES = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 4),
              (128, 128, 128, 4, 4), (64, 128, 128, 4, 4), (16, 64, 256, 4, 5)]
# W8A16 holds its tiles in 16-bit: these need 256-336 KiB of shared memory on sm_90, more than an H100 block has
# (benchmarks/triton_sm90_check.py), so the autotuner could never launch them.
_W8A16_TOO_BIG = {(256, 128, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 4)}


def _mm_configs(all_configs: bool = False, w8a16: bool = False):
    """Tile configs; FASTATTN_AUTOTUNE=0 (the test suite) keeps the first, so tests skip the tuning runs."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [sh for sh in _MM_SHAPES if not (w8a16 and sh in _W8A16_TOO_BIG)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
               for m, n, k, w, s in shapes]
    return configs if all_configs or os.environ.get("FASTATTN_AUTOTUNE", "1") != "0" else configs[:1]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (decode-sized M takes the BLOCK_M=16/32 configs)."""
    M = named_args["M"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, next_pow2(M))]
    return keep or configs[:1]


def int8_mm_with_config(a, b, config):
    """The raw kernel with one given config (tests check every config is exact)."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=torch.int32, device=a.device)
    meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _int8_mm_kernel[grid](a, b, out, out, out, out, M, N, K, M, a.stride(0), b.stride(0), out.stride(0),
                          HAS_AS=False, HAS_BS=False, HAS_BIAS=False, OUT_INT32=True,
                          EVEN_K=K % meta["BLOCK_K"] == 0, **meta)
    return out


def _autotune(fn, w8a16: bool = False):
    """EVEN_K from the tile; on a GPU, autotuned over _mm_configs (the interpreter runs its one config)."""
    fn = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(fn)
    if INTERPRETED:
        return fn
    return triton.autotune(_mm_configs(w8a16=w8a16), key=["M_BUCKET", "N", "K"],
                           prune_configs_by={"early_config_prune": _prune})(fn)


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _epilogue(acc, C, AS, BS, Bias, offs_m, offs_n, M, N, stride_cm,
              HAS_AS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if OUT_INT32:
        tl.store(ptrs, acc, mask=mask)
    else:
        c = acc.to(tl.float32)
        if HAS_AS:
            c = c * tl.load(AS + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if HAS_BS:
            c = c * tl.load(BS + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if HAS_BIAS:
            c = c + tl.load(Bias + offs_n, mask=offs_n < N, other=0.0)[None, :]
        tl.store(ptrs, c.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _int8_mm_kernel(
    A,  # int8 (M, K), row stride stride_am
    B,  # int8 (N, K), row stride stride_bn (the nn.Linear weight layout)
    C,  # output (M, N)
    AS,  # float32 (M,) per-token scales
    BS,  # float32 (N,) per-channel scales
    Bias,  # float32 (N,)
    M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
    HAS_AS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = tl.minimum(offs_m, M - 1).to(tl.int64)  # clamped rows: loads stay in bounds without a mask
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = A + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + rows_b[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue(acc, C, AS, BS, Bias, offs_m, offs_n, M, N, stride_cm, HAS_AS, HAS_BS, HAS_BIAS, OUT_INT32)


_int8_mm = _autotune(_int8_mm_kernel)


def _meta():
    return dict(_mm_configs()[0].kwargs, num_warps=4) if INTERPRETED else {}


@triton.jit
def _small_m_kernel(
    A,  # (M, K) activations: int8 (W8A8) or float16/bfloat16 (W8A16)
    B,  # int8 (N, K) weight
    C,  # output (M, N)
    AS,  # float32 (M,) activation scales
    BS,  # float32 (N,) weight scales
    Bias,  # float32 (N,)
    N, K, stride_am, stride_bn, stride_cm,
    HAS_AS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    INT8_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_ONCE: tl.constexpr,
):
    """Decode-sized M: one program per (row of A, BLOCK_N weight rows), reducing K with vector products instead of
    tensor-core tiles (which would pad M to 16+); the weight streams once per row of A."""
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    # REDUCE_ONCE: elementwise partial sums (BLOCK_N x BLOCK_K of them), reduced across the tile after the loop;
    # else a reduction per K step (shuffles, and a shared-memory round trip with a barrier when the tile spans warps)
    # with fewer registers held. The autotuner measures both.
    acc_dtype = tl.int32 if INT8_A else tl.float32
    acc = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    if REDUCE_ONCE:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(A + m * stride_am + kk, mask=kk < K, other=0)
        w = tl.load(B + rows_b[:, None] * stride_bn + kk[None, :], mask=kk[None, :] < K, other=0)
        prod = w.to(acc_dtype) * a.to(acc_dtype)[None, :]
        if REDUCE_ONCE:
            acc2 += prod
        else:
            acc += tl.sum(prod, axis=1)
    if REDUCE_ONCE:
        acc = tl.sum(acc2, axis=1)
    ptrs = C + m.to(tl.int64) * stride_cm + offs_n
    if OUT_INT32:
        tl.store(ptrs, acc, mask=offs_n < N)
    else:
        c = acc.to(tl.float32)
        if HAS_AS:
            c = c * tl.load(AS + m)
        if HAS_BS:
            c = c * tl.load(BS + offs_n, mask=offs_n < N, other=0.0)
        if HAS_BIAS:
            c = c + tl.load(Bias + offs_n, mask=offs_n < N, other=0.0)
        tl.store(ptrs, c.to(C.dtype.element_ty), mask=offs_n < N)


SMALL_M = 8  # up to this many rows, the vector-product kernel beats padding M to a tensor-core tile

# Decode is memory-bound: the weight must stream at full bandwidth, which takes enough bytes in flight per SM. Which
# (rows x K chunk, warps, where the K reduction happens) gets there depends on N and K, so the GPU autotunes it;
# REDUCE_ONCE tiles hold 64 partial sums a thread.
_SMALL_M_TILES = [(n, k, w, once) for once in (True, False) for n, k, w in
                  [(16, 512, 4), (8, 1024, 4), (16, 1024, 8), (4, 2048, 4), (8, 2048, 8), (32, 256, 4), (2, 4096, 4)]]
if INTERPRETED:
    _small_m_mm = _small_m_kernel
else:
    _small_m_mm = triton.autotune(
        [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "REDUCE_ONCE": once}, num_warps=w)
         for n, k, w, once in _SMALL_M_TILES][:None if os.environ.get("FASTATTN_AUTOTUNE", "1") != "0" else 1],
        key=["N", "K", "INT8_A"])(_small_m_kernel)


def _small_m(a, b, out, a_scale, b_scale, bias, tile=None):
    """The decode kernel; ``tile`` = (BLOCK_N, BLOCK_K, num_warps, REDUCE_ONCE) runs that tile untuned (tests check
    each)."""
    M, K = a.shape
    N = b.shape[0]
    kernel, meta = _small_m_mm, {}
    if tile is not None or INTERPRETED:
        n, k, w, once = tile or (16, 64, 4, True)
        kernel, meta = _small_m_kernel, dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, REDUCE_ONCE=once)
    kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](
        a, b, out, out if a_scale is None else a_scale, out if b_scale is None else b_scale,
        out if bias is None else bias, N, K, a.stride(0), b.stride(0), out.stride(0),
        HAS_AS=a_scale is not None, HAS_BS=b_scale is not None, HAS_BIAS=bias is not None,
        OUT_INT32=out.dtype == torch.int32, INT8_A=a.dtype == torch.int8, **meta)
    return out


def int8_mm(a, b, a_scale, b_scale, bias, out_dtype):
    """a int8 (M, K), b int8 (N, K) -> (M, N) out_dtype; see the contract."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if M <= SMALL_M:
        return _small_m(a, b, out, a_scale, b_scale, bias)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _int8_mm[grid](a, b, out, out if a_scale is None else a_scale, out if b_scale is None else b_scale,
                   out if bias is None else bias, M, N, K, min(next_pow2(M), 4096), a.stride(0),
                   b.stride(0), out.stride(0),
                   HAS_AS=a_scale is not None, HAS_BS=b_scale is not None, HAS_BIAS=bias is not None,
                   OUT_INT32=out_dtype == torch.int32, **_meta())
    return out


@triton.jit
def _w8a16_mm_kernel(
    A,  # float16 / bfloat16 (M, K) activations
    B,  # int8 (N, K) weight
    C,  # output (M, N), A's dtype
    BS,  # float32 (N,) per-channel weight scales
    Bias,  # float32 (N,)
    M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Weight-only int8: the weight tile is converted to A's dtype in registers (half the weight bytes of bf16),
    products accumulate in float32, and the per-channel scale is applied once in the epilogue."""
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = A + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + rows_b[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        if DOT_F32:  # the interpreter's bf16 dot is broken: compute in fp32 there
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc += tl.dot(a, b.to(a.dtype))
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue(acc, C, BS, BS, Bias, offs_m, offs_n, M, N, stride_cm, False, True, HAS_BIAS, False)


_w8a16_mm = _autotune(_w8a16_mm_kernel, w8a16=True)


def w8a16_mm(a, b, b_scale, bias):
    """a float16/bfloat16 (M, K), b int8 (N, K), b_scale float32 (N,), bias float32 (N,) | None -> (M, N) a.dtype."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if M <= SMALL_M:
        return _small_m(a, b, out, None, b_scale, bias)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _w8a16_mm[grid](a, b, out, b_scale, out if bias is None else bias, M, N, K, min(next_pow2(M), 4096),
                    a.stride(0), b.stride(0), out.stride(0), HAS_BIAS=bias is not None, DOT_F32=INTERPRETED,
                    **_meta())
    return out


@triton.jit
def _quantize_rows_kernel(
    X,  # float (M, K), contiguous
    Smooth,  # float32 (K,): column k is divided by smooth[k] first
    Q,  # int8 (M, K)
    Scale,  # float32 (M,)
    K,
    HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(X + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    # IEEE-rounded divisions (a plain `/` may lower to an approximate one on GPU): bit-exact with the reference
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(Smooth + cols, mask=mask, other=1.0))
    scale = tl.math.div_rn(tl.max(tl.abs(x), 0), 127.0)
    inv = tl.where(scale > 0, tl.math.div_rn(1.0, scale), 0.0)
    y = x * inv
    r = tl.floor(y + 0.5)  # round half to even, as torch.round
    r = tl.where(((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)
    q = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(Q + row * K + cols, q.to(tl.int8), mask=mask)
    tl.store(Scale + row, scale)


MAX_QUANT_K = 65536


def quantize_rows(x, smooth):
    """x float (M, K) contiguous, smooth float32 (K,) | None -> (q int8 (M, K), scale float32 (M,))."""
    M, K = x.shape
    if K > MAX_QUANT_K:
        raise ValueError(f"x: row width {K} exceeds the Triton quantize kernel's {MAX_QUANT_K}")
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block = next_pow2(K)
        _quantize_rows_kernel[(M,)](x, x if smooth is None else smooth, q, scale, K, HAS_SMOOTH=smooth is not None,
                                    BLOCK_K=block, num_warps=min(max(block // 1024, 1), 16),
                                    enable_fp_fusion=False)  # x * inv + 0.5 as one FMA skips the rounding of x * inv
    return q, scale
