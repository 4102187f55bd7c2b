// Torch binding of the CUDA INT8 kernels (int8_gemm.cu, int8_quant.cu): argument checks, output allocation, launch
// on the current stream. Semantics: fastattn/ops/int8.py (backend contract) and fastattn/reference.py
// (int8_matmul_ref, quantize_rows_ref); kernel details in int8.h.
//
//   int8_mm_cuda(a, b, a_scale, b_scale, bias, out_dtype) -> out (M, N) out_dtype
//   quantize_rows_cuda(x, smooth) -> [q int8 (M, K), scale float32 (M,)]
#include <torch/extension.h>

#include "../check.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "device.h"
#include "int8.h"
#include "registry.h"

namespace fastattn {
namespace {

namespace knl = int8_cuda;

// Argument checks; every message names the op and the argument.
struct Checker {
  const char* op;

  void cuda_dense(const at::Tensor& t, const char* name) const {
    FA_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    FA_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ", t.layout());
    FA_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  }
  void same_device(const at::Tensor& t, const char* name, const at::Device& device, const char* first) const {
    FA_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", first, " is on ", device);
  }
  void contiguous(const at::Tensor& t, const char* name) const {
    FA_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", t.sizes(), " and strides ",
             t.strides());
  }
  void matrix(const at::Tensor& t, const char* name, const char* shape) const {
    cuda_dense(t, name);
    FA_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", shape, ", got shape ", t.sizes());
    contiguous(t, name);
  }
  void dtype_is(const at::Tensor& t, const char* name, at::ScalarType want) const {
    FA_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
  }
  // float32 (n,) contiguous on `device`: the scale / bias / smooth vectors.
  void f32_vector(const at::Tensor& t, const char* name, int64_t n, const char* what, const at::Device& device,
                  const char* first) const {
    cuda_dense(t, name);
    same_device(t, name, device, first);
    FA_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "] (", what, "), got ",
             t.sizes());
    dtype_is(t, name, at::kFloat);
    contiguous(t, name);
  }
};

// FASTATTN_CUDA_INT8_KERNEL forces a GEMM kernel (benchmarks / tests; read on every call): auto (default), small_m,
// tile64x64, tile128x128, tile128x128w8, tile128x256. Every kernel is exact for every shape.
knl::Int8Kernel forced_kernel() {
  const char* v = std::getenv("FASTATTN_CUDA_INT8_KERNEL");
  if (v == nullptr || *v == '\0') return knl::Int8Kernel::kAuto;
  const std::string s(v);
  if (s == "auto") return knl::Int8Kernel::kAuto;
  if (s == "small_m") return knl::Int8Kernel::kSmallM;
  if (s == "tile64x64") return knl::Int8Kernel::kTile64x64;
  if (s == "tile128x128") return knl::Int8Kernel::kTile128x128;
  if (s == "tile128x128w8") return knl::Int8Kernel::kTile128x128W8;
  if (s == "tile128x256") return knl::Int8Kernel::kTile128x256;
  FA_CHECK(false, "int8_mm_cuda: environment variable FASTATTN_CUDA_INT8_KERNEL=", s, " is not one of auto, "
           "small_m, tile64x64, tile128x128, tile128x128w8, tile128x256");
  return knl::Int8Kernel::kAuto;  // unreachable
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

knl::Int8OutDtype out_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return knl::Int8OutDtype::kFloat16;
    case at::kBFloat16:
      return knl::Int8OutDtype::kBFloat16;
    case at::kFloat:
      return knl::Int8OutDtype::kFloat32;
    case at::kInt:
      return knl::Int8OutDtype::kInt32;
    default:
      break;
  }
  FA_CHECK(false, "int8_mm_cuda: out_dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.int32, "
           "got ", t);
  return knl::Int8OutDtype::kFloat32;  // unreachable
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& a_scale,
                        const c10::optional<at::Tensor>& b_scale, const c10::optional<at::Tensor>& bias,
                        at::ScalarType out_dtype) {
  const Checker c{"int8_mm_cuda"};
  c.matrix(a, "a", "(M, K)");
  c.dtype_is(a, "a", at::kChar);
  const at::Device device = a.device();
  c.matrix(b, "b", "(N, K)");
  c.same_device(b, "b", device, "a");
  c.dtype_is(b, "b", at::kChar);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  FA_CHECK(b.size(1) == K, c.op, ": b must have K = ", K, " columns like a ", a.sizes(), ", got shape ",
           b.sizes());
  FA_CHECK(K <= knl::kInt8MaxK, c.op, ": K = ", K, " is too large for an exact int32 accumulator (at most ",
           knl::kInt8MaxK, ")");
  const knl::Int8OutDtype ot = out_dtype_of(out_dtype);
  const at::Tensor* sa = present(a_scale);
  const at::Tensor* sb = present(b_scale);
  const at::Tensor* bi = present(bias);
  if (ot == knl::Int8OutDtype::kInt32)
    FA_CHECK(sa == nullptr && sb == nullptr && bi == nullptr, c.op,
             ": out_dtype torch.int32 returns the raw accumulator: a_scale, b_scale and bias must be None");
  if (sa != nullptr) c.f32_vector(*sa, "a_scale", M, "M, one scale per row of a", device, "a");
  if (sb != nullptr) c.f32_vector(*sb, "b_scale", N, "N, one scale per row of b", device, "a");
  if (bi != nullptr) c.f32_vector(*bi, "bias", N, "N, one per output column", device, "a");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  knl::Int8MatmulParams p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.a = a.data_ptr<int8_t>();
  p.b = b.data_ptr<int8_t>();
  p.a_scale = sa != nullptr ? sa->data_ptr<float>() : nullptr;
  p.b_scale = sb != nullptr ? sb->data_ptr<float>() : nullptr;
  p.bias = bi != nullptr ? bi->data_ptr<float>() : nullptr;
  p.out_dtype = ot;
  p.out = out.data_ptr();
  p.num_sms = sm_count(device.index(), c.op);
  p.kernel = forced_kernel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* err = knl::int8_mm_launch(p, stream);
  FA_CHECK(err == nullptr, c.op, ": kernel launch failed: ", err);
  return out;
}

std::vector<at::Tensor> quantize_rows_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& smooth) {
  const Checker c{"quantize_rows_cuda"};
  c.matrix(x, "x", "(M, K)");
  const at::Device device = x.device();
  knl::Int8InDtype xt;
  switch (x.scalar_type()) {
    case at::kFloat:
      xt = knl::Int8InDtype::kFloat32;
      break;
    case at::kHalf:
      xt = knl::Int8InDtype::kFloat16;
      break;
    case at::kBFloat16:
      xt = knl::Int8InDtype::kBFloat16;
      break;
    default:
      FA_CHECK(false, c.op, ": x must have dtype torch.float32, torch.float16 or torch.bfloat16, got ",
               x.scalar_type());
  }
  const int64_t M = x.size(0), K = x.size(1);
  FA_CHECK(K >= 1, c.op, ": x must have at least one column, got shape ", x.sizes());
  const at::Tensor* sm = present(smooth);
  if (sm != nullptr) c.f32_vector(*sm, "smooth", K, "K, one divisor per column of x", device, "x");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};

  knl::Int8QuantizeParams p;
  p.M = M;
  p.K = K;
  p.x_dtype = xt;
  p.x = x.data_ptr();
  p.smooth = sm != nullptr ? sm->data_ptr<float>() : nullptr;
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.scale_by_reciprocal = false;  // scale = amax / 127, IEEE-rounded, as the reference on every device
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* err = knl::quantize_rows_launch(p, stream);
  FA_CHECK(err == nullptr, c.op, ": kernel launch failed: ", err);
  return {q, scale};
}

}  // namespace

void register_cuda_int8(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("int8_mm_cuda", &int8_mm_cuda,
        "INT8 matmul on CUDA: a int8 (M, K) @ b int8 (N, K)^T with an exact int32 accumulator (mma.sync s8), then "
        "(float32) * a_scale[m] * b_scale[n] + bias[n] cast to out_dtype; out_dtype=torch.int32 returns the "
        "accumulator",
        py::arg("a"), py::arg("b"), py::arg("a_scale"), py::arg("b_scale"), py::arg("bias"), py::arg("out_dtype"));
  m.def("quantize_rows_cuda", &quantize_rows_cuda,
        "Row-wise symmetric int8 quantization on CUDA (x / smooth; scale = absmax * float(1/127) as torch computes "
        "absmax / 127.0 on CUDA; round half to even) -> [q int8 (M, K), scale float32 (M,)]",
        py::arg("x"), py::arg("smooth"));
}

}  // namespace fastattn
