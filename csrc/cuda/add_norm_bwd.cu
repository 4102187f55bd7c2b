// Fused residual-add + LayerNorm / RMSNorm CUDA kernels: the backward. Row layout, VEC and masking:
// add_norm_common.cuh. Torch-free on purpose.
//
// Kernels (widths for the vectorised / scalar variant)
//   bwd_rows     N <= 8192 / 4096: row in registers (16 / 8 elements per thread), grid = min(row-groups needed,
//                occupancy x SMs), grid-stride over rows; each row-group accumulates dweight/dbias for its columns
//                in registers and writes one partial row of a float32 workspace at the end.
//   bwd_stream   wider rows: one 512-thread block per row, dx (and dres) only, two passes over the row tiles;
//                dweight/dbias partials then come from dwdb_cols (column strips x row splits).
//   col_reduce   sums the partial rows of the workspace in a fixed order -> dweight / dbias (deterministic: no
//                atomics, the partition depends only on the shapes and the device's SM count / occupancy).
#include "add_norm.h"
#include "add_norm_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace add_norm_cuda {
namespace {

// ------------------------------------------------------------------------------------------------ backward
// One tile of a row: xh = (s - mean) * rstd, g = dy * w (both 0 where masked); sums[0] += g, sums[1] += g * xh.
// ACC: also dwa += dy * xh, dba += dy (per-thread column accumulators of dweight / dbias).
template <typename T, int ELTS, int VEC, bool ACC>
__device__ __forceinline__ void bwd_load_tile(const AddNormBwdParams& p, bool row_ok, size_t base, int col0,
                                              int tid, int tpr, float mean, float rstd, float (&xh)[ELTS],
                                              float (&g)[ELTS], float (&sums)[2], float* __restrict__ dwa,
                                              float* __restrict__ dba) {
  constexpr int kChunks = ELTS / VEC;
  static_assert(ELTS % VEC == 0, "ELTS must be a multiple of VEC");
  const int n = p.N;
  const T* __restrict__ dy = static_cast<const T*>(p.dy) + base;
  // every load of the tile first: dy -> g, s -> xh
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col = col0 + (c * tpr + tid) * VEC;
    const bool ok = row_ok && col < n;
    load_vec_if<T, VEC>(ok, dy + col, &g[c * VEC]);
    load_mixed_if<T, VEC>(ok, p.s, p.s_fp32, base + col, &xh[c * VEC]);
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col = col0 + (c * tpr + tid) * VEC;
    const bool ok = row_ok && col < n;
    float w[VEC];
    if (p.weight != nullptr) {
      load_mixed_if<T, VEC>(ok, p.weight, p.weight_fp32, static_cast<size_t>(col), w);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = 1.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int e = c * VEC + k;
      const float dyv = g[e];                                // 0 where masked
      const float xv = ok ? (xh[e] - mean) * rstd : 0.f;
      const float gv = dyv * w[k];
      xh[e] = xv;
      g[e] = gv;
      if constexpr (ACC) {
        dwa[e] += dyv * xv;
        dba[e] += dyv;
      }
      sums[0] += gv;
      sums[1] += gv * xv;
    }
  }
}

// dsum = rstd * (g - mg - xh * mgx) (+ ds) -> dx (x dtype) and dres (float32) for the unmasked slots of a tile.
// Overwrites g. Loads (ds) come before the stores.
template <typename T, int ELTS, int VEC>
__device__ __forceinline__ void bwd_store_tile(const AddNormBwdParams& p, bool row_ok, size_t base, int col0,
                                               int tid, int tpr, const float (&xh)[ELTS], float (&g)[ELTS],
                                               float rstd, float mg, float mgx) {
  constexpr int kChunks = ELTS / VEC;
  const int n = p.N;
#pragma unroll
  for (int e = 0; e < ELTS; ++e) g[e] = rstd * (g[e] - mg - xh[e] * mgx);
  if (p.ds != nullptr) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int col = col0 + (c * tpr + tid) * VEC;
      float d[VEC];
      load_mixed_if<T, VEC>(row_ok && col < n, p.ds, p.s_fp32, base + col, d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[c * VEC + k] += d[k];
    }
  }
  T* __restrict__ dx = static_cast<T*>(p.dx) + base;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col = col0 + (c * tpr + tid) * VEC;
    if (row_ok && col < n) {
      store_vec<T, VEC>(dx + col, &g[c * VEC]);
      if (p.dres != nullptr) store_vec<float, VEC>(p.dres + base + col, &g[c * VEC]);
    }
  }
}

// Row in registers + fused dweight/dbias partials. blockDim = (tpr, rpb), tpr * ELTS >= N. Row-group (blockIdx.x,
// threadIdx.y) handles rows blockIdx.x * rpb + y + k * gridDim.x * rpb (the loop bound is block-uniform) and
// finally writes its column sums to partial row blockIdx.x * rpb + y of dw_part / db_part (gridDim.x * rpb rows of
// N floats each; every partial row is written, zeros for a row-group without rows).
template <typename T, int ELTS, bool VECT>
__global__ void __launch_bounds__(kBwdRowsMaxThreads)
    add_norm_bwd_rows_kernel(const AddNormBwdParams p, const float inv_n, float* __restrict__ dw_part,
                             float* __restrict__ db_part) {
  constexpr int VEC = VECT ? VecOf<T>::value : 1;
  constexpr int kChunks = ELTS / VEC;
  __shared__ float red[2 * 32];
  const int tid = threadIdx.x;
  const int tpr = blockDim.x;
  const int rpb = blockDim.y;
  const size_t n = static_cast<size_t>(p.N);

  float dwa[ELTS], dba[ELTS];
#pragma unroll
  for (int e = 0; e < ELTS; ++e) {
    dwa[e] = 0.f;
    dba[e] = 0.f;
  }
  const int64_t step = static_cast<int64_t>(gridDim.x) * rpb;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * rpb; row0 < p.M; row0 += step) {
    const int64_t row = row0 + threadIdx.y;
    const bool row_ok = row < p.M;
    const size_t base = row_ok ? static_cast<size_t>(row) * n : 0;
    float mean = 0.f, rstd = 0.f;
    if (row_ok) {
      rstd = p.rstd[row];
      if (!p.is_rms) mean = p.mean[row];
    }
    float xh[ELTS], g[ELTS];
    float sums[2] = {0.f, 0.f};
    bwd_load_tile<T, ELTS, VEC, true>(p, row_ok, base, 0, tid, tpr, mean, rstd, xh, g, sums, dwa, dba);
    row_allreduce<2>(sums, red);
    const float mg = p.is_rms ? 0.f : sums[0] * inv_n;
    const float mgx = sums[1] * inv_n;
    bwd_store_tile<T, ELTS, VEC>(p, row_ok, base, 0, tid, tpr, xh, g, rstd, mg, mgx);
  }

  const size_t prow = static_cast<size_t>(blockIdx.x) * rpb + threadIdx.y;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col = (c * tpr + tid) * VEC;
    if (col < p.N) {
      if (dw_part != nullptr) store_vec<float, VEC>(dw_part + prow * n + col, &dwa[c * VEC]);
      if (db_part != nullptr) store_vec<float, VEC>(db_part + prow * n + col, &dba[c * VEC]);
    }
  }
}

// Wide rows, dx / dres only: one block (kStreamThreads, 1) per row, grid = M; two passes over the row tiles.
template <typename T, bool VECT>
__global__ void __launch_bounds__(kStreamThreads) add_norm_bwd_stream_kernel(const AddNormBwdParams p,
                                                                             const float inv_n) {
  constexpr int VEC = VECT ? VecOf<T>::value : 1;
  constexpr int ELTS = stream_elts(VECT);
  __shared__ float red[2 * 32];
  const int tid = threadIdx.x;
  const int tpr = blockDim.x;
  const int n = p.N;
  const int tile = tpr * ELTS;
  const int64_t row = blockIdx.x;
  const size_t base = static_cast<size_t>(row) * static_cast<size_t>(n);
  const float rstd = p.rstd[row];
  const float mean = p.is_rms ? 0.f : p.mean[row];

  float xh[ELTS], g[ELTS];
  float sums[2] = {0.f, 0.f};
#pragma unroll 1
  for (int col0 = 0; col0 < n; col0 += tile) {
    bwd_load_tile<T, ELTS, VEC, false>(p, true, base, col0, tid, tpr, mean, rstd, xh, g, sums, nullptr, nullptr);
  }
  row_allreduce<2>(sums, red);
  const float mg = p.is_rms ? 0.f : sums[0] * inv_n;
  const float mgx = sums[1] * inv_n;
#pragma unroll 1
  for (int col0 = 0; col0 < n; col0 += tile) {
    float unused[2] = {0.f, 0.f};
    bwd_load_tile<T, ELTS, VEC, false>(p, true, base, col0, tid, tpr, mean, rstd, xh, g, unused, nullptr,
                                       nullptr);
    bwd_store_tile<T, ELTS, VEC>(p, true, base, col0, tid, tpr, xh, g, rstd, mg, mgx);
  }
}

// dweight / dbias partials for the wide-row path. blockDim = (32, 8); block (bx, by) owns columns
// [bx * 32 * VEC, (bx + 1) * 32 * VEC) and rows [by * rows_per_split, min(M, (by + 1) * rows_per_split)); it writes
// partial row `by` (gridDim.y rows of N floats) of dw_part / db_part.
template <typename T, bool VECT>
__global__ void __launch_bounds__(kColThreadsX * kColThreadsY)
    add_norm_dwdb_cols_kernel(const AddNormBwdParams p, const int64_t rows_per_split, float* __restrict__ dw_part,
                              float* __restrict__ db_part) {
  constexpr int VEC = VECT ? VecOf<T>::value : 1;
  __shared__ float sw[kColThreadsY][kColThreadsX * VEC];
  __shared__ float sb[kColThreadsY][kColThreadsX * VEC];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int n = p.N;
  const int col = (blockIdx.x * kColThreadsX + tx) * VEC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < p.M ? r0 + rows_per_split : p.M;

  float aw[VEC], ab[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    aw[k] = 0.f;
    ab[k] = 0.f;
  }
  if (col < n) {
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
#pragma unroll 2
    for (int64_t row = r0 + ty; row < r1; row += kColThreadsY) {
      const size_t i = static_cast<size_t>(row) * static_cast<size_t>(n) + col;
      const float rstd = p.rstd[row];
      const float mean = p.is_rms ? 0.f : p.mean[row];
      float d[VEC], s[VEC];
      load_vec_if<T, VEC>(true, dy + i, d);
      load_mixed_if<T, VEC>(true, p.s, p.s_fp32, i, s);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        aw[k] += d[k] * ((s[k] - mean) * rstd);
        ab[k] += d[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sw[ty][tx * VEC + k] = aw[k];
    sb[ty][tx * VEC + k] = ab[k];
  }
  __syncthreads();
  if (ty == 0 && col < n) {
#pragma unroll
    for (int j = 1; j < kColThreadsY; ++j) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        aw[k] += sw[j][tx * VEC + k];
        ab[k] += sb[j][tx * VEC + k];
      }
    }
    const size_t o = static_cast<size_t>(blockIdx.y) * static_cast<size_t>(n) + col;
    if (dw_part != nullptr) store_vec<float, VEC>(dw_part + o, aw);
    if (db_part != nullptr) store_vec<float, VEC>(db_part + o, ab);
  }
}

// out[j] = sum over the P partial rows of part[p * N + j], in a fixed order. blockDim = (32, 8),
// grid = ceil(N / 32).
__global__ void __launch_bounds__(kColThreadsX * kColThreadsY)
    add_norm_col_reduce_kernel(const float* __restrict__ part, const int64_t P, const int N,
                               float* __restrict__ out) {
  __shared__ float sh[kColThreadsY][kColThreadsX + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int col = blockIdx.x * kColThreadsX + tx;
  float acc = 0.f;
  if (col < N) {
#pragma unroll 4
    for (int64_t r = ty; r < P; r += kColThreadsY) acc += part[static_cast<size_t>(r) * N + col];
  }
  sh[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < N) {
    float t = sh[0][tx];
#pragma unroll
    for (int j = 1; j < kColThreadsY; ++j) t += sh[j][tx];
    out[col] = t;
  }
}

// ------------------------------------------------------------------------------------------------ host side
RowConfig bwd_config(int n, bool vec) {
  if (n <= bwd_rows_max_n(vec)) {
    const int tpr = round_up_int(ceil_div_int(n, bwd_elts(vec)), 32);  // 32 .. kBwdRowsMaxThreads
    const int rpb = tpr >= kTargetThreadsPerBlock ? 1 : kTargetThreadsPerBlock / tpr;
    return {bwd_elts(vec), tpr, rpb, false};
  }
  return {stream_elts(vec), kStreamThreads, 1, true};
}

bool bwd_vec_ok(const AddNormBwdParams& p) {
  const int vec = 16 / dtype_size(p.dtype);
  return p.N % vec == 0 && aligned16(p.dy) && aligned16(p.s) && aligned16(p.weight) && aligned16(p.ds) &&
         aligned16(p.dx) && aligned16(p.dres);
}

// ---- backward dispatch
template <typename T, bool V>
const void* bwd_rows_kernel_ptr() {
  return reinterpret_cast<const void*>(add_norm_bwd_rows_kernel<T, bwd_elts(V), V>);
}

const void* bwd_rows_kernel_for(AddNormDtype d, bool vec) {
  switch (d) {
    case AddNormDtype::kFloat32:
      return vec ? bwd_rows_kernel_ptr<float, true>() : bwd_rows_kernel_ptr<float, false>();
    case AddNormDtype::kFloat16:
      return vec ? bwd_rows_kernel_ptr<__half, true>() : bwd_rows_kernel_ptr<__half, false>();
    case AddNormDtype::kBFloat16:
      return vec ? bwd_rows_kernel_ptr<__nv_bfloat16, true>() : bwd_rows_kernel_ptr<__nv_bfloat16, false>();
  }
  return nullptr;
}

// Resident blocks per SM of the backward row kernel (cached per device / dtype / variant / block size: the plan is
// made twice per call, and the occupancy query is not free).
const char* bwd_rows_blocks_per_sm(AddNormDtype d, bool vec, int threads, int* blocks_per_sm) {
  constexpr int kMaxDevices = 64;
  constexpr int kSizes = kBwdRowsMaxThreads / 32 + 1;
  static std::atomic<int> cache[kMaxDevices][3][2][kSizes];  // 0 = not yet queried
  int device = 0;
  const cudaError_t derr = cudaGetDevice(&device);
  if (derr != cudaSuccess) return cudaGetErrorString(derr);
  const int di = static_cast<int>(d);
  const int si = threads / 32;
  const bool cacheable = device >= 0 && device < kMaxDevices && di >= 0 && di < 3 && threads % 32 == 0 &&
                         si < kSizes;
  if (cacheable) {
    const int v = cache[device][di][vec ? 1 : 0][si].load(std::memory_order_relaxed);
    if (v > 0) {
      *blocks_per_sm = v;
      return nullptr;
    }
  }
  int n = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, bwd_rows_kernel_for(d, vec), threads, 0);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (n < 1) return "add_norm_bwd: the row kernel does not fit on a multiprocessor";
  if (cacheable) cache[device][di][vec ? 1 : 0][si].store(n, std::memory_order_relaxed);
  *blocks_per_sm = n;
  return nullptr;
}

struct BwdPlan {
  RowConfig cfg;
  bool vec = false;
  int64_t grid = 0;           // blocks of the row kernel
  int col_grid_x = 0;         // stream path: dwdb_cols grid
  int64_t splits = 0;         //   gridDim.y of dwdb_cols
  int64_t rows_per_split = 0;
  int64_t partial_rows = 0;   // P: partial rows per requested gradient
  int n_grads = 0;            // dweight and/or dbias requested
  size_t workspace_floats = 0;
};

const char* make_bwd_plan(const AddNormBwdParams& p, BwdPlan* plan) {
  if (p.N < 1 || p.N > kAddNormMaxN) return "add_norm_bwd: N must be in [1, 65536]";
  if (p.M < 0) return "add_norm_bwd: negative M";
  if (p.dtype != AddNormDtype::kFloat32 && p.dtype != AddNormDtype::kFloat16 && p.dtype != AddNormDtype::kBFloat16) {
    return "add_norm_bwd: unsupported dtype";
  }
  BwdPlan pl;
  pl.vec = bwd_vec_ok(p);
  pl.cfg = bwd_config(p.N, pl.vec);
  pl.n_grads = (p.dweight != nullptr ? 1 : 0) + (p.dbias != nullptr ? 1 : 0);
  const int num_sms = p.num_sms > 0 ? p.num_sms : 1;
  if (p.M == 0) {
    *plan = pl;
    return nullptr;
  }
  if (!pl.cfg.stream) {
    int blocks_per_sm = 0;
    const char* err = bwd_rows_blocks_per_sm(p.dtype, pl.vec, pl.cfg.tpr * pl.cfg.rpb, &blocks_per_sm);
    if (err != nullptr) return err;
    const int64_t want = ceil_div64(p.M, pl.cfg.rpb);
    const int64_t cap = static_cast<int64_t>(blocks_per_sm) * num_sms;
    pl.grid = want < cap ? want : cap;
    pl.partial_rows = pl.grid * pl.cfg.rpb;
  } else {
    if (p.M > 0x7fffffffLL) return "add_norm_bwd: too many rows";
    pl.grid = p.M;
    const int vec = pl.vec ? 16 / dtype_size(p.dtype) : 1;
    pl.col_grid_x = ceil_div_int(p.N, kColThreadsX * vec);
    // about 8 blocks of 256 threads per SM, at least 8 rows (one per threadIdx.y) per split
    int64_t splits = ceil_div64(static_cast<int64_t>(8) * num_sms, pl.col_grid_x);
    const int64_t max_splits = ceil_div64(p.M, kColThreadsY);
    if (splits > max_splits) splits = max_splits;
    if (splits > 65535) splits = 65535;
    if (splits < 1) splits = 1;
    pl.rows_per_split = ceil_div64(p.M, splits);
    pl.splits = ceil_div64(p.M, pl.rows_per_split);  // every split has >= 1 row
    pl.partial_rows = pl.splits;
  }
  if (pl.n_grads > 0) {
    pl.workspace_floats = static_cast<size_t>(pl.partial_rows) * static_cast<size_t>(p.N) * pl.n_grads;
  }
  *plan = pl;
  return nullptr;
}

template <typename T, bool V>
void launch_bwd_typed(const AddNormBwdParams& p, const BwdPlan& pl, float inv_n, float* dw_part, float* db_part,
                      cudaStream_t stream) {
  if (!pl.cfg.stream) {
    auto kernel = add_norm_bwd_rows_kernel<T, bwd_elts(V), V>;
    FA_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.grid)), dim3(pl.cfg.tpr, pl.cfg.rpb), stream, p, inv_n,
              dw_part, db_part);
    return;
  }
  auto kernel = add_norm_bwd_stream_kernel<T, V>;
  FA_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.grid)), dim3(pl.cfg.tpr, 1), stream, p, inv_n);
  if (pl.n_grads > 0) {
    auto cols = add_norm_dwdb_cols_kernel<T, V>;
    FA_LAUNCH(cols, dim3(static_cast<unsigned>(pl.col_grid_x), static_cast<unsigned>(pl.splits)),
              dim3(kColThreadsX, kColThreadsY), stream, p, pl.rows_per_split, dw_part, db_part);
  }
}

template <typename T>
void launch_bwd_vec(const AddNormBwdParams& p, const BwdPlan& pl, float inv_n, float* dw_part, float* db_part,
                    cudaStream_t stream) {
  if (pl.vec) {
    launch_bwd_typed<T, true>(p, pl, inv_n, dw_part, db_part, stream);
  } else {
    launch_bwd_typed<T, false>(p, pl, inv_n, dw_part, db_part, stream);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------ launchers
const char* add_norm_bwd_workspace_size(const AddNormBwdParams& p, size_t* workspace_floats) {
  BwdPlan pl;
  const char* err = make_bwd_plan(p, &pl);
  if (err != nullptr) return err;
  *workspace_floats = pl.workspace_floats;
  return nullptr;
}

const char* add_norm_bwd_launch(const AddNormBwdParams& p, float* workspace, size_t workspace_floats,
                                cudaStream_t stream) {
  BwdPlan pl;
  const char* err = make_bwd_plan(p, &pl);
  if (err != nullptr) return err;
  if (p.M == 0) return nullptr;
  if (p.dy == nullptr || p.s == nullptr || p.rstd == nullptr || p.dx == nullptr) {
    return "add_norm_bwd: dy, s, rstd and dx are required";
  }
  if (!p.is_rms && p.mean == nullptr) return "add_norm_bwd: mean is required for LayerNorm";
  if (pl.n_grads > 0) {
    if (workspace == nullptr || workspace_floats < pl.workspace_floats) {
      return "add_norm_bwd: workspace missing or smaller than add_norm_bwd_workspace_size";
    }
    if (!aligned16(workspace)) return "add_norm_bwd: workspace must be 16-byte aligned";
  }
  const size_t part = static_cast<size_t>(pl.partial_rows) * static_cast<size_t>(p.N);
  float* dw_part = p.dweight != nullptr ? workspace : nullptr;
  float* db_part = p.dbias != nullptr ? (p.dweight != nullptr ? workspace + part : workspace) : nullptr;
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(p.N));
  switch (p.dtype) {
    case AddNormDtype::kFloat32:
      launch_bwd_vec<float>(p, pl, inv_n, dw_part, db_part, stream);
      break;
    case AddNormDtype::kFloat16:
      launch_bwd_vec<__half>(p, pl, inv_n, dw_part, db_part, stream);
      break;
    case AddNormDtype::kBFloat16:
      launch_bwd_vec<__nv_bfloat16>(p, pl, inv_n, dw_part, db_part, stream);
      break;
  }
  const char* status = launch_status();
  if (status != nullptr) return status;
  const dim3 rgrid(static_cast<unsigned>(ceil_div_int(p.N, kColThreadsX)));
  const dim3 rblock(kColThreadsX, kColThreadsY);
  if (p.dweight != nullptr) {
    auto kernel = add_norm_col_reduce_kernel;
    FA_LAUNCH(kernel, rgrid, rblock, stream, dw_part, pl.partial_rows, p.N, p.dweight);
  }
  if (p.dbias != nullptr) {
    auto kernel = add_norm_col_reduce_kernel;
    FA_LAUNCH(kernel, rgrid, rblock, stream, db_part, pl.partial_rows, p.N, p.dbias);
  }
  return launch_status();
}

}  // namespace add_norm_cuda
}  // namespace fastattn
