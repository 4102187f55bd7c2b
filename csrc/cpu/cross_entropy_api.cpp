// Python binding of the CPU cross-entropy rows: argument checks, kernel call. Semantics: cross_entropy_kernel.h.
#include <torch/extension.h>

#include "../check.h"

#include <ATen/Parallel.h>

#include "cross_entropy_kernel.h"
#include "registry.h"

namespace fastattn {
namespace {

void cross_entropy_cpu(at::Tensor& logits, const at::Tensor& target, at::Tensor& loss, int64_t ignore_index,
                       bool write_grad) {
  const char* op = "cross_entropy_cpu";
  check_cpu_strided(op, logits, "logits");
  check_cpu_strided(op, target, "target");
  check_cpu_strided(op, loss, "loss");
  FA_CHECK(logits.dim() == 2, op, ": logits must be 2-D (n, V), got shape ", logits.sizes());
  FA_CHECK(logits.stride(1) == 1, op, ": logits rows must be contiguous, got strides ", logits.strides());
  const int64_t n = logits.size(0), V = logits.size(1);
  FA_CHECK(V > 0, op, ": logits have no classes (V = 0)");
  FA_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == n && target.is_contiguous(),
           op, ": target must be a contiguous int64 (", n, ",) tensor, got ", target.scalar_type(), " of shape ",
           target.sizes());
  const auto loss_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  FA_CHECK(loss.scalar_type() == loss_type && loss.dim() == 1 && loss.size(0) == n && loss.is_contiguous(), op,
           ": loss must be a contiguous ", loss_type, " (", n, ",) tensor, got ", loss.scalar_type(), " of shape ",
           loss.sizes());
  cpu::CrossEntropyParams p;
  p.n = n;
  p.V = V;
  p.stride = n > 1 ? logits.stride(0) : V;
  p.dtype = cpu_dtype(logits.scalar_type(), op);
  p.logits = logits.data_ptr();
  p.target = target.data_ptr<int64_t>();
  p.loss = loss.data_ptr();
  p.ignore_index = ignore_index;
  p.write_grad = write_grad;
  p.num_threads = std::max(1, at::get_num_threads());
  const int64_t* t = p.target;
  for (int64_t i = 0; i < n; ++i)
    FA_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), op, ": target[", i, "] = ", t[i],
             " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  cpu::cross_entropy_rows(p);
}

}  // namespace

void register_cpu_cross_entropy(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cross_entropy_cpu", &cross_entropy_cpu,
        "loss[i] = logsumexp(logits[i]) - logits[i, target[i]] (0 for ignore_index) on CPU; write_grad: logits "
        "become softmax - onehot in place (zero rows for ignore_index)",
        py::arg("logits"), py::arg("target"), py::arg("loss"), py::arg("ignore_index"), py::arg("write_grad"));
}

}  // namespace fastattn
