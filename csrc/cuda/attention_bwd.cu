// Flash attention backward (CUDA): launcher and kernel instantiations. Kernels: attention_kernels.cuh.
// Three kernels on the caller's stream: delta = rowsum(dout * out); dK/dV per key block (looping over the GQA
// group's query heads); dQ per query block. Deterministic (no atomics).
#include "attention.h"
#include "attention_kernels.cuh"
#include "static_switch.h"

namespace fastattn {
namespace attention_cuda {
namespace {

using namespace detail;

template <typename T, int D>
const char* run_delta(const AttnBwdParams& p, cudaStream_t stream) {
  constexpr int rows_per_block = kDeltaThreads / (D / 8);
  const dim3 grid(static_cast<unsigned>((p.L + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  FA_ATTN_LAUNCH((attn_bwd_delta_kernel<T, D>), grid, dim3(kDeltaThreads), 0, stream, p);
  return launch_error();
}

template <typename T, int D, bool kCausal, bool kHasMask>
const char* run_dkdv(const AttnBwdParams& p, cudaStream_t stream) {
  constexpr int smem = bwd_dkdv_smem_bytes<T, D>();
  auto kernel = attn_bwd_dkdv_kernel<T, D, kCausal, kHasMask>;
  if (const char* err = prepare_smem(kernel, smem)) return err;
  const dim3 grid(static_cast<unsigned>((p.S + Cfg<D>::kBwdBlock - 1) / Cfg<D>::kBwdBlock),
                  static_cast<unsigned>(p.Hk), static_cast<unsigned>(p.B));
  FA_ATTN_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
  return launch_error();
}

template <typename T, int D, bool kCausal, bool kHasMask>
const char* run_dq(const AttnBwdParams& p, cudaStream_t stream) {
  constexpr int smem = bwd_dq_smem_bytes<T, D>();
  auto kernel = attn_bwd_dq_kernel<T, D, kCausal, kHasMask>;
  if (const char* err = prepare_smem(kernel, smem)) return err;
  const dim3 grid(static_cast<unsigned>((p.L + Cfg<D>::kBwdBlock - 1) / Cfg<D>::kBwdBlock),
                  static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
  FA_ATTN_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
  return launch_error();
}

template <typename T, int D, bool kCausal, bool kHasMask>
const char* run_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  if (p.L > 0) {
    if (const char* err = run_delta<T, D>(p, stream)) return err;
  }
  if (p.S > 0) {
    if (const char* err = run_dkdv<T, D, kCausal, kHasMask>(p, stream)) return err;
  }
  if (p.L > 0) {
    if (const char* err = run_dq<T, D, kCausal, kHasMask>(p, stream)) return err;
  }
  return nullptr;
}

}  // namespace

size_t attention_bwd_workspace_floats(const AttnBwdParams& p) {
  return static_cast<size_t>(p.B < 0 ? 0 : p.B) * static_cast<size_t>(p.H < 0 ? 0 : p.H) *
         static_cast<size_t>(p.L < 0 ? 0 : p.L);
}

const char* attention_bwd_launch(const AttnBwdParams& p, cudaStream_t stream) {
  if (const char* err = check_sizes(p.B, p.H, p.Hk, p.L, p.S, p.D)) return err;
  if (p.B == 0 || p.H == 0 || (p.L == 0 && p.S == 0)) return nullptr;
  if (p.L > 0 && (!tensor_ok(p.q) || !tensor_ok(p.out) || !tensor_ok(p.dout) || !tensor_ok(p.dq) ||
                  p.lse == nullptr || p.delta == nullptr))
    return "attention_bwd (CUDA): q / out / dout / dq must be 16-byte aligned with strides that are multiples of 8 "
           "elements, and lse / the workspace given";
  if (p.S > 0 && (!tensor_ok(p.k) || !tensor_ok(p.v) || !tensor_ok(p.dk) || !tensor_ok(p.dv)))
    return "attention_bwd (CUDA): k / v / dk / dv must be 16-byte aligned with strides that are multiples of 8 "
           "elements";
  if (p.dtype != AttnDtype::kFloat16 && p.dtype != AttnDtype::kBFloat16) return "attention_bwd (CUDA): bad dtype";
  const char* err = nullptr;
  const bool ran = HEADDIM_SWITCH(p.D, kD, [&] {
    BOOL_SWITCH(p.causal, kCausal, [&] {
      BOOL_SWITCH(p.mask.ptr != nullptr, kHasMask, [&] {
        err = p.dtype == AttnDtype::kFloat16 ? run_bwd<__half, kD, kCausal, kHasMask>(p, stream)
                                             : run_bwd<__nv_bfloat16, kD, kCausal, kHasMask>(p, stream);
      });
    });
  });
  if (!ran) return "attention_bwd (CUDA): head dim must be 32, 64 or 128";
  return err;
}

}  // namespace attention_cuda
}  // namespace fastattn
