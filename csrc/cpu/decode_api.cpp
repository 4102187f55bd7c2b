// Python binding of the CPU decode attention: argument checks, output allocation, kernel call.
// Contract: fastattn/ops/attention/decode.py (module docstring); the kernel is in decode_kernel.cpp.
#include <torch/extension.h>

#include "../check.h"

#include <ATen/Parallel.h>

#include <cmath>

#include "decode_kernel.h"
#include "registry.h"

namespace fastattn {
namespace {

constexpr const char* kOp = "decode_attention_cpu";

cpu::AttnDType decode_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::AttnDType::kFloat32;
    case at::kHalf: return cpu::AttnDType::kFloat16;
    case at::kBFloat16: return cpu::AttnDType::kBFloat16;
    default: FA_CHECK(false, kOp, ": q must have dtype Float, Half or BFloat16, got ", t);
  }
  return cpu::AttnDType::kFloat32;
}

cpu::AttnView view_4d(const at::Tensor& t, const char* name, const char* dims) {
  check_cpu_strided(kOp, t, name);
  FA_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D ", dims, ", got shape ", t.sizes());
  FA_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kOp, ": ", name, " must have a contiguous last dim (stride 1), got "
           "strides ", t.strides());
  cpu::AttnView v;
  v.data = t.data_ptr();
  for (int d = 0; d < 3; ++d) v.stride[d] = t.stride(d);
  v.stride[3] = 1;
  return v;
}

std::vector<at::Tensor> decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const c10::optional<at::Tensor>& seqlens,
                                             const c10::optional<at::Tensor>& keep, double scale, double softcap,
                                             bool causal) {
  cpu::DecodeArgs a;
  a.q = view_4d(q, "q", "(B, H, L, E)");
  a.k = view_4d(k, "k", "(B, Hk, S, E)");
  a.v = view_4d(v, "v", "(B, Hk, S, Ev)");
  a.dtype = decode_dtype(q.scalar_type());
  FA_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
           ": k and v must have the dtype of q (", q.scalar_type(), "), got ", k.scalar_type(), ", ",
           v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2), Ev = v.size(3);
  FA_CHECK(k.size(0) == B && k.size(3) == E, kOp, ": k must have shape (B=", B, ", Hk, S, E=", E, ") to match q ",
           q.sizes(), ", got ", k.sizes());
  FA_CHECK(v.size(0) == B && v.size(1) == Hk && v.size(2) == S, kOp, ": v must have shape (B=", B, ", Hk=", Hk,
           ", S=", S, ", Ev) to match k ", k.sizes(), ", got ", v.sizes());
  FA_CHECK(Hk > 0 ? H % Hk == 0 : H == 0, kOp, ": q's head count H=", H, " must be a multiple of k's head count Hk=",
           Hk);
  a.B = B; a.H = H; a.Hk = Hk; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
  if (seqlens && seqlens->defined()) {
    const at::Tensor& t = *seqlens;
    check_cpu_strided(kOp, t, "cache_seqlens");
    FA_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == B && t.is_contiguous(), kOp,
             ": cache_seqlens must be a contiguous (B=", B, ",) Int tensor, got ", t.scalar_type(), " of shape ",
             t.sizes());
    a.seqlens = t.data_ptr<int32_t>();
  }
  if (keep && keep->defined()) {
    const at::Tensor& t = *keep;
    check_cpu_strided(kOp, t, "keep");
    FA_CHECK(t.scalar_type() == at::kBool && t.sizes() == at::IntArrayRef({B, S}), kOp,
             ": keep must be a (B=", B, ", S=", S, ") Bool tensor (True = the key takes part), got ",
             t.scalar_type(), " of shape ", t.sizes());
    a.keep = static_cast<const uint8_t*>(t.data_ptr());
    a.keep_stride[0] = t.stride(0);
    a.keep_stride[1] = t.stride(1);
  }
  FA_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);
  FA_CHECK(std::isfinite(softcap) && softcap >= 0, kOp, ": softcap must be finite and >= 0, got ", softcap);
  a.scale = scale;
  a.softcap = softcap;
  a.causal = causal;
  a.num_threads = std::max(1, at::get_num_threads());
  at::Tensor out = at::empty({B, H, L, Ev}, q.options());
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  cpu::decode_attention(a);
  return {out, lse};
}

}  // namespace

void register_cpu_decode(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("decode_attention_cpu", &decode_attention_cpu,
        "Split-KV decode attention on CPU -> [out (B, H, L, Ev), lse (B, H, L) float32, +inf for rows with no key]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cache_seqlens"), py::arg("keep"), py::arg("scale"),
        py::arg("softcap"), py::arg("causal"));
}

}  // namespace fastattn
