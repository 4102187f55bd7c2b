// Python binding of the CPU dropout kernel: argument checks, kernel call. Semantics: dropout_kernel.h.
#include <torch/extension.h>

#include "../check.h"

#include <ATen/Parallel.h>

#include "dropout_kernel.h"
#include "registry.h"

namespace fastattn {
namespace {

void dropout_cpu(const at::Tensor& x, at::Tensor& out, double p, int64_t seed, int64_t offset) {
  const char* op = "dropout_cpu";
  for (const at::Tensor* t : {&x, static_cast<const at::Tensor*>(&out)}) {
    const char* name = t == &x ? "x" : "out";
    check_cpu_strided(op, *t, name);
    FA_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t->strides());
  }
  FA_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ", x.scalar_type(), ", got ",
           out.scalar_type());
  FA_CHECK(out.numel() == x.numel(), op, ": out must have x's ", x.numel(), " elements, got ", out.numel());
  FA_CHECK(p >= 0 && p < 1, op, ": p must be in [0, 1), got ", p);
  cpu::DropoutParams d;
  d.n = x.numel();
  d.dtype = cpu_dtype(x.scalar_type(), op);
  d.x = x.data_ptr();
  d.out = out.data_ptr();
  d.p = p;
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint64_t>(offset);
  d.num_threads = std::max(1, at::get_num_threads());
  cpu::dropout(d);
}

}  // namespace

void register_cpu_dropout(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("dropout_cpu", &dropout_cpu,
        "out = x * keep / (1 - p) on CPU (Philox keep flags of logical counters offset + i, equal to Triton's); "
        "out may be x", py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"), py::arg("offset"));
}

}  // namespace fastattn
