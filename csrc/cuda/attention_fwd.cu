// Flash attention forward (CUDA): launcher and kernel instantiations. Kernels: attention_kernels.cuh.
#include "attention.h"
#include "attention_kernels.cuh"
#include "static_switch.h"

namespace fastattn {
namespace attention_cuda {
namespace {

using namespace detail;

template <typename T, int D, bool kCausal, bool kHasMask>
const char* run_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<T, D>();
  auto kernel = attn_fwd_kernel<T, D, kCausal, kHasMask>;
  if (const char* err = prepare_smem(kernel, smem)) return err;
  const dim3 grid(static_cast<unsigned>((p.L + Cfg<D>::kFwdBM - 1) / Cfg<D>::kFwdBM), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  FA_ATTN_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
  return launch_error();
}

}  // namespace

const char* attention_fwd_launch(const AttnFwdParams& p, cudaStream_t stream) {
  if (const char* err = check_sizes(p.B, p.H, p.Hk, p.L, p.S, p.D)) return err;
  if (p.B == 0 || p.H == 0 || p.L == 0) return nullptr;
  if (!tensor_ok(p.q) || !tensor_ok(p.out) || p.lse == nullptr)
    return "attention_fwd (CUDA): q / out must be 16-byte aligned with strides that are multiples of 8 elements";
  if (p.S > 0 && (!tensor_ok(p.k) || !tensor_ok(p.v)))
    return "attention_fwd (CUDA): k / v must be 16-byte aligned with strides that are multiples of 8 elements";
  if (p.dtype != AttnDtype::kFloat16 && p.dtype != AttnDtype::kBFloat16) return "attention_fwd (CUDA): bad dtype";
  const char* err = nullptr;
  const bool ran = HEADDIM_SWITCH(p.D, kD, [&] {
    BOOL_SWITCH(p.causal, kCausal, [&] {
      BOOL_SWITCH(p.mask.ptr != nullptr, kHasMask, [&] {
        err = p.dtype == AttnDtype::kFloat16 ? run_fwd<__half, kD, kCausal, kHasMask>(p, stream)
                                             : run_fwd<__nv_bfloat16, kD, kCausal, kHasMask>(p, stream);
      });
    });
  });
  if (!ran) return "attention_fwd (CUDA): head dim must be 32, 64 or 128";
  return err;
}

}  // namespace attention_cuda
}  // namespace fastattn
