// Python bindings of the CPU add_norm kernels: argument checks, output allocation, kernel call.
// Semantics: see the add_norm contract; the kernels are in add_norm_kernel.cpp.
#include <torch/extension.h>

#include "../check.h"

#include <ATen/Parallel.h>

#include "add_norm_kernel.h"
#include "registry.h"

namespace fastattn {
namespace {

using cpu::DType;

DType to_dtype(at::ScalarType t) { return cpu_dtype(t, "add_norm"); }

// Argument checks; every message names the op and the argument.
struct Checker {
  const char* op;

  void cpu_dense(const at::Tensor& t, const char* name) const {
    check_cpu_strided(op, t, name);
    FA_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  }
  // (M, N) with the given shape (when ref is given).
  void matrix(const at::Tensor& t, const char* name, const at::Tensor* ref = nullptr, const char* ref_name = "") const {
    cpu_dense(t, name);
    FA_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
    if (ref)
      FA_CHECK(t.sizes() == ref->sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref->sizes(),
               ", got ", t.sizes());
  }
  void vector(const at::Tensor& t, const char* name, int64_t n) const {
    cpu_dense(t, name);
    FA_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  }
  void dtype_is(const at::Tensor& t, const char* name, at::ScalarType want) const {
    FA_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
  }
  // dtype == x dtype or float32
  void dtype_x_or_f32(const at::Tensor& t, const char* name, at::ScalarType xt) const {
    FA_CHECK(t.scalar_type() == xt || t.scalar_type() == at::kFloat, op, ": ", name, " must have dtype ", xt,
             " (the dtype of x) or Float, got ", t.scalar_type());
  }
  void float_dtype(const at::Tensor& t, const char* name) const {
    const auto st = t.scalar_type();
    FA_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
             " must have dtype Float, Half, BFloat16 or Double, got ", st);
  }
};

at::ScalarType stats_type(at::ScalarType xt) { return xt == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor empty_of(const at::Tensor& like, at::ScalarType t) { return at::empty({0}, like.options().dtype(t)); }

std::vector<at::Tensor> add_norm_fwd_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias, double eps, bool is_rms,
                                         bool store_s, bool s_fp32) {
  const Checker c{"add_norm_fwd_cpu"};
  c.matrix(x, "x");
  c.float_dtype(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  const auto xt = x.scalar_type();
  FA_CHECK(N >= 1, c.op, ": x must have at least one column, got shape ", x.sizes());
  if (residual) {
    c.matrix(*residual, "residual", &x, "x");
    c.dtype_x_or_f32(*residual, "residual", xt);
  }
  if (weight) {
    c.vector(*weight, "weight", N);
    c.dtype_x_or_f32(*weight, "weight", xt);
  }
  if (bias) {
    FA_CHECK(!is_rms, c.op, ": bias must be None for RMSNorm (is_rms=True)");
    c.vector(*bias, "bias", N);
    c.dtype_x_or_f32(*bias, "bias", xt);
  }
  FA_CHECK(std::isfinite(eps) && eps >= 0, c.op, ": eps must be finite and non-negative, got ", eps);

  const auto st = stats_type(xt), s_t = s_fp32 ? at::kFloat : xt;
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = store_s ? at::empty({M, N}, x.options().dtype(s_t)) : empty_of(x, s_t);
  at::Tensor mean = is_rms ? empty_of(x, st) : at::empty({M}, x.options().dtype(st));
  at::Tensor rstd = at::empty({M}, x.options().dtype(st));

  cpu::AddNormFwdParams p;
  p.rows = M;
  p.cols = N;
  p.x_dtype = to_dtype(xt);
  p.x = x.data_ptr();
  if (residual) {
    p.residual = residual->data_ptr();
    p.residual_dtype = to_dtype(residual->scalar_type());
  }
  if (weight) {
    p.weight = weight->data_ptr();
    p.weight_dtype = to_dtype(weight->scalar_type());
  }
  if (bias) {
    p.bias = bias->data_ptr();
    p.bias_dtype = to_dtype(bias->scalar_type());
  }
  p.s_dtype = to_dtype(s_t);
  p.y = y.data_ptr();
  p.s = store_s ? s.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.eps = eps;
  p.is_rms = is_rms;
  p.num_threads = std::max(1, at::get_num_threads());
  cpu::add_norm_fwd(p);
  return {y, s, mean, rstd};
}

std::vector<at::Tensor> add_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& mean,
                                         const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& ds, bool has_bias, bool is_rms,
                                         bool dres_fp32) {
  const Checker c{"add_norm_bwd_cpu"};
  c.matrix(dy, "dy");
  c.float_dtype(dy, "dy");
  const int64_t M = dy.size(0), N = dy.size(1);
  const auto xt = dy.scalar_type(), st = stats_type(xt);
  FA_CHECK(N >= 1, c.op, ": dy must have at least one column, got shape ", dy.sizes());
  c.matrix(s, "s", &dy, "dy");
  c.dtype_x_or_f32(s, "s", xt);
  if (!is_rms) {  // RMSNorm ignores mean
    c.vector(mean, "mean", M);
    c.dtype_is(mean, "mean", st);
  }
  c.vector(rstd, "rstd", M);
  c.dtype_is(rstd, "rstd", st);
  if (weight) {
    c.vector(*weight, "weight", N);
    c.dtype_x_or_f32(*weight, "weight", xt);
  }
  if (ds) {
    c.matrix(*ds, "ds", &dy, "dy");
    c.dtype_is(*ds, "ds", s.scalar_type());
  }
  FA_CHECK(!(has_bias && is_rms), c.op, ": has_bias must be False for RMSNorm (is_rms=True)");

  at::Tensor dx = at::empty({M, N}, dy.options());
  at::Tensor dres = dres_fp32 ? at::empty({M, N}, dy.options().dtype(at::kFloat)) : empty_of(dy, at::kFloat);
  at::Tensor dweight = weight ? at::empty({N}, dy.options().dtype(st)) : empty_of(dy, st);
  at::Tensor dbias = has_bias ? at::empty({N}, dy.options().dtype(st)) : empty_of(dy, st);

  cpu::AddNormBwdParams p;
  p.rows = M;
  p.cols = N;
  p.dy_dtype = to_dtype(xt);
  p.dy = dy.data_ptr();
  p.s = s.data_ptr();
  p.s_dtype = to_dtype(s.scalar_type());
  p.mean = is_rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  if (weight) {
    p.weight = weight->data_ptr();
    p.weight_dtype = to_dtype(weight->scalar_type());
  }
  p.ds = ds ? ds->data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dres = dres_fp32 ? dres.data_ptr() : nullptr;
  p.dweight = weight ? dweight.data_ptr() : nullptr;
  p.dbias = has_bias ? dbias.data_ptr() : nullptr;
  p.is_rms = is_rms;
  p.num_threads = std::max(1, at::get_num_threads());
  cpu::add_norm_bwd(p);
  return {dx, dres, dweight, dbias};
}

}  // namespace

void register_cpu_add_norm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("add_norm_fwd_cpu", &add_norm_fwd_cpu,
        "Fused residual-add + LayerNorm/RMSNorm forward on CPU -> [y, s, mean, rstd] (absent outputs are empty)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("is_rms"),
        py::arg("store_s"), py::arg("s_fp32"));
  m.def("add_norm_bwd_cpu", &add_norm_bwd_cpu,
        "Fused residual-add + LayerNorm/RMSNorm backward on CPU -> [dx, dres, dweight, dbias] (absent outputs are "
        "empty)",
        py::arg("dy"), py::arg("s"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("ds"),
        py::arg("has_bias"), py::arg("is_rms"), py::arg("dres_fp32"));
}

}  // namespace fastattn
