// Python bindings of the CPU INT8 kernels: argument checks, output allocation, kernel call.
// Semantics: see fastattn/ops/int8.py (backend contract) and fastattn/reference.py (int8_matmul_ref,
// quantize_rows_ref); the kernels are in int8_kernel.cpp.
#include <torch/extension.h>

#include "../check.h"

#include <ATen/Parallel.h>

#include <array>

#include "int8_kernel.h"
#include "registry.h"

namespace fastattn {
namespace {

// Largest K for which |acc| <= K * 2**14 stays below 2**31 (the int32 accumulator is exact).
constexpr int64_t kMaxK = (int64_t(1) << 17) - 1;

// Argument checks; every message names the op and the argument.
struct Checker {
  const char* op;

  void cpu_dense(const at::Tensor& t, const char* name) const {
    check_cpu_strided(op, t, name);
  }
  void contiguous(const at::Tensor& t, const char* name) const {
    FA_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  }
  void matrix(const at::Tensor& t, const char* name, const char* shape) const {
    cpu_dense(t, name);
    FA_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", shape, ", got shape ", t.sizes());
    contiguous(t, name);
  }
  void dtype_is(const at::Tensor& t, const char* name, at::ScalarType want) const {
    FA_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
  }
  // The two matrices of a product, a (M, K) and b (N, K) (dtypes checked unless Undefined), with the same K.
  // Returns {M, K, N}.
  std::array<int64_t, 3> operands(const at::Tensor& a, const char* an, at::ScalarType at_, const at::Tensor& b,
                                  const char* bn, at::ScalarType bt) const {
    matrix(a, an, "(M, K)");
    if (at_ != at::ScalarType::Undefined) dtype_is(a, an, at_);
    matrix(b, bn, "(N, K)");
    if (bt != at::ScalarType::Undefined) dtype_is(b, bn, bt);
    const int64_t K = a.size(1);
    FA_CHECK(b.size(1) == K, op, ": ", bn, " must have K = ", K, " columns like ", an, " ", a.sizes(), ", got shape ",
             b.sizes());
    return {a.size(0), K, b.size(0)};
  }
  // float32 (n,) contiguous: the scale / bias / smooth vectors.
  void f32_vector(const at::Tensor& t, const char* name, int64_t n, const char* what) const {
    cpu_dense(t, name);
    FA_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "] (", what, "), got ",
             t.sizes());
    dtype_is(t, name, at::kFloat);
    contiguous(t, name);
  }
};

cpu::Int8OutType out_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::Int8OutType::kFloat32;
    case at::kHalf: return cpu::Int8OutType::kFloat16;
    case at::kBFloat16: return cpu::Int8OutType::kBFloat16;
    case at::kInt: return cpu::Int8OutType::kInt32;
    default:
      FA_CHECK(false, "int8_mm_cpu: out_dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.int32, "
               "got ", t);
  }
}

cpu::Int8InType in_type_of(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return cpu::Int8InType::kFloat32;
    case at::kHalf: return cpu::Int8InType::kFloat16;
    case at::kBFloat16: return cpu::Int8InType::kBFloat16;
    default: FA_CHECK(false, op, ": x must have dtype Float, Half or BFloat16, got ", x.scalar_type());
  }
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& a_scale,
                       const c10::optional<at::Tensor>& b_scale, const c10::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  const Checker c{"int8_mm_cpu"};
  const auto [M, K, N] = c.operands(a, "a", at::kChar, b, "b", at::kChar);
  FA_CHECK(K <= kMaxK, c.op, ": K = ", K, " is too large for an exact int32 accumulator (at most ", kMaxK, ")");
  const cpu::Int8OutType ot = out_type_of(out_dtype);
  if (ot == cpu::Int8OutType::kInt32)
    FA_CHECK(!a_scale && !b_scale && !bias, c.op,
             ": out_dtype torch.int32 returns the raw accumulator: a_scale, b_scale and bias must be None");
  if (a_scale) c.f32_vector(*a_scale, "a_scale", M, "M, one scale per row of a");
  if (b_scale) c.f32_vector(*b_scale, "b_scale", N, "N, one scale per row of b");
  if (bias) c.f32_vector(*bias, "bias", N, "N");

  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  cpu::Int8MatmulParams p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.a = a.data_ptr<int8_t>();
  p.b = b.data_ptr<int8_t>();
  p.a_scale = a_scale ? a_scale->data_ptr<float>() : nullptr;
  p.b_scale = b_scale ? b_scale->data_ptr<float>() : nullptr;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.out_type = ot;
  p.out = out.data_ptr();
  p.num_threads = std::max(1, at::get_num_threads());
  cpu::int8_matmul(p);
  return out;
}

std::vector<at::Tensor> quantize_rows_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& smooth) {
  const Checker c{"quantize_rows_cpu"};
  c.matrix(x, "x", "(M, K)");
  const cpu::Int8InType xt = in_type_of(x, c.op);
  const int64_t M = x.size(0), K = x.size(1);
  FA_CHECK(K >= 1, c.op, ": x must have at least one column, got shape ", x.sizes());
  if (smooth) c.f32_vector(*smooth, "smooth", K, "K, one divisor per column of x");

  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  cpu::QuantizeRowsParams p;
  p.M = M;
  p.K = K;
  p.x_type = xt;
  p.x = x.data_ptr();
  p.smooth = smooth ? smooth->data_ptr<float>() : nullptr;
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.num_threads = std::max(1, at::get_num_threads());
  cpu::quantize_rows(p);
  return {q, scale};
}

at::Tensor w8a16_mm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias) {
  const Checker c{"w8a16_mm_cpu"};
  c.matrix(x, "x", "(M, K)");
  const cpu::Int8InType xt = in_type_of(x, c.op);
  c.matrix(w, "w", "(N, K)");
  c.dtype_is(w, "w", at::kChar);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  FA_CHECK(w.size(1) == K, c.op, ": w must have K = ", K, " columns like x ", x.sizes(), ", got shape ", w.sizes());
  c.f32_vector(w_scale, "w_scale", N, "N, one scale per row of w");
  if (bias) c.f32_vector(*bias, "bias", N, "N");

  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  cpu::W8A16Params p;
  p.x_type = xt;
  p.M = M;
  p.N = N;
  p.K = K;
  p.x = x.data_ptr();
  p.w = w.data_ptr<int8_t>();
  p.w_scale = w_scale.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.num_threads = std::max(1, at::get_num_threads());
  cpu::w8a16_matmul(p);
  return out;
}

at::Tensor gemv_f32_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const Checker c{"gemv_f32_cpu"};
  const auto [M, K, N] = c.operands(x, "x", at::kFloat, w, "w", at::kFloat);
  FA_CHECK(M <= cpu::gemv_max_rows(), c.op, ": x has ", M, " rows; the GEMV takes at most ", cpu::gemv_max_rows());
  if (bias) c.f32_vector(*bias, "bias", N, "N");

  at::Tensor out = at::empty({M, N}, x.options());
  cpu::gemv_f32({M, N, K, x.data_ptr<float>(), w.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                 out.data_ptr<float>(), std::max(1, at::get_num_threads())});
  return out;
}

}  // namespace

void register_cpu_int8(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("int8_mm_cpu", &int8_mm_cpu,
        "INT8 matmul on CPU: a int8 (M, K) @ b int8 (N, K)^T with an exact int32 accumulator, then (float32) "
        "* a_scale[m] * b_scale[n] + bias[n] cast to out_dtype; out_dtype=torch.int32 returns the accumulator",
        py::arg("a"), py::arg("b"), py::arg("a_scale"), py::arg("b_scale"), py::arg("bias"), py::arg("out_dtype"));
  m.def("quantize_rows_cpu", &quantize_rows_cpu,
        "Row-wise symmetric int8 quantization on CPU (x / smooth; scale = absmax / 127; round half to even) -> "
        "[q int8 (M, K), scale float32 (M,)]",
        py::arg("x"), py::arg("smooth"));
  m.def("w8a16_mm_cpu", &w8a16_mm_cpu,
        "Weight-only int8 matmul on CPU: (x (M, K) @ float(w int8 (N, K))^T) * w_scale[n] (+ bias[n]) in float32, "
        "cast to x's dtype (float32, float16 or bfloat16)",
        py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("bias"));
  m.def("gemv_f32_cpu", &gemv_f32_cpu,
        "Few-row float32 linear on CPU: x (M, K) @ w (N, K)^T (+ bias[n]), M <= 16, the weight read once",
        py::arg("x"), py::arg("w"), py::arg("bias"));
  m.def("cpu_w8a16_path", &cpu::w8a16_matmul_path, "the CPU w8a16 matmul's code path here: avx512, avx2 or portable");
  m.def("cpu_int8_path", &cpu::int8_matmul_path,
        "the CPU int8 matmul's code path here: avx512-vnni, avx-vnni, avx2 or portable");
}

}  // namespace fastattn
