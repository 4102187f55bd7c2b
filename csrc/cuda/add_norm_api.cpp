// Torch binding of the CUDA fused residual-add + LayerNorm / RMSNorm kernels (add_norm_fwd.cu, add_norm_bwd.cu).
// Thin binding, fat checks: every tensor argument is validated here (device, contiguity, dims, shapes, dtypes),
// outputs and the backward workspace are allocated with torch, and the kernels run on the current stream.
#include <torch/extension.h>

#include "../check.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "add_norm.h"
#include "device.h"
#include "registry.h"

namespace fastattn {
namespace {

namespace knl = add_norm_cuda;

constexpr const char* kFwd = "add_norm_fwd_cuda";
constexpr const char* kBwd = "add_norm_bwd_cuda";

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

knl::AddNormDtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return knl::AddNormDtype::kFloat32;
    case at::kHalf:
      return knl::AddNormDtype::kFloat16;
    case at::kBFloat16:
      return knl::AddNormDtype::kBFloat16;
    default:
      break;
  }
  FA_CHECK(false, "add_norm (CUDA): unsupported dtype ", t);
  return knl::AddNormDtype::kFloat32;  // unreachable
}

// The primary tensor (x / dy): a 2-D contiguous CUDA tensor of a supported dtype with 1 <= N <= 65536.
void check_primary(const at::Tensor& t, const char* fn, const char* name) {
  FA_CHECK(t.defined(), fn, ": ", name, " is undefined");
  FA_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  FA_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
  FA_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
  FA_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
  const auto dt = t.scalar_type();
  FA_CHECK(dt != at::kDouble, fn, ": ", name,
           " is float64, which the CUDA kernels do not support; use float32, float16 or bfloat16 (or the CPU op)");
  FA_CHECK(is_kernel_dtype(dt), fn, ": ", name, " must be float32, float16 or bfloat16, got ", dt);
  const int64_t n = t.size(1);
  FA_CHECK(n >= 1, fn, ": ", name, " must have at least one column (N >= 1), got shape ", t.sizes());
  FA_CHECK(n <= knl::kAddNormMaxN, fn, ": the CUDA kernels support rows of at most ", knl::kAddNormMaxN,
           " elements, but ", name, " has width N = ", n);
}

// A secondary tensor: defined, CUDA, on `device`, strided, contiguous.
void check_secondary(const at::Tensor& t, const char* fn, const char* name, const at::Device& device) {
  FA_CHECK(t.defined(), fn, ": ", name, " is undefined");
  FA_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  FA_CHECK(t.device() == device, fn, ": ", name, " is on ", t.device(), " but the other tensors are on ",
           device);
  FA_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
  FA_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// An (N,) vector of dtype `dt` or float32 (weight, bias).
void check_vector(const at::Tensor& t, const char* fn, const char* name, const at::Device& device, int64_t n,
                  at::ScalarType dt) {
  check_secondary(t, fn, name, device);
  FA_CHECK(t.dim() == 1 && t.size(0) == n, fn, ": ", name, " must have shape (", n, ",), got ", t.sizes());
  FA_CHECK(t.scalar_type() == dt || t.scalar_type() == at::kFloat, fn, ": ", name, " must be ", dt,
           " or float32, got ", t.scalar_type());
}

// Per-row statistics: (M,) float32.
void check_stats(const at::Tensor& t, const char* fn, const char* name, const at::Device& device, int64_t m) {
  check_secondary(t, fn, name, device);
  FA_CHECK(t.dim() == 1 && t.size(0) == m, fn, ": ", name, " must have shape (", m, ",), got ", t.sizes());
  FA_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ", t.scalar_type());
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

std::vector<at::Tensor> add_norm_fwd_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                          const c10::optional<at::Tensor>& weight,
                                          const c10::optional<at::Tensor>& bias, double eps, bool is_rms,
                                          bool store_s, bool s_fp32) {
  check_primary(x, kFwd, "x");
  const at::Device device = x.device();
  const at::ScalarType xt = x.scalar_type();
  const int64_t m = x.size(0);
  const int64_t n = x.size(1);

  const at::Tensor* res = present(residual);
  const at::Tensor* w = present(weight);
  const at::Tensor* b = present(bias);
  if (res != nullptr) {
    check_secondary(*res, kFwd, "residual", device);
    FA_CHECK(res->sizes() == x.sizes(), kFwd, ": residual must have the shape of x ", x.sizes(), ", got ",
             res->sizes());
    FA_CHECK(res->scalar_type() == xt || res->scalar_type() == at::kFloat, kFwd, ": residual must be ", xt,
             " (the dtype of x) or float32, got ", res->scalar_type());
  }
  if (w != nullptr) check_vector(*w, kFwd, "weight", device, n, xt);
  if (b != nullptr) {
    FA_CHECK(!is_rms, kFwd, ": bias must be None for RMSNorm (is_rms=True)");
    check_vector(*b, kFwd, "bias", device, n, xt);
  }

  const c10::cuda::CUDAGuard guard(device);
  const at::ScalarType s_dtype = s_fp32 ? at::kFloat : xt;
  const auto stats_opts = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor s = store_s ? at::empty({m, n}, x.options().dtype(s_dtype)) : at::empty({0}, x.options().dtype(s_dtype));
  at::Tensor mean = is_rms ? at::empty({0}, stats_opts) : at::empty({m}, stats_opts);
  at::Tensor rstd = at::empty({m}, stats_opts);
  if (m == 0) return {y, s, mean, rstd};

  knl::AddNormFwdParams p;
  p.dtype = kernel_dtype(xt);
  p.M = m;
  p.N = static_cast<int>(n);
  p.x = x.data_ptr();
  p.residual = res != nullptr ? res->data_ptr() : nullptr;
  p.residual_fp32 = res != nullptr && res->scalar_type() == at::kFloat;
  p.weight = w != nullptr ? w->data_ptr() : nullptr;
  p.weight_fp32 = w != nullptr && w->scalar_type() == at::kFloat;
  p.bias = b != nullptr ? b->data_ptr() : nullptr;
  p.bias_fp32 = b != nullptr && b->scalar_type() == at::kFloat;
  p.y = y.data_ptr();
  p.s = store_s ? s.data_ptr() : nullptr;
  p.s_fp32 = s_dtype == at::kFloat;
  p.mean = is_rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  p.is_rms = is_rms;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* err = knl::add_norm_fwd_launch(p, stream);
  FA_CHECK(err == nullptr, kFwd, ": kernel launch failed: ", err);
  return {y, s, mean, rstd};
}

std::vector<at::Tensor> add_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& s,
                                          const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                          const c10::optional<at::Tensor>& weight,
                                          const c10::optional<at::Tensor>& ds, bool has_bias, bool is_rms,
                                          bool dres_fp32) {
  check_primary(dy, kBwd, "dy");
  const at::Device device = dy.device();
  const at::ScalarType xt = dy.scalar_type();
  const int64_t m = dy.size(0);
  const int64_t n = dy.size(1);

  check_secondary(s, kBwd, "s", device);
  FA_CHECK(s.sizes() == dy.sizes(), kBwd, ": s must have the shape of dy ", dy.sizes(), ", got ", s.sizes());
  FA_CHECK(s.scalar_type() == xt || s.scalar_type() == at::kFloat, kBwd, ": s must be ", xt,
           " (the dtype of dy) or float32, got ", s.scalar_type());
  check_stats(rstd, kBwd, "rstd", device, m);
  const at::Tensor* mu = present(mean);
  if (!is_rms) {
    FA_CHECK(mu != nullptr, kBwd, ": mean is required for LayerNorm (is_rms=False)");
    check_stats(*mu, kBwd, "mean", device, m);
  }
  FA_CHECK(!(has_bias && is_rms), kBwd, ": has_bias must be False for RMSNorm (is_rms=True)");
  const at::Tensor* w = present(weight);
  if (w != nullptr) check_vector(*w, kBwd, "weight", device, n, xt);
  const at::Tensor* dsp = present(ds);
  if (dsp != nullptr) {
    check_secondary(*dsp, kBwd, "ds", device);
    FA_CHECK(dsp->sizes() == dy.sizes(), kBwd, ": ds must have the shape of dy ", dy.sizes(), ", got ",
             dsp->sizes());
    FA_CHECK(dsp->scalar_type() == s.scalar_type(), kBwd, ": ds must have the dtype of s (",
             s.scalar_type(), "), got ", dsp->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({m, n}, dy.options());
  at::Tensor dres = dres_fp32 ? at::empty({m, n}, f32) : at::empty({0}, f32);
  at::Tensor dweight = w != nullptr ? at::empty({n}, f32) : at::empty({0}, f32);
  at::Tensor dbias = has_bias ? at::empty({n}, f32) : at::empty({0}, f32);
  if (m == 0) {  // sums over no rows
    if (w != nullptr) dweight.zero_();
    if (has_bias) dbias.zero_();
    return {dx, dres, dweight, dbias};
  }

  knl::AddNormBwdParams p;
  p.dtype = kernel_dtype(xt);
  p.M = m;
  p.N = static_cast<int>(n);
  p.dy = dy.data_ptr();
  p.s = s.data_ptr();
  p.s_fp32 = s.scalar_type() == at::kFloat;
  p.mean = is_rms ? nullptr : mu->data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.weight = w != nullptr ? w->data_ptr() : nullptr;
  p.weight_fp32 = w != nullptr && w->scalar_type() == at::kFloat;
  p.ds = dsp != nullptr ? dsp->data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dres = dres_fp32 ? dres.data_ptr<float>() : nullptr;
  p.dweight = w != nullptr ? dweight.data_ptr<float>() : nullptr;
  p.dbias = has_bias ? dbias.data_ptr<float>() : nullptr;
  p.is_rms = is_rms;
  p.num_sms = sm_count(device.index(), kBwd);

  size_t ws_floats = 0;
  const char* err = knl::add_norm_bwd_workspace_size(p, &ws_floats);
  FA_CHECK(err == nullptr, kBwd, ": ", err);
  at::Tensor workspace;
  if (ws_floats > 0) workspace = at::empty({static_cast<int64_t>(ws_floats)}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  err = knl::add_norm_bwd_launch(p, ws_floats > 0 ? workspace.data_ptr<float>() : nullptr, ws_floats, stream);
  FA_CHECK(err == nullptr, kBwd, ": kernel launch failed: ", err);
  return {dx, dres, dweight, dbias};
}

}  // namespace

void register_cuda_add_norm(pybind11::module_& m) {
  m.def("add_norm_fwd_cuda", &add_norm_fwd_cuda,
        "Fused residual add + LayerNorm/RMSNorm forward (CUDA) -> [y, s, mean, rstd]", pybind11::arg("x"),
        pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"),
        pybind11::arg("is_rms"), pybind11::arg("store_s"), pybind11::arg("s_fp32"));
  m.def("add_norm_bwd_cuda", &add_norm_bwd_cuda,
        "Fused residual add + LayerNorm/RMSNorm backward (CUDA) -> [dx, dres, dweight, dbias]", pybind11::arg("dy"),
        pybind11::arg("s"), pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("weight"),
        pybind11::arg("ds"), pybind11::arg("has_bias"), pybind11::arg("is_rms"), pybind11::arg("dres_fp32"));
}

}  // namespace fastattn
