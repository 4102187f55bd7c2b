// Python bindings of the CPU attention kernels: argument checks, output allocation, kernel call.
// Contract: fastattn/ops/attention/dispatch.py (module docstring); the kernels are in attention_kernel.cpp.
#include "attention_args.h"
#include "registry.h"

namespace fastattn {
namespace {

using namespace attn_api;

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
