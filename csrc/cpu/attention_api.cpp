// Python bindings of the CPU attention kernels: argument checks, output allocation, kernel call.
// Contract: fastattn/ops/attention/dispatch.py (module docstring); the kernels are in attention_kernel.cpp.
#include <torch/extension.h>

#include "../check.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "attention_kernel.h"
#include "registry.h"

namespace fastattn {
namespace {

using cpu::AttnDType;

AttnDType attn_dtype(at::ScalarType t) {
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

bool is_float_dtype(at::ScalarType t) {
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

cpu::AttnView view_of(const at::Tensor& t) {
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
at::Tensor empty_in_order_of(const at::Tensor& like, std::array<int64_t, 4> sizes, const at::TensorOptions& opts) {
  std::array<int64_t, 3> order = {0, 1, 2};
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return like.stride(x) > like.stride(y); });
  at::Tensor t = at::empty({sizes[order[0]], sizes[order[1]], sizes[order[2]], sizes[3]}, opts);
  std::array<int64_t, 4> back = {0, 0, 0, 3};
  for (int64_t i = 0; i < 3; ++i) back[order[i]] = i;
  return t.permute({back[0], back[1], back[2], back[3]});
}

cpu::AttnOut out_of(const at::Tensor& t) {
  cpu::AttnOut o;
  o.data = t.data_ptr();
  for (int d = 0; d < 3; ++d) o.stride[d] = t.stride(d);
  return o;
}

// Checks q, k, v, mask, alibi and the scalars; fills everything of a but the outputs.
void fill_args(const Checker& c, cpu::AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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

std::vector<at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& mask,
                                          const c10::optional<at::Tensor>& alibi, double scale, bool causal,
                                          int64_t diag_offset, int64_t window_left, int64_t window_right,
                                          double softcap, double dropout_p, int64_t seed, int64_t offset) {
  const Checker c{"attention_fwd_cpu"};
  cpu::AttnFwdArgs a;
  fill_args(c, a, q, k, v, mask, alibi, scale, causal, diag_offset, window_left, window_right, softcap, dropout_p,
            seed, offset);
  at::Tensor out = empty_in_order_of(q, {a.B, a.H, a.L, a.Ev}, q.options());
  at::Tensor lse = at::empty({a.B, a.H, a.L}, q.options().dtype(at::kFloat));
  a.out = out_of(out);
  a.lse = lse.data_ptr<float>();
  cpu::attention_fwd(a);
  return {out, lse};
}

std::vector<at::Tensor> attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                          const c10::optional<at::Tensor>& mask,
                                          const c10::optional<at::Tensor>& alibi, double scale, bool causal,
                                          int64_t diag_offset, int64_t window_left, int64_t window_right,
                                          double softcap, double dropout_p, int64_t seed, int64_t offset,
                                          const c10::optional<at::Tensor>& dq_into,
                                          const c10::optional<at::Tensor>& dk_into,
                                          const c10::optional<at::Tensor>& dv_into) {
  const Checker c{"attention_bwd_cpu"};
  cpu::AttnBwdArgs a;
  fill_args(c, a, q, k, v, mask, alibi, scale, causal, diag_offset, window_left, window_right, softcap, dropout_p,
            seed, offset);
  c.bhld(dout, "dout", "(B, H, L, Ev)");
  c.same_dtype(dout, "dout", q);
  c.shape_is(dout, "dout", {a.B, a.H, a.L, a.Ev}, "(B, H, L, Ev)");
  c.bhld(out, "out", "(B, H, L, Ev)");
  c.same_dtype(out, "out", q);
  c.shape_is(out, "out", {a.B, a.H, a.L, a.Ev}, "(B, H, L, Ev)");
  c.cpu_strided(lse, "lse");
  FA_CHECK(lse.scalar_type() == at::kFloat, c.op, ": lse must have dtype Float, got ", lse.scalar_type());
  c.shape_is(lse, "lse", {a.B, a.H, a.L}, "(B, H, L)");
  a.dout = view_of(dout);
  a.out = view_of(out);
  a.lse = lse.data_ptr<float>();
  for (int d = 0; d < 3; ++d) a.lse_stride[d] = lse.stride(d);
  // each given (written in place: views of one packed gradient), else in its input's layout
  auto grad = [&](const c10::optional<at::Tensor>& into, const at::Tensor& like, std::array<int64_t, 4> sizes,
                  const char* name, const char* dims) {
    if (!into.has_value()) return empty_in_order_of(like, sizes, q.options());
    c.bhld(*into, name, dims);
    c.same_dtype(*into, name, q);
    c.shape_is(*into, name, {sizes[0], sizes[1], sizes[2], sizes[3]}, dims);
    return *into;
  };
  at::Tensor dq = grad(dq_into, q, {a.B, a.H, a.L, a.E}, "dq", "(B, H, L, E)");
  at::Tensor dk = grad(dk_into, k, {a.B, a.Hk, a.S, a.E}, "dk", "(B, Hk, S, E)");
  at::Tensor dv = grad(dv_into, v, {a.B, a.Hk, a.S, a.Ev}, "dv", "(B, Hk, S, Ev)");
  a.dq = out_of(dq);
  a.dk = out_of(dk);
  a.dv = out_of(dv);
  cpu::attention_bwd(a);
  return {dq, dk, dv};
}

at::Tensor attention_dropout_mask_cpu(int64_t B, int64_t H, int64_t L, int64_t S, double dropout_p, int64_t seed,
                                      int64_t offset) {
  const char* op = "attention_dropout_mask_cpu";
  FA_CHECK(B >= 0 && H >= 0 && L >= 0 && S >= 0, op, ": B, H, L, S must be >= 0, got ", B, ", ", H, ", ", L,
           ", ", S);
  FA_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  at::Tensor keep = at::empty({B, H, L, S}, at::TensorOptions().dtype(at::kBool));
  cpu::attention_dropout_mask(B, H, L, S, dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                              keep.data_ptr<bool>(), std::max(1, at::get_num_threads()));
  return keep;
}

}  // namespace

void register_cpu_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_fwd_cpu", &attention_fwd_cpu,
        "Fused attention forward on CPU -> [out (B, H, L, Ev) laid out in q's dimension order, lse (B, H, L) "
        "float32, +inf for rows with no key]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("alibi"), py::arg("scale"),
        py::arg("causal"), py::arg("diag_offset"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"));
  m.def("attention_bwd_cpu", &attention_bwd_cpu,
        "Fused attention backward on CPU -> [dq, dk, dv] (each in its input's dimension order, or written into "
        "dq_into / dk_into / dv_into when given; dk, dv summed over each GQA group)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("mask"), py::arg("alibi"),
        py::arg("scale"), py::arg("causal"), py::arg("diag_offset"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"),
        py::arg("dq_into") = py::none(), py::arg("dk_into") = py::none(), py::arg("dv_into") = py::none());
  m.def("attention_dropout_mask_cpu", &attention_dropout_mask_cpu,
        "The (B, H, L, S) bool keep mask of the CPU attention kernels (Philox, equal to Triton's)",
        py::arg("B"), py::arg("H"), py::arg("L"), py::arg("S"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("offset"));
}

}  // namespace fastattn
