// Fused residual-add + LayerNorm / RMSNorm CUDA kernels: the forward. Row layout, VEC and masking:
// add_norm_common.cuh. Torch-free on purpose.
//
// Kernels (widths for the vectorised / scalar variant)
//   fwd_rows     N <= 16384 / 8192: the row lives in registers (ELTS floats per thread: 16 for N <= 512, else 32
//                vectorised / 16 scalar); blockDim = (threads per row, rows per block), threads per row =
//                roundup32(N / ELTS), rows per block = max(1, 256 / threads per row). One warp per row up to
//                N = 1024 (vectorised), a multi-warp row-group above.
//   fwd_stream   wider rows: one 512-thread block per row walking the row in tiles; the variance and output passes
//                re-read x/residual (mostly from L2) and recompute s bit-identically.
#include "add_norm.h"
#include "add_norm_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace add_norm_cuda {
namespace {

// ------------------------------------------------------------------------------------------------ forward
// Loads one tile of row `base / N` into v: v[c*VEC + k] = s at column col0 + (c * tpr + tid) * VEC + k, 0 where
// masked. s = round_to_s_dtype(float(x) + float(residual)); stored to p.s when store_s and p.s is given.
// All loads are issued before any store (no load is ordered behind a store it might alias).
template <typename T, int ELTS, int VEC>
__device__ __forceinline__ void fwd_load_tile(const AddNormFwdParams& p, bool row_ok, size_t base, int col0,
                                              int tid, int tpr, bool store_s, float (&v)[ELTS]) {
  constexpr int kChunks = ELTS / VEC;
  static_assert(ELTS % VEC == 0, "ELTS must be a multiple of VEC");
  const int n = p.N;
  const T* __restrict__ x = static_cast<const T*>(p.x) + base;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col = col0 + (c * tpr + tid) * VEC;
    load_vec_if<T, VEC>(row_ok && col < n, x + col, &v[c * VEC]);
  }
  if (p.residual != nullptr) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int col = col0 + (c * tpr + tid) * VEC;
      float r[VEC];
      load_mixed_if<T, VEC>(row_ok && col < n, p.residual, p.residual_fp32, base + col, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c * VEC + k] += r[k];  // masked: 0 + 0
    }
  }
  if (!p.s_fp32) {
#pragma unroll
    for (int e = 0; e < ELTS; ++e) v[e] = round_to<T>(v[e]);  // masked zeros stay zero
  }
  if (store_s && p.s != nullptr) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int col = col0 + (c * tpr + tid) * VEC;
      if (row_ok && col < n) store_mixed<T, VEC>(p.s, p.s_fp32, base + col, &v[c * VEC]);
    }
  }
}

// Sum over the unmasked slots of (v - mean)^2.
template <int ELTS, int VEC>
__device__ __forceinline__ float tile_sq_dev(const float (&v)[ELTS], float mean, bool row_ok, int col0, int tid,
                                             int tpr, int n) {
  float q = 0.f;
#pragma unroll
  for (int c = 0; c < ELTS / VEC; ++c) {
    const int col = col0 + (c * tpr + tid) * VEC;
    const bool ok = row_ok && col < n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = ok ? v[c * VEC + k] - mean : 0.f;
      q += d * d;
    }
  }
  return q;
}

// y = (s - mean) * rstd * w + b for the unmasked slots of a tile (mean = 0, no bias for RMS).
template <typename T, int ELTS, int VEC>
__device__ __forceinline__ void fwd_store_tile(const AddNormFwdParams& p, bool row_ok, size_t base, int col0,
                                               int tid, int tpr, const float (&v)[ELTS], float mean, float rstd) {
  const int n = p.N;
  T* __restrict__ y = static_cast<T*>(p.y) + base;
#pragma unroll
  for (int c = 0; c < ELTS / VEC; ++c) {
    const int col = col0 + (c * tpr + tid) * VEC;
    const bool ok = row_ok && col < n;
    float w[VEC], b[VEC], o[VEC];
    if (p.weight != nullptr) {
      load_mixed_if<T, VEC>(ok, p.weight, p.weight_fp32, static_cast<size_t>(col), w);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = 1.f;
    }
    if (p.bias != nullptr) {
      load_mixed_if<T, VEC>(ok, p.bias, p.bias_fp32, static_cast<size_t>(col), b);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) b[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = (v[c * VEC + k] - mean) * rstd * w[k] + b[k];
    if (ok) store_vec<T, VEC>(y + col, o);
  }
}

// Row in registers. blockDim = (tpr, rows per block), tpr * ELTS >= N, grid = ceil(M / rows per block).
template <typename T, int ELTS, bool VECT>
__global__ void __launch_bounds__(kFwdRowsMaxThreads)
    add_norm_fwd_rows_kernel(const AddNormFwdParams p, const float inv_n) {
  constexpr int VEC = VECT ? VecOf<T>::value : 1;
  __shared__ float red[32];
  const int tid = threadIdx.x;
  const int tpr = blockDim.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.M;  // rows past M still take part in the block reductions
  const size_t base = row_ok ? static_cast<size_t>(row) * static_cast<size_t>(p.N) : 0;

  float v[ELTS];
  fwd_load_tile<T, ELTS, VEC>(p, row_ok, base, 0, tid, tpr, true, v);

  float mean = 0.f;
  float rstd;
  if (!p.is_rms) {
    float t[1] = {0.f};
#pragma unroll
    for (int e = 0; e < ELTS; ++e) t[0] += v[e];  // masked slots are 0
    row_allreduce<1>(t, red);
    mean = t[0] * inv_n;
    float q[1] = {tile_sq_dev<ELTS, VEC>(v, mean, row_ok, 0, tid, tpr, p.N)};
    row_allreduce<1>(q, red);
    rstd = rsqrtf(q[0] * inv_n + p.eps);
  } else {
    float q[1] = {0.f};
#pragma unroll
    for (int e = 0; e < ELTS; ++e) q[0] += v[e] * v[e];
    row_allreduce<1>(q, red);
    rstd = rsqrtf(q[0] * inv_n + p.eps);
  }
  if (row_ok && tid == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
  fwd_store_tile<T, ELTS, VEC>(p, row_ok, base, 0, tid, tpr, v, mean, rstd);
}

// Wide rows: one block (blockDim = (kStreamThreads, 1)) per row, grid = M. Pass 1 computes (and stores) s and its
// sum (sum of squares for RMS); LayerNorm re-reads x/residual for the centred sum of squares; the last pass
// re-reads them for y. s is recomputed bit-identically each time.
template <typename T, bool VECT>
__global__ void __launch_bounds__(kStreamThreads) add_norm_fwd_stream_kernel(const AddNormFwdParams p,
                                                                             const float inv_n) {
  constexpr int VEC = VECT ? VecOf<T>::value : 1;
  constexpr int ELTS = stream_elts(VECT);
  __shared__ float red[32];
  const int tid = threadIdx.x;
  const int tpr = blockDim.x;
  const int n = p.N;
  const int tile = tpr * ELTS;
  const int64_t row = blockIdx.x;
  const size_t base = static_cast<size_t>(row) * static_cast<size_t>(n);

  float v[ELTS];
  float acc[1] = {0.f};
#pragma unroll 1
  for (int col0 = 0; col0 < n; col0 += tile) {
    fwd_load_tile<T, ELTS, VEC>(p, true, base, col0, tid, tpr, true, v);
#pragma unroll
    for (int e = 0; e < ELTS; ++e) acc[0] += p.is_rms ? v[e] * v[e] : v[e];
  }
  row_allreduce<1>(acc, red);
  float mean = 0.f;
  float rstd;
  if (!p.is_rms) {
    mean = acc[0] * inv_n;
    float q[1] = {0.f};
#pragma unroll 1
    for (int col0 = 0; col0 < n; col0 += tile) {
      fwd_load_tile<T, ELTS, VEC>(p, true, base, col0, tid, tpr, false, v);
      q[0] += tile_sq_dev<ELTS, VEC>(v, mean, true, col0, tid, tpr, n);
    }
    row_allreduce<1>(q, red);
    rstd = rsqrtf(q[0] * inv_n + p.eps);
  } else {
    rstd = rsqrtf(acc[0] * inv_n + p.eps);
  }
  if (tid == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll 1
  for (int col0 = 0; col0 < n; col0 += tile) {
    fwd_load_tile<T, ELTS, VEC>(p, true, base, col0, tid, tpr, false, v);
    fwd_store_tile<T, ELTS, VEC>(p, true, base, col0, tid, tpr, v, mean, rstd);
  }
}

// ------------------------------------------------------------------------------------------------ host side
RowConfig fwd_config(int n, bool vec) {
  if (n <= 32 * kFwdSmallElts) return {kFwdSmallElts, 32, kTargetThreadsPerBlock / 32, false};
  if (n <= fwd_rows_max_n(vec)) {
    const int elts = fwd_elts(vec);
    const int tpr = round_up_int(ceil_div_int(n, elts), 32);  // 32 .. kFwdRowsMaxThreads
    const int rpb = tpr >= kTargetThreadsPerBlock ? 1 : kTargetThreadsPerBlock / tpr;
    return {elts, tpr, rpb, false};
  }
  return {stream_elts(vec), kStreamThreads, 1, true};
}

bool fwd_vec_ok(const AddNormFwdParams& p) {
  const int vec = 16 / dtype_size(p.dtype);
  return p.N % vec == 0 && aligned16(p.x) && aligned16(p.residual) && aligned16(p.weight) && aligned16(p.bias) &&
         aligned16(p.y) && aligned16(p.s);
}

// ---- forward dispatch
template <typename T, bool V>
void launch_fwd_typed(const AddNormFwdParams& p, const RowConfig& cfg, float inv_n, cudaStream_t stream) {
  if (cfg.stream) {
    auto kernel = add_norm_fwd_stream_kernel<T, V>;
    FA_LAUNCH(kernel, dim3(static_cast<unsigned>(p.M)), dim3(cfg.tpr, 1), stream, p, inv_n);
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div64(p.M, cfg.rpb)));
  const dim3 block(cfg.tpr, cfg.rpb);
  if (cfg.elts == kFwdSmallElts) {
    auto kernel = add_norm_fwd_rows_kernel<T, kFwdSmallElts, V>;
    FA_LAUNCH(kernel, grid, block, stream, p, inv_n);
  } else {
    auto kernel = add_norm_fwd_rows_kernel<T, fwd_elts(V), V>;
    FA_LAUNCH(kernel, grid, block, stream, p, inv_n);
  }
}

template <typename T>
void launch_fwd_vec(const AddNormFwdParams& p, const RowConfig& cfg, bool vec, float inv_n, cudaStream_t stream) {
  if (vec) {
    launch_fwd_typed<T, true>(p, cfg, inv_n, stream);
  } else {
    launch_fwd_typed<T, false>(p, cfg, inv_n, stream);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------ launchers
const char* add_norm_fwd_launch(const AddNormFwdParams& p, cudaStream_t stream) {
  if (p.N < 1 || p.N > kAddNormMaxN) return "add_norm_fwd: N must be in [1, 65536]";
  if (p.M < 0) return "add_norm_fwd: negative M";
  if (p.M == 0) return nullptr;
  if (p.x == nullptr || p.y == nullptr || p.rstd == nullptr) return "add_norm_fwd: x, y and rstd are required";
  if (p.is_rms && p.bias != nullptr) return "add_norm_fwd: RMSNorm takes no bias";
  const bool vec = fwd_vec_ok(p);
  const RowConfig cfg = fwd_config(p.N, vec);
  const int64_t blocks = cfg.stream ? p.M : ceil_div64(p.M, cfg.rpb);
  if (blocks > 0x7fffffffLL) return "add_norm_fwd: too many rows for one launch";
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(p.N));
  switch (p.dtype) {
    case AddNormDtype::kFloat32:
      launch_fwd_vec<float>(p, cfg, vec, inv_n, stream);
      break;
    case AddNormDtype::kFloat16:
      launch_fwd_vec<__half>(p, cfg, vec, inv_n, stream);
      break;
    case AddNormDtype::kBFloat16:
      launch_fwd_vec<__nv_bfloat16>(p, cfg, vec, inv_n, stream);
      break;
    default:
      return "add_norm_fwd: unsupported dtype";
  }
  return launch_status();
}

}  // namespace add_norm_cuda
}  // namespace fastattn
