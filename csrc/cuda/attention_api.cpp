// Torch binding of the CUDA flash attention kernels (attention_fwd.cu, attention_bwd.cu).
// Thin binding, fat checks: every argument is validated here (device, dtype, dims, shapes, strides, supported
// features), outputs and the backward workspace are allocated with torch, and the kernels run on the current
// stream of the inputs' device.
//
//   attention_fwd_cuda(q, k, v, mask, alibi, scale, causal, diag_offset, window_left, window_right, softcap,
//                      dropout_p, seed, offset) -> [out (B, H, L, E) q.dtype, lse (B, H, L) float32]
//   attention_bwd_cuda(dout, q, k, v, out, lse, mask, alibi, <the same 9 scalars>) -> [dq, dk, dv]
// q (B, H, L, E), k / v (B, Hk, S, E), fp16 or bf16, any strides with stride(-1) == 1; E in {32, 64, 128};
// H % Hk == 0; mask None or a bool (B, H, L, S) view (stride 0 broadcasts allowed); lse +inf for rows with no key.
// alibi, a window, softcap > 0 and dropout_p > 0 are refused (the Python dispatcher sends those to Triton).
#include <torch/extension.h>

#include "../check.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "registry.h"

namespace fastattn {
namespace {

namespace knl = attention_cuda;

constexpr const char* kFwd = "attention_fwd_cuda";
constexpr const char* kBwd = "attention_bwd_cuda";

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// A defined, strided CUDA tensor on `device` (device == nullptr: any CUDA device).
void check_cuda(const at::Tensor& t, const char* fn, const char* name, const at::Device* device) {
  FA_CHECK(t.defined(), fn, ": ", name, " is undefined");
  FA_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  FA_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
  if (device != nullptr) {
    FA_CHECK(t.device() == *device, fn, ": ", name, " is on ", t.device(), " but query is on ", *device);
  }
}

// A (B, heads, rows, E) fp16 / bf16 tensor of `dtype` with a contiguous last dim.
void check_bhld(const at::Tensor& t, const char* fn, const char* name, const at::Device& device,
                at::ScalarType dtype) {
  check_cuda(t, fn, name, &device);
  FA_CHECK(t.dim() == 4, fn, ": ", name, " must be 4-D (B, heads, seq_len, head_dim), got shape ", t.sizes());
  FA_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, " (the dtype of query), got ",
           t.scalar_type());
  FA_CHECK(t.stride(3) == 1, fn, ": ", name, " must have a contiguous last dim (stride(-1) == 1), got strides ",
           t.strides());
}

// The kernels need 16-byte aligned rows: data pointer and the strides of every non-trivial dim a multiple of 8
// elements. Anything else is copied into a fresh contiguous tensor (a torch allocation: aligned).
at::Tensor aligned_rows(const at::Tensor& t) {
  bool ok = (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0 && t.stride(-1) == 1;
  for (int d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  if (ok) return t;
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)).copy_(t);
}

knl::AttnTensor kernel_tensor(const at::Tensor& t) {
  knl::AttnTensor r;
  r.ptr = t.data_ptr();
  // a size-1 dim is never stepped over: its stride is irrelevant (and may be anything torch chose)
  r.sb = t.size(0) > 1 ? t.stride(0) : 0;
  r.sh = t.size(1) > 1 ? t.stride(1) : 0;
  r.sr = t.size(2) > 1 ? t.stride(2) : 0;
  return r;
}

knl::AttnDtype kernel_dtype(at::ScalarType t) {
  return t == at::kHalf ? knl::AttnDtype::kFloat16 : knl::AttnDtype::kBFloat16;
}

struct Problem {
  int64_t B, H, Hk, L, S, E;
};

// q, k, v: dtypes, dims, shapes, head dims, GQA, size limits. Returns the sizes.
Problem check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* fn) {
  check_cuda(q, fn, "q", nullptr);
  const at::Device device = q.device();
  const at::ScalarType dt = q.scalar_type();
  FA_CHECK(dt == at::kHalf || dt == at::kBFloat16, fn, ": q must be float16 or bfloat16, got ", dt,
           " (float32 / float64 run on the Triton / reference backends)");
  check_bhld(q, fn, "q", device, dt);
  check_bhld(k, fn, "k", device, dt);
  check_bhld(v, fn, "v", device, dt);
  Problem pr{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  FA_CHECK(k.size(0) == pr.B && v.size(0) == pr.B, fn, ": k and v must have q's batch size ", pr.B,
           ", got shapes ", k.sizes(), " and ", v.sizes());
  FA_CHECK(k.size(3) == pr.E, fn, ": k's head dim ", k.size(3), " != q's ", pr.E);
  FA_CHECK(v.size(1) == pr.Hk && v.size(2) == pr.S, fn, ": v must have k's heads and length (", pr.Hk, ", ",
           pr.S, "), got shape ", v.sizes());
  FA_CHECK(v.size(3) == pr.E, fn, ": v's head dim ", v.size(3),
           " != q's head dim ", pr.E, " (the CUDA kernel needs Ev == E)");
  FA_CHECK(pr.E == 32 || pr.E == 64 || pr.E == 128, fn, ": head dim ", pr.E,
           " is not supported by the CUDA kernel (32, 64 or 128)");
  FA_CHECK(pr.Hk >= 1 && pr.H % pr.Hk == 0, fn, ": q's ", pr.H, " heads must be a multiple of k's ", pr.Hk,
           " heads");
  FA_CHECK(pr.B <= 65535 && pr.H <= 65535, fn, ": batch size ", pr.B, " and query heads ", pr.H,
           " must each be at most 65535");
  FA_CHECK(pr.L <= INT_MAX && pr.S <= INT_MAX, fn, ": sequence lengths must be below 2^31, got L = ", pr.L,
           ", S = ", pr.S);
  return pr;
}

// Only the features the kernel implements: no ALiBi, no window, no softcap, no dropout; mask None or bool.
knl::AttnMask check_features(const Problem& pr, const c10::optional<at::Tensor>& mask,
                             const c10::optional<at::Tensor>& alibi, int64_t window_left, int64_t window_right,
                             double softcap, double dropout_p, const at::Device& device, const char* fn) {
  FA_CHECK(present(alibi) == nullptr, fn, ": alibi slopes are not implemented in the CUDA kernel (pass None)");
  FA_CHECK(window_left == -1 && window_right == -1, fn,
           ": a local window is not implemented in the CUDA kernel (window must be (-1, -1), got (", window_left,
           ", ", window_right, "))");
  FA_CHECK(!(softcap > 0.0), fn, ": softcap is not implemented in the CUDA kernel (must be 0, got ", softcap,
           ")");
  FA_CHECK(!(dropout_p > 0.0), fn, ": dropout is not implemented in the CUDA kernel (dropout_p must be 0, got ",
           dropout_p, ")");
  knl::AttnMask m;
  const at::Tensor* mk = present(mask);
  if (mk != nullptr) {
    check_cuda(*mk, fn, "mask", &device);
    FA_CHECK(mk->scalar_type() == at::kBool, fn, ": mask must be bool (True = take part), got ",
             mk->scalar_type(), " (float masks run on the Triton backend)");
    FA_CHECK(mk->dim() == 4 && mk->size(0) == pr.B && mk->size(1) == pr.H && mk->size(2) == pr.L &&
                    mk->size(3) == pr.S,
             fn, ": mask must have shape (B, H, L, S) = (", pr.B, ", ", pr.H, ", ", pr.L, ", ", pr.S,
             ") (broadcast dims as stride-0 views), got ", mk->sizes());
    m.ptr = reinterpret_cast<const uint8_t*>(mk->data_ptr());
    m.sb = mk->size(0) > 1 ? mk->stride(0) : 0;
    m.sh = mk->size(1) > 1 ? mk->stride(1) : 0;
    m.sl = mk->size(2) > 1 ? mk->stride(2) : 0;
    m.ss = mk->size(3) > 1 ? mk->stride(3) : 0;
  }
  return m;
}

std::vector<at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& alibi, double scale, bool causal,
                                           int64_t diag_offset, int64_t window_left, int64_t window_right,
                                           double softcap, double dropout_p, int64_t seed, int64_t offset) {
  (void)seed;
  (void)offset;
  const Problem pr = check_qkv(q, k, v, kFwd);
  const at::Device device = q.device();
  const knl::AttnMask m = check_features(pr, mask, alibi, window_left, window_right, softcap, dropout_p, device,
                                         kFwd);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({pr.B, pr.H, pr.L, pr.E}, q.options());
  at::Tensor lse = at::empty({pr.B, pr.H, pr.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const at::Tensor qa = aligned_rows(q), ka = aligned_rows(k), va = aligned_rows(v);
  knl::AttnFwdParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.B = static_cast<int>(pr.B);
  p.H = static_cast<int>(pr.H);
  p.Hk = static_cast<int>(pr.Hk);
  p.L = static_cast<int>(pr.L);
  p.S = static_cast<int>(pr.S);
  p.D = static_cast<int>(pr.E);
  p.q = kernel_tensor(qa);
  p.k = kernel_tensor(ka);
  p.v = kernel_tensor(va);
  p.mask = m;
  p.out = kernel_tensor(out);
  p.lse = lse.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.diag_offset = diag_offset;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* err = knl::attention_fwd_launch(p, stream);
  FA_CHECK(err == nullptr, kFwd, ": kernel launch failed: ", err);
  return {out, lse};
}

std::vector<at::Tensor> attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& alibi, double scale, bool causal,
                                           int64_t diag_offset, int64_t window_left, int64_t window_right,
                                           double softcap, double dropout_p, int64_t seed, int64_t offset) {
  (void)seed;
  (void)offset;
  const Problem pr = check_qkv(q, k, v, kBwd);
  const at::Device device = q.device();
  const at::ScalarType dt = q.scalar_type();
  const knl::AttnMask m = check_features(pr, mask, alibi, window_left, window_right, softcap, dropout_p, device,
                                         kBwd);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{dout, "dout"}, {out, "out"}}) {
    check_cuda(t, kBwd, name, &device);
    FA_CHECK(t.dim() == 4 && t.size(0) == pr.B && t.size(1) == pr.H && t.size(2) == pr.L && t.size(3) == pr.E,
             kBwd, ": ", name, " must have shape (B, H, L, E) = (", pr.B, ", ", pr.H, ", ", pr.L, ", ", pr.E,
             "), got ", t.sizes());
    FA_CHECK(t.scalar_type() == dt, kBwd, ": ", name, " must have dtype ", dt, " (the dtype of q), got ",
             t.scalar_type());
  }
  check_cuda(lse, kBwd, "lse", &device);
  FA_CHECK(lse.scalar_type() == at::kFloat, kBwd, ": lse must be float32, got ", lse.scalar_type());
  FA_CHECK(lse.dim() == 3 && lse.size(0) == pr.B && lse.size(1) == pr.H && lse.size(2) == pr.L, kBwd,
           ": lse must have shape (B, H, L) = (", pr.B, ", ", pr.H, ", ", pr.L, "), got ", lse.sizes());

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  if (pr.B == 0 || pr.H == 0 || (pr.L == 0 && pr.S == 0)) {
    dk.zero_();  // (no query heads: keys and values with no gradient, as the other backends give)
    dv.zero_();
    return {dq, dk, dv};
  }

  // dout may arrive with any strides (autograd): copied when its rows are not 16-byte aligned
  const at::Tensor qa = aligned_rows(q), ka = aligned_rows(k), va = aligned_rows(v);
  const at::Tensor oa = aligned_rows(out), doa = aligned_rows(dout);
  const at::Tensor lsec = lse.contiguous();
  at::Tensor delta = at::empty({pr.B, pr.H, pr.L}, q.options().dtype(at::kFloat));

  knl::AttnBwdParams p;
  p.dtype = kernel_dtype(dt);
  p.B = static_cast<int>(pr.B);
  p.H = static_cast<int>(pr.H);
  p.Hk = static_cast<int>(pr.Hk);
  p.L = static_cast<int>(pr.L);
  p.S = static_cast<int>(pr.S);
  p.D = static_cast<int>(pr.E);
  p.q = kernel_tensor(qa);
  p.k = kernel_tensor(ka);
  p.v = kernel_tensor(va);
  p.out = kernel_tensor(oa);
  p.dout = kernel_tensor(doa);
  p.lse = lsec.data_ptr<float>();
  p.mask = m;
  // dq / dk / dv: empty_like of dense inputs keeps their (aligned) strides; of non-dense ones it is contiguous
  const at::Tensor dqa = aligned_rows(dq), dka = aligned_rows(dk), dva = aligned_rows(dv);
  p.dq = kernel_tensor(dqa);
  p.dk = kernel_tensor(dka);
  p.dv = kernel_tensor(dva);
  p.delta = delta.data_ptr<float>();
  FA_CHECK(static_cast<size_t>(delta.numel()) >= knl::attention_bwd_workspace_floats(p), kBwd,
           ": workspace too small");
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.diag_offset = diag_offset;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* err = knl::attention_bwd_launch(p, stream);
  FA_CHECK(err == nullptr, kBwd, ": kernel launch failed: ", err);
  // (aligned_rows returned a copy only if empty_like produced unaligned rows: never for these head dims, but
  // keep the result correct if it ever does)
  if (!dqa.is_same(dq)) dq.copy_(dqa);
  if (!dka.is_same(dk)) dk.copy_(dka);
  if (!dva.is_same(dv)) dv.copy_(dva);
  return {dq, dk, dv};
}

}  // namespace

void register_cuda_attention(pybind11::module_& m) {
  m.def("attention_fwd_cuda", &attention_fwd_cuda,
        "Flash attention forward (CUDA, fp16/bf16, head dim 32/64/128, causal, bool mask, GQA) -> [out, lse]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask"), pybind11::arg("alibi"),
        pybind11::arg("scale"), pybind11::arg("causal"), pybind11::arg("diag_offset"), pybind11::arg("window_left"),
        pybind11::arg("window_right"), pybind11::arg("softcap"), pybind11::arg("dropout_p"), pybind11::arg("seed"),
        pybind11::arg("offset"));
  m.def("attention_bwd_cuda", &attention_bwd_cuda,
        "Flash attention backward (CUDA) -> [dq, dk, dv] (dk, dv summed over each GQA group)",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("mask"), pybind11::arg("alibi"), pybind11::arg("scale"),
        pybind11::arg("causal"), pybind11::arg("diag_offset"), pybind11::arg("window_left"),
        pybind11::arg("window_right"), pybind11::arg("softcap"), pybind11::arg("dropout_p"), pybind11::arg("seed"),
        pybind11::arg("offset"));
}

}  // namespace fastattn
