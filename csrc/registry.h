// Registration hooks: each op family's binding file defines its register_* function; bindings.cpp calls them.
#pragma once
#include <torch/extension.h>

namespace fastattn {

bool cpu_has_avx2();  // defined in csrc/cpu/cpu_features.cpp

void register_cpu_add_norm(pybind11::module_& m);  // csrc/cpu/add_norm_api.cpp

inline void register_cpu_ops(pybind11::module_& m) { register_cpu_add_norm(m); }

#ifdef FASTATTN_WITH_CUDA
void register_cuda_add_norm(pybind11::module_& m);  // csrc/cuda/add_norm_api.cpp

inline void register_cuda_ops(pybind11::module_& m) { register_cuda_add_norm(m); }
#endif

}  // namespace fastattn
