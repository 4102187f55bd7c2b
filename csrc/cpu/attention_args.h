// Argument checks and views shared by the CPU attention bindings (attention_api.cpp, attention_varlen_api.cpp).
#pragma once
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "../check.h"
#include "attention_kernel.h"

namespace fastattn {
namespace attn_api {

using cpu::AttnDType;

inline AttnDType attn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return AttnDType::kFloat32;
    case at::kHalf: return AttnDType::kFloat16;
    case at::kBFloat16: return AttnDType::kBFloat16;
    case at::kDouble: return AttnDType::kFloat64;
    case at::kBool: return AttnDType::kBool;
    default: FA_CHECK(false, "attention: unsupported dtype ", t);
  }
  return AttnDType::kFloat32;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Argument checks; every message names the op and the argument.
struct Checker {
  const char* op;

  void cpu_strided(const at::Tensor& t, const char* name) const {
    check_cpu_strided(op, t, name);
  }
  // 4-D, float dtype, stride(-1) == 1
  void bhld(const at::Tensor& t, const char* name, const char* dims) const {
    cpu_strided(t, name);
    FA_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D ", dims, ", got shape ", t.sizes());
    FA_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
             " must have dtype Float, Half, BFloat16 or Double, got ", t.scalar_type());
    FA_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
             " must have a contiguous last dim (stride 1), got strides ", t.strides());
  }
  void same_dtype(const at::Tensor& t, const char* name, const at::Tensor& q) const {
    FA_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (",
             q.scalar_type(), "), got ", t.scalar_type());
  }
  void shape_is(const at::Tensor& t, const char* name, at::IntArrayRef want, const char* dims) const {
    FA_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, " ", dims, ", got ", t.sizes());
  }
};

inline cpu::AttnView view_of(const at::Tensor& t) {
  cpu::AttnView v;
  v.data = t.data_ptr();
  for (int d = 0; d < 4; ++d) v.stride[d] = t.stride(d);
  if (t.size(3) <= 1) v.stride[3] = 1;
  return v;
}

// An uninitialised 4-D tensor of `sizes` whose first three dims lie in memory in the order of like's strides
// (largest first, ties in index order; the last dim innermost). A q read as the (B, L, H, D) view of a projection
// gets a (B, L, H, D)-laid-out out and dq, so the caller's out.transpose(1, 2).reshape(B, L, H * D) and the
// gradient's way back to the projection are views, not copies (as with torch's flash CPU kernel).
inline at::Tensor empty_in_order_of(const at::Tensor& like, std::array<int64_t, 4> sizes,
                                    const at::TensorOptions& opts) {
  std::array<int64_t, 3> order = {0, 1, 2};
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return like.stride(x) > like.stride(y); });
  at::Tensor t = at::empty({sizes[order[0]], sizes[order[1]], sizes[order[2]], sizes[3]}, opts);
  std::array<int64_t, 4> back = {0, 0, 0, 3};
  for (int64_t i = 0; i < 3; ++i) back[order[i]] = i;
  return t.permute({back[0], back[1], back[2], back[3]});
}

inline cpu::AttnOut out_of(const at::Tensor& t) {
  cpu::AttnOut o;
  o.data = t.data_ptr();
  for (int d = 0; d < 3; ++d) o.stride[d] = t.stride(d);
  return o;
}

// Checks q, k, v, mask, alibi and the scalars; fills everything of a but the outputs.
inline void fill_args(const Checker& c, cpu::AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& alibi, double scale,
               bool causal, int64_t diag_offset, int64_t window_left, int64_t window_right, double softcap,
               double dropout_p, int64_t seed, int64_t offset) {
  c.bhld(q, "q", "(B, H, L, E)");
  c.bhld(k, "k", "(B, Hk, S, E)");
  c.bhld(v, "v", "(B, Hk, S, Ev)");
  c.same_dtype(k, "k", q);
  c.same_dtype(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2), Ev = v.size(3);
  FA_CHECK(k.size(0) == B && k.size(3) == E, c.op, ": k must have shape (B=", B, ", Hk, S, E=", E,
           ") to match q ", q.sizes(), ", got ", k.sizes());
  FA_CHECK(v.size(0) == B && v.size(1) == Hk && v.size(2) == S, c.op, ": v must have shape (B=", B, ", Hk=", Hk,
           ", S=", S, ", Ev) to match k ", k.sizes(), ", got ", v.sizes());
  FA_CHECK(Hk > 0 ? H % Hk == 0 : H == 0, c.op, ": q's head count H=", H,
           " must be a multiple of k's head count Hk=", Hk);
  a.B = B; a.H = H; a.Hk = Hk; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
  a.dtype = attn_dtype(q.scalar_type());
  a.q = view_of(q);
  a.k = view_of(k);
  a.v = view_of(v);
  if (mask && mask->defined()) {
    const at::Tensor& m = *mask;
    c.cpu_strided(m, "mask");
    FA_CHECK(m.scalar_type() == at::kBool || is_float_dtype(m.scalar_type()), c.op,
             ": mask must have dtype Bool (True = take part) or Float, Half, BFloat16, Double (added to the "
             "scores), got ", m.scalar_type());
    c.shape_is(m, "mask", {B, H, L, S}, "(B, H, L, S) (broadcast dims as stride-0 views)");
    a.mask.data = m.data_ptr();
    for (int d = 0; d < 4; ++d) a.mask.stride[d] = m.stride(d);
    a.mask_dtype = attn_dtype(m.scalar_type());
  }
  if (alibi && alibi->defined()) {
    const at::Tensor& s = *alibi;
    c.cpu_strided(s, "alibi");
    FA_CHECK(s.scalar_type() == at::kFloat, c.op, ": alibi must have dtype Float, got ", s.scalar_type());
    c.shape_is(s, "alibi", {B, H}, "(B, H)");
    FA_CHECK(s.is_contiguous(), c.op, ": alibi must be contiguous, got strides ", s.strides());
    a.alibi = s.data_ptr<float>();
  }
  FA_CHECK(std::isfinite(scale), c.op, ": scale must be finite, got ", scale);
  FA_CHECK(std::isfinite(softcap) && softcap >= 0, c.op, ": softcap must be finite and >= 0, got ", softcap);
  FA_CHECK(dropout_p >= 0 && dropout_p < 1, c.op, ": dropout_p must be in [0, 1), got ", dropout_p);
  FA_CHECK(window_left >= -1 && window_right >= -1, c.op, ": window_left and window_right must be >= -1 (-1: "
           "unbounded), got ", window_left, ", ", window_right);
  a.scale = scale;
  a.causal = causal;
  a.diag_offset = diag_offset;
  a.window_left = window_left;
  a.window_right = window_right;
  a.softcap = softcap;
  a.dropout_p = dropout_p;
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  a.num_threads = std::max(1, at::get_num_threads());
}

}  // namespace attn_api
}  // namespace fastattn
