// INT8 GEMM with an exact int32 accumulator and a fused float32 dequant epilogue (sm_80+ PTX; runs on sm_90).
//
//   out (M, N) = epilogue(a (M, K) @ b (N, K)^T)    a, b int8 row-major: both operands K-major, the "row.col"
//                                                  layout of mma.sync.m16n8k32.s8
//
// Kernels:
//   tile kernel     BM x BN x 64 block tiles: 128x256 (8 warps of 64x64), 128x128 (4 warps of 64x64; or 8 warps of
//                   64x32, benchmark-only) and 64x64 (4 warps of 32x32, for grids smaller than the GPU), a
//                   4-stage cp.async pipeline into XOR-swizzled shared memory (no padding, conflict-free for the
//                   16-byte cp.async writes and for ldmatrix), ldmatrix.x4 fragments, mma.m16n8k32 s8 -> s32,
//                   register epilogue with bounds checks. Output tiles in grouped (L2-friendly) order.
//   small-M kernel  M <= 32 (decoding): each warp owns 16 rows x 16 columns and a slice of the K steps (split-K over
//                   the 8 warps of a block, reduced through shared memory). Operands go straight from global memory
//                   into mma fragments: lane (g, t) loads 16 contiguous bytes of row g at k = 64s + 16t, and both
//                   operands use the same permutation of k inside each 64-wide step (a sum over k does not care),
//                   so every load is a coalesced 16-byte vector load and no shared memory staging is needed.
// Load paths (template VEC): 16 (K % 16 == 0 and 16-byte aligned bases: cp.async 16 / uint4 loads), 4 (K % 4 == 0
// and 4-byte aligned bases: 4-byte cp.async / loads), 1 (anything else: byte loads). Out-of-range rows and the K
// tail are zero-filled, so every path computes the same exact sums.
// Epilogue arithmetic uses explicit round-to-nearest PTX without .ftz (the library is compiled with
// --use_fast_math, which would flush subnormals and contract c * b_scale + bias into an fma).
// Kernel choice (plan_for; FASTATTN_CUDA_INT8_KERNEL in the binding forces one): M <= 32 small-M; else the largest
// tile (128x256, 128x128, 64x64) whose grid still covers every SM. Not yet tuned on hardware: see
// benchmarks/cuda_int8_check.py, which times every kernel.
#include "int8.h"

#ifndef FASTATTN_INT8_HOST_EMULATION
#include <cuda_runtime.h>
#define FA8_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FA8_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace int8_cuda {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Device primitives (the host emulation in the tests provides the same functions with their documented semantics)
// ------------------------------------------------------------------------------------------------------------
#ifndef FASTATTN_INT8_HOST_EMULATION

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; bytes [src_bytes, 16) of the destination are zero-filled (src_bytes 0: no
// global read at all). smem and gmem 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}

// 4-byte async copy (src_bytes 0 or 4), 4-byte aligned addresses.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices (8 rows of 16 bytes each): lanes 8j..8j+7 give the row addresses of matrix j; lane l
// receives, in r[j], bytes 4(l%4)..4(l%4)+3 of row l/4 of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem))
               : "memory");
}

// d += A (16x32 s8, row) * B (32x8 s8, col), s32 accumulate (wrapping, no .satfinite).
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Plain (L1-cached) 16-byte / 4-byte global loads, and a streaming 16-byte load for data read once (the weight).
__device__ __forceinline__ uint4 ld_global_v4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint4 ld_global_stream_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_global_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t ld_global_u8(const void* p) { return *reinterpret_cast<const uint8_t*>(p); }
__device__ __forceinline__ void st_shared_v4(void* smem, uint4 v) { *reinterpret_cast<uint4*>(smem) = v; }

// Float32 arithmetic with IEEE round-to-nearest-even and no flush-to-zero, whatever the compiler flags.
__device__ __forceinline__ float i2f_rn(int x) {
  float r;
  asm("cvt.rn.f32.s32 %0, %1;" : "=f"(r) : "r"(x));
  return r;
}
__device__ __forceinline__ float fmul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fadd_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ uint16_t f2h_bits(float x) {
  uint16_t r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ uint16_t f2bf_bits(float x) {
  uint16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}

#endif  // !FASTATTN_INT8_HOST_EMULATION

// ------------------------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------------------------
constexpr int kBK = 64;          // bytes of K per pipeline stage (two mma k-steps of 32)
constexpr int kStages = 4;       // cp.async pipeline depth
constexpr int kGroupM = 8;       // tile rows per group of the grouped raster order
constexpr int kSmallWarps = 8;   // small-M kernel: warps per block (split-K)
constexpr int kSmallNT = 2;      // small-M kernel: n8 tiles per block (16 columns)
constexpr int kSmallUnroll = 4;  // small-M kernel: K steps in flight per warp
constexpr int kSmallMaxM = 32;   // small-M kernel takes M <= this

__host__ __device__ constexpr int gemm_smem_bytes(int bm, int bn) { return kStages * (bm + bn) * kBK; }
__host__ __device__ constexpr int small_smem_bytes() { return kSmallWarps * 16 * 8 * kSmallNT * 4; }

// Byte offset of 16-byte chunk kc (0..3) of row `row` in a [rows][64 bytes] stage tile. Rows 2r and 2r+1 share a
// 128-byte line; the chunk index is XORed with (row / 2) % 4, so the 8 rows of one ldmatrix phase (rows 8i..8i+7,
// one logical chunk) hit 8 distinct 16-byte bank groups, and a warp's cp.async writes (8 rows x 4 chunks) stay
// conflict-free.
__device__ __forceinline__ int swz(int row, int kc) { return row * kBK + ((kc ^ ((row >> 1) & 3)) << 4); }

__device__ __forceinline__ int clamp16(int64_t v) { return v <= 0 ? 0 : (v >= 16 ? 16 : static_cast<int>(v)); }

// Bytes [0, valid) of src, zero-extended to 16 (byte loads: any alignment).
__device__ __forceinline__ uint32_t load_word_bytes(const int8_t* src, int j0, int valid) {
  uint32_t w = 0u;
#pragma unroll
  for (int j = 0; j < 4; ++j) w |= (j0 + j < valid ? ld_global_u8(src + j0 + j) : 0u) << (8 * j);
  return w;
}
__device__ __forceinline__ uint4 load_bytes16(const int8_t* src, int valid) {
  return make_uint4(load_word_bytes(src, 0, valid), load_word_bytes(src, 4, valid), load_word_bytes(src, 8, valid),
                    load_word_bytes(src, 12, valid));
}

// One 16-byte chunk global -> shared: the first `valid` bytes from src, the rest zero. For VEC 16 / 4, valid is a
// multiple of VEC (K % VEC == 0) and src is VEC-aligned; src is only dereferenced where valid says so.
template <int VEC>
__device__ __forceinline__ void load_chunk(unsigned char* dst, const int8_t* src, const int8_t* base, int valid) {
  if constexpr (VEC == 16) {
    cp_async_16(dst, valid > 0 ? static_cast<const void*>(src) : static_cast<const void*>(base), valid > 0 ? 16 : 0);
  } else if constexpr (VEC == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool ok = 4 * j < valid;
      cp_async_4(dst + 4 * j, ok ? static_cast<const void*>(src + 4 * j) : static_cast<const void*>(base),
                 ok ? 4 : 0);
    }
  } else {
    st_shared_v4(dst, load_bytes16(src, valid));
  }
}

// 16 bytes of a row from global memory straight into registers (small-M kernel), zero beyond `valid`.
template <int VEC, bool kStream>
__device__ __forceinline__ uint4 load16(const int8_t* src, int valid) {
  if constexpr (VEC == 16) {
    if (valid > 0) return kStream ? ld_global_stream_v4(src) : ld_global_v4(src);
    return make_uint4(0u, 0u, 0u, 0u);
  } else if constexpr (VEC == 4) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = 4 * j < valid ? ld_global_u32(src + 4 * j) : 0u;
    return make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    return load_bytes16(src, valid);
  }
}

// Epilogue of one output element / one pair of adjacent columns.
template <Int8OutDtype OUT>
struct OutTraits;
template <>
struct OutTraits<Int8OutDtype::kFloat32> {
  using T = float;
};
template <>
struct OutTraits<Int8OutDtype::kFloat16> {
  using T = uint16_t;
};
template <>
struct OutTraits<Int8OutDtype::kBFloat16> {
  using T = uint16_t;
};
template <>
struct OutTraits<Int8OutDtype::kInt32> {
  using T = int32_t;
};

// c = float(acc) * sa * sb + bias, each step rounded (no fma); has_* are warp-uniform.
__device__ __forceinline__ float dequant(int acc, bool has_sa, float sa, bool has_sb, float sb, bool has_bias,
                                         float bias) {
  float c = i2f_rn(acc);
  if (has_sa) c = fmul_rn(c, sa);
  if (has_sb) c = fmul_rn(c, sb);
  if (has_bias) c = fadd_rn(c, bias);
  return c;
}

template <Int8OutDtype OUT>
__device__ __forceinline__ typename OutTraits<OUT>::T convert_out(int acc, float c) {
  if constexpr (OUT == Int8OutDtype::kInt32) {
    return acc;
  } else if constexpr (OUT == Int8OutDtype::kFloat32) {
    return c;
  } else if constexpr (OUT == Int8OutDtype::kFloat16) {
    return f2h_bits(c);
  } else {
    return f2bf_bits(c);
  }
}

// Stores columns col and col + 1 of one output row (row pointer `orow`): one 2-element store when col + 1 < N and
// N is even (the pair is then aligned to its size), else element-wise with bounds checks.
template <Int8OutDtype OUT>
__device__ __forceinline__ void store_pair(typename OutTraits<OUT>::T* orow, int64_t col, int64_t N,
                                           typename OutTraits<OUT>::T v0, typename OutTraits<OUT>::T v1,
                                           bool n_even) {
  if (n_even && col + 1 < N) {
    if constexpr (OUT == Int8OutDtype::kFloat32) {
      *reinterpret_cast<uint2*>(orow + col) = make_uint2(__float_as_uint(v0), __float_as_uint(v1));
    } else if constexpr (OUT == Int8OutDtype::kInt32) {
      *reinterpret_cast<uint2*>(orow + col) = make_uint2(static_cast<uint32_t>(v0), static_cast<uint32_t>(v1));
    } else {
      *reinterpret_cast<uint32_t*>(orow + col) = static_cast<uint32_t>(v0) | (static_cast<uint32_t>(v1) << 16);
    }
  } else {
    if (col < N) orow[col] = v0;
    if (col + 1 < N) orow[col + 1] = v1;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Tile kernel
// ------------------------------------------------------------------------------------------------------------
template <int BM, int BN, int WARPS_M, int WARPS_N>
struct TileCfg {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kWTM = BM / WARPS_M;  // warp tile rows
  static constexpr int kWTN = BN / WARPS_N;  // warp tile columns
  static constexpr int kMI = kWTM / 16;      // m16 tiles per warp
  static constexpr int kNI = kWTN / 8;       // n8 tiles per warp
  static constexpr int kAStage = BM * kBK;
  static constexpr int kBStage = BN * kBK;
  static constexpr int kAChunks = BM * 4 / kThreads;  // 16-byte chunks per thread per stage
  static constexpr int kBChunks = BN * 4 / kThreads;
  static_assert(kWTM % 16 == 0 && kWTN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0, "loader must divide evenly");
  static_assert(kThreads % 4 == 0 && BM % (kThreads / 4) == 0 && BN % (kThreads / 4) == 0, "loader rows");
};

template <int BM, int BN, int WARPS_M, int WARPS_N, Int8OutDtype OUT>
__device__ __forceinline__ void tile_epilogue(const Int8MatmulParams& p, const int (&acc)[BM / WARPS_M / 16]
                                                                                        [BN / WARPS_N / 8][4],
                                              int64_t m_base, int64_t n_base, int lane) {
  using Cfg = TileCfg<BM, BN, WARPS_M, WARPS_N>;
  using T = typename OutTraits<OUT>::T;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.M, N = p.N;
  const bool has_sa = p.a_scale != nullptr, has_sb = p.b_scale != nullptr, has_bias = p.bias != nullptr;
  const bool n_even = (N & 1) == 0;
  float sb[Cfg::kNI][2], bi[Cfg::kNI][2];
#pragma unroll
  for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t col = n_base + j * 8 + 2 * t + e;
      sb[j][e] = has_sb && col < N ? p.b_scale[col] : 0.f;
      bi[j][e] = has_bias && col < N ? p.bias[col] : 0.f;
    }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m_base + i * 16 + h * 8 + g;
      if (row >= M) continue;
      const float sa = has_sa ? p.a_scale[row] : 0.f;
      T* orow = out + row * N;
#pragma unroll
      for (int j = 0; j < Cfg::kNI; ++j) {
        const int64_t col = n_base + j * 8 + 2 * t;
        const int a0 = acc[i][j][2 * h], a1 = acc[i][j][2 * h + 1];
        T v0, v1;
        if constexpr (OUT == Int8OutDtype::kInt32) {
          v0 = a0;
          v1 = a1;
        } else {
          v0 = convert_out<OUT>(a0, dequant(a0, has_sa, sa, has_sb, sb[j][0], has_bias, bi[j][0]));
          v1 = convert_out<OUT>(a1, dequant(a1, has_sa, sa, has_sb, sb[j][1], has_bias, bi[j][1]));
        }
        store_pair<OUT>(orow, col, N, v0, v1, n_even);
      }
    }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int VEC>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32) int8_gemm_tile_kernel(const Int8MatmulParams p) {
  using Cfg = TileCfg<BM, BN, WARPS_M, WARPS_N>;
  FA8_DYNAMIC_SMEM(smem);
  unsigned char* sA = smem;
  unsigned char* sB = smem + kStages * Cfg::kAStage;

  const int64_t M = p.M, N = p.N;
  const int K = static_cast<int>(p.K);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

  // Grouped raster: kGroupM tile rows sweep the tile columns together (A rows and B columns stay in L2).
  const int tiles_m = static_cast<int>((M + BM - 1) / BM);
  const int tiles_n = static_cast<int>((N + BN - 1) / BN);
  const int pid = static_cast<int>(blockIdx.x);
  const int per_group = kGroupM * tiles_n;
  const int first_m = (pid / per_group) * kGroupM;
  const int group_rows = tiles_m - first_m < kGroupM ? tiles_m - first_m : kGroupM;
  const int pid_m = first_m + (pid % per_group) % group_rows;
  const int pid_n = (pid % per_group) / group_rows;
  const int64_t m0 = static_cast<int64_t>(pid_m) * BM;
  const int64_t n0 = static_cast<int64_t>(pid_n) * BN;

  // Loader: chunk c = tid + i * threads -> row c / 4, 16-byte chunk c % 4 of the stage's 64 bytes of K.
  const int ld_row = tid >> 2, ld_kc = tid & 3;
  constexpr int kRowStep = Cfg::kThreads / 4;
  const int8_t* a_src[Cfg::kAChunks];
  bool a_ok[Cfg::kAChunks];
#pragma unroll
  for (int i = 0; i < Cfg::kAChunks; ++i) {
    const int64_t r = m0 + ld_row + i * kRowStep;
    a_ok[i] = r < M;
    a_src[i] = p.a + (a_ok[i] ? r : 0) * static_cast<int64_t>(K) + ld_kc * 16;
  }
  const int8_t* b_src[Cfg::kBChunks];
  bool b_ok[Cfg::kBChunks];
#pragma unroll
  for (int i = 0; i < Cfg::kBChunks; ++i) {
    const int64_t r = n0 + ld_row + i * kRowStep;
    b_ok[i] = r < N;
    b_src[i] = p.b + (b_ok[i] ? r : 0) * static_cast<int64_t>(K) + ld_kc * 16;
  }
  const int ktiles = (K + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    const int kbyte = kt * kBK;
    const int valid = clamp16(static_cast<int64_t>(K) - kbyte - ld_kc * 16);
    unsigned char* a_dst = sA + stage * Cfg::kAStage;
    unsigned char* b_dst = sB + stage * Cfg::kBStage;
#pragma unroll
    for (int i = 0; i < Cfg::kAChunks; ++i)
      load_chunk<VEC>(a_dst + swz(ld_row + i * kRowStep, ld_kc), a_src[i] + kbyte, p.a, a_ok[i] ? valid : 0);
#pragma unroll
    for (int i = 0; i < Cfg::kBChunks; ++i)
      load_chunk<VEC>(b_dst + swz(ld_row + i * kRowStep, ld_kc), b_src[i] + kbyte, p.b, b_ok[i] ? valid : 0);
  };

  // ldmatrix source offsets within a stage, for k-step ks (chunks 2ks, 2ks+1).
  //   A, m16 tile i: lane l -> row (l & 15) of the tile, chunk 2ks + l / 16: matrices (rows 0-7, k 0-15),
  //     (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) = the a0..a3 registers of m16n8k32.
  //   B, n8 tile pair jp: lane l -> row (l & 7) + 8 (l / 16), chunk 2ks + (l / 8) % 2: matrices (n 0-7, k 0-15),
  //     (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31) = b0, b1 of n8 tile 2jp, then of tile 2jp + 1.
  int a_off[Cfg::kMI][2], b_off[Cfg::kNI / 2][2];
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
    for (int i = 0; i < Cfg::kMI; ++i)
      a_off[i][ks] = swz(warp_m * Cfg::kWTM + i * 16 + (lane & 15), 2 * ks + (lane >> 4));
#pragma unroll
    for (int jp = 0; jp < Cfg::kNI / 2; ++jp)
      b_off[jp][ks] = swz(warp_n * Cfg::kWTN + jp * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1));
  }

  int acc[Cfg::kMI][Cfg::kNI][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed ...
    __syncthreads();               // ... everyone's have, and everyone is done with the stage refilled below
    {
      const int nk = kt + kStages - 1;
      if (nk < ktiles) load_stage(nk % kStages, nk);
      cp_async_commit();
    }
    const unsigned char* a_st = sA + (kt % kStages) * Cfg::kAStage;
    const unsigned char* b_st = sB + (kt % kStages) * Cfg::kBStage;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[Cfg::kMI][4], bf[Cfg::kNI][2];
#pragma unroll
      for (int i = 0; i < Cfg::kMI; ++i) ldmatrix_x4(af[i], a_st + a_off[i][ks]);
#pragma unroll
      for (int jp = 0; jp < Cfg::kNI / 2; ++jp) {
        uint32_t r[4];
        ldmatrix_x4(r, b_st + b_off[jp][ks]);
        bf[2 * jp][0] = r[0];
        bf[2 * jp][1] = r[1];
        bf[2 * jp + 1][0] = r[2];
        bf[2 * jp + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kNI; ++j) mma_s8_16832(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();  // only empty groups remain; keeps the exit clean

  const int64_t m_base = m0 + warp_m * Cfg::kWTM;
  const int64_t n_base = n0 + warp_n * Cfg::kWTN;
  switch (p.out_dtype) {
    case Int8OutDtype::kFloat16:
      tile_epilogue<BM, BN, WARPS_M, WARPS_N, Int8OutDtype::kFloat16>(p, acc, m_base, n_base, lane);
      break;
    case Int8OutDtype::kBFloat16:
      tile_epilogue<BM, BN, WARPS_M, WARPS_N, Int8OutDtype::kBFloat16>(p, acc, m_base, n_base, lane);
      break;
    case Int8OutDtype::kFloat32:
      tile_epilogue<BM, BN, WARPS_M, WARPS_N, Int8OutDtype::kFloat32>(p, acc, m_base, n_base, lane);
      break;
    default:
      tile_epilogue<BM, BN, WARPS_M, WARPS_N, Int8OutDtype::kInt32>(p, acc, m_base, n_base, lane);
      break;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Small-M kernel: block (x, y) computes rows [16y, 16y + 16) x columns [16x, 16x + 16); warp w takes the 64-byte K
// steps s = w, w + 8, ... Lane (g, t) loads bytes [64s + 16t, 64s + 16t + 16) of rows g and g + 8 of A and of row
// g of each n8 tile of B; words (0, 1) feed the first mma, words (2, 3) the second. In mma terms logical k
// (4t + i) <-> byte 16t + i and (16 + 4t + i) <-> 16t + 4 + i (first), +8 for the second: the same permutation
// of the 64 bytes for A and B, so the sum is the plain dot product.
// ------------------------------------------------------------------------------------------------------------
template <Int8OutDtype OUT>
__device__ __forceinline__ void small_store(const Int8MatmulParams& p, int64_t row, int64_t col, int acc) {
  using T = typename OutTraits<OUT>::T;
  T v;
  if constexpr (OUT == Int8OutDtype::kInt32) {
    v = acc;
  } else {
    const bool has_sa = p.a_scale != nullptr, has_sb = p.b_scale != nullptr, has_bias = p.bias != nullptr;
    const float c = dequant(acc, has_sa, has_sa ? p.a_scale[row] : 0.f, has_sb, has_sb ? p.b_scale[col] : 0.f,
                            has_bias, has_bias ? p.bias[col] : 0.f);
    v = convert_out<OUT>(acc, c);
  }
  static_cast<T*>(p.out)[row * p.N + col] = v;
}

template <int VEC>
__global__ void __launch_bounds__(kSmallWarps * 32) int8_gemm_small_m_kernel(const Int8MatmulParams p) {
  constexpr int kCols = 8 * kSmallNT;
  FA8_DYNAMIC_SMEM(smem);
  int* red = reinterpret_cast<int*>(smem);  // [kSmallWarps][16][kCols]

  const int64_t M = p.M, N = p.N;
  const int K = static_cast<int>(p.K);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kCols;

  const bool a0_ok = m0 + g < M, a1_ok = m0 + g + 8 < M;
  const int8_t* pa0 = p.a + (a0_ok ? m0 + g : 0) * static_cast<int64_t>(K) + 16 * t;
  const int8_t* pa1 = p.a + (a1_ok ? m0 + g + 8 : 0) * static_cast<int64_t>(K) + 16 * t;
  const int8_t* pb[kSmallNT];
  bool b_ok[kSmallNT];
#pragma unroll
  for (int j = 0; j < kSmallNT; ++j) {
    const int64_t r = n0 + 8 * j + g;
    b_ok[j] = r < N;
    pb[j] = p.b + (b_ok[j] ? r : 0) * static_cast<int64_t>(K) + 16 * t;
  }

  int acc[kSmallNT][4];
#pragma unroll
  for (int j = 0; j < kSmallNT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0;

  const int ksteps = (K + 63) / 64;
  for (int s0 = warp; s0 < ksteps; s0 += kSmallWarps * kSmallUnroll) {
    uint4 va0[kSmallUnroll], va1[kSmallUnroll], vb[kSmallUnroll][kSmallNT];
#pragma unroll
    for (int u = 0; u < kSmallUnroll; ++u) {
      const int s = s0 + u * kSmallWarps;
      const int kb = s * 64;
      const int valid = s < ksteps ? clamp16(static_cast<int64_t>(K) - kb - 16 * t) : 0;
      va0[u] = load16<VEC, false>(pa0 + kb, a0_ok ? valid : 0);
      va1[u] = load16<VEC, false>(pa1 + kb, a1_ok ? valid : 0);
#pragma unroll
      for (int j = 0; j < kSmallNT; ++j) vb[u][j] = load16<VEC, true>(pb[j] + kb, b_ok[j] ? valid : 0);
    }
#pragma unroll
    for (int u = 0; u < kSmallUnroll; ++u) {
      if (s0 + u * kSmallWarps >= ksteps) break;  // warp-uniform
      const uint32_t a_lo[4] = {va0[u].x, va1[u].x, va0[u].y, va1[u].y};
      const uint32_t a_hi[4] = {va0[u].z, va1[u].z, va0[u].w, va1[u].w};
#pragma unroll
      for (int j = 0; j < kSmallNT; ++j) {
        const uint32_t b_lo[2] = {vb[u][j].x, vb[u][j].y};
        const uint32_t b_hi[2] = {vb[u][j].z, vb[u][j].w};
        mma_s8_16832(acc[j], a_lo, b_lo);
        mma_s8_16832(acc[j], a_hi, b_hi);
      }
    }
  }

  // Split-K reduction over the warps: accumulator element r of n8 tile j sits at row g + 8 (r / 2), column
  // 8j + 2t + r % 2.
#pragma unroll
  for (int j = 0; j < kSmallNT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      red[(warp * 16 + g + 8 * (r >> 1)) * kCols + 8 * j + 2 * t + (r & 1)] = acc[j][r];
  __syncthreads();
  for (int e = tid; e < 16 * kCols; e += kSmallWarps * 32) {
    const int row = e / kCols, col = e % kCols;
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kSmallWarps; ++w) sum += red[(w * 16 + row) * kCols + col];
    const int64_t m = m0 + row, n = n0 + col;
    if (m >= M || n >= N) continue;
    switch (p.out_dtype) {
      case Int8OutDtype::kFloat16:
        small_store<Int8OutDtype::kFloat16>(p, m, n, sum);
        break;
      case Int8OutDtype::kBFloat16:
        small_store<Int8OutDtype::kBFloat16>(p, m, n, sum);
        break;
      case Int8OutDtype::kFloat32:
        small_store<Int8OutDtype::kFloat32>(p, m, n, sum);
        break;
      default:
        small_store<Int8OutDtype::kInt32>(p, m, n, sum);
        break;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------
struct Plan {
  Int8Kernel kind;
  int vec;
};

bool aligned(const void* ptr, uintptr_t n) { return (reinterpret_cast<uintptr_t>(ptr) % n) == 0; }

int64_t tiles(const Int8MatmulParams& p, int bm, int bn) { return ((p.M + bm - 1) / bm) * ((p.N + bn - 1) / bn); }

// The kernel and load path for these params. vec < 16 runs the small-M kernel (M <= 32 or forced) or the 64x64
// tile kernel (anything else).
Plan plan_for(const Int8MatmulParams& p) {
  Plan pl;
  if (p.K % 16 == 0 && aligned(p.a, 16) && aligned(p.b, 16))
    pl.vec = 16;
  else if (p.K % 4 == 0 && aligned(p.a, 4) && aligned(p.b, 4))
    pl.vec = 4;
  else
    pl.vec = 1;
  const int sms = p.num_sms > 0 ? p.num_sms : 132;
  if (p.kernel != Int8Kernel::kAuto)
    pl.kind = p.kernel;
  else if (p.M <= kSmallMaxM)
    pl.kind = Int8Kernel::kSmallM;
  else if (tiles(p, 128, 256) >= sms)
    pl.kind = Int8Kernel::kTile128x256;
  else if (tiles(p, 128, 128) >= sms)
    pl.kind = Int8Kernel::kTile128x128;
  else
    pl.kind = Int8Kernel::kTile64x64;
  if (pl.vec != 16 && pl.kind != Int8Kernel::kSmallM) pl.kind = Int8Kernel::kTile64x64;
  return pl;
}

template <int BM, int BN, int WM, int WN, int VEC>
const char* launch_tile(const Int8MatmulParams& p, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes(BM, BN);
  auto kernel = int8_gemm_tile_kernel<BM, BN, WM, WN, VEC>;
  cudaError_t err;
  if constexpr (smem > 48 * 1024) {  // opt in to more than 48 KiB of dynamic shared memory, once per device
    static std::atomic<uint64_t> done{0};
    int dev = 0;
    err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    const uint64_t bit = dev >= 0 && dev < 64 ? uint64_t(1) << dev : 0;
    if (bit == 0 || (done.load(std::memory_order_relaxed) & bit) == 0) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return cudaGetErrorString(err);
      done.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const int64_t tiles = ((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  if (tiles > INT32_MAX) return "int8_mm (CUDA): too many output tiles (M and N too large)";
  FA8_LAUNCH(kernel, dim3(static_cast<unsigned>(tiles)), dim3(WM * WN * 32), smem, stream, p);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int VEC>
const char* launch_small(const Int8MatmulParams& p, cudaStream_t stream) {
  const int64_t gx = (p.N + 8 * kSmallNT - 1) / (8 * kSmallNT);
  const int64_t gy = (p.M + 15) / 16;
  if (gx > INT32_MAX || gy > 65535) return "int8_mm (CUDA): grid too large for the small-M kernel";
  FA8_LAUNCH(int8_gemm_small_m_kernel<VEC>, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
             dim3(kSmallWarps * 32), small_smem_bytes(), stream, p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// The 4-byte and byte load paths (K % 16 != 0 or misaligned bases: rare, and slow anyway) exist for the small-M
// and 64x64 kernels only, which keeps the compile time down.
template <int VEC>
const char* launch_vec(const Plan& pl, const Int8MatmulParams& p, cudaStream_t stream) {
  if constexpr (VEC == 16) {
    switch (pl.kind) {
      case Int8Kernel::kSmallM:
        return launch_small<VEC>(p, stream);
      case Int8Kernel::kTile64x64:
        return launch_tile<64, 64, 2, 2, VEC>(p, stream);
      case Int8Kernel::kTile128x128:
        return launch_tile<128, 128, 2, 2, VEC>(p, stream);
      case Int8Kernel::kTile128x128W8:
        return launch_tile<128, 128, 2, 4, VEC>(p, stream);
      case Int8Kernel::kTile128x256:
        return launch_tile<128, 256, 2, 4, VEC>(p, stream);
      default:
        return "int8_mm (CUDA): unknown kernel";
    }
  } else {
    if (pl.kind == Int8Kernel::kSmallM) return launch_small<VEC>(p, stream);
    return launch_tile<64, 64, 2, 2, VEC>(p, stream);
  }
}

}  // namespace

const char* int8_mm_kernel_name(const Int8MatmulParams& p) {
  const Plan pl = plan_for(p);
  static const char* names[6][3] = {{"auto/v16", "auto/v4", "auto/v1"},
                                    {"small_m/v16", "small_m/v4", "small_m/v1"},
                                    {"tile64x64/v16", "tile64x64/v4", "tile64x64/v1"},
                                    {"tile128x128/v16", "tile128x128/v4", "tile128x128/v1"},
                                    {"tile128x128w8/v16", "tile128x128w8/v4", "tile128x128w8/v1"},
                                    {"tile128x256/v16", "tile128x256/v4", "tile128x256/v1"}};
  const int k = static_cast<int>(pl.kind);
  if (k < 0 || k > 5) return "unknown";
  return names[k][pl.vec == 16 ? 0 : pl.vec == 4 ? 1 : 2];
}

const char* int8_mm_launch(const Int8MatmulParams& p, cudaStream_t stream) {
  if (p.M < 1 || p.N < 1) return "int8_mm (CUDA): M and N must be >= 1 (the caller skips empty outputs)";
  if (p.K < 0 || p.K > kInt8MaxK) return "int8_mm (CUDA): K out of range [0, 2**17 - 1]";
  if (p.out == nullptr || (p.K > 0 && (p.a == nullptr || p.b == nullptr)))  // K == 0: a, b may be empty (null)
    return "int8_mm (CUDA): null a, b or out";
  if (p.out_dtype == Int8OutDtype::kInt32 && (p.a_scale || p.b_scale || p.bias))
    return "int8_mm (CUDA): the int32 output takes no scales and no bias";
  if (!aligned(p.out, 8)) return "int8_mm (CUDA): out must be 8-byte aligned";
  Int8MatmulParams q = p;
  if (q.K == 0) q.a = q.b = static_cast<const int8_t*>(q.out);  // never read; keeps pointer arithmetic off null
  const Plan pl = plan_for(q);
  switch (pl.vec) {
    case 16:
      return launch_vec<16>(pl, q, stream);
    case 4:
      return launch_vec<4>(pl, q, stream);
    default:
      return launch_vec<1>(pl, q, stream);
  }
}

}  // namespace int8_cuda
}  // namespace fastattn
