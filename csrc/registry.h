// Registration hooks: each op family's binding file defines its register_* function; bindings.cpp calls them.
#pragma once
#include <torch/extension.h>

namespace fastattn {

void register_cpu_add_norm(pybind11::module_& m);   // csrc/cpu/add_norm_api.cpp
void register_cpu_attention(pybind11::module_& m);  // csrc/cpu/attention_api.cpp
void register_cpu_attention_varlen(pybind11::module_& m);  // csrc/cpu/attention_varlen_api.cpp
void register_cpu_int8(pybind11::module_& m);       // csrc/cpu/int8_api.cpp
void register_cpu_decode(pybind11::module_& m);     // csrc/cpu/decode_api.cpp
void register_cpu_dropout(pybind11::module_& m);    // csrc/cpu/dropout_api.cpp
void register_cpu_cross_entropy(pybind11::module_& m);  // csrc/cpu/cross_entropy_api.cpp

inline void register_cpu_ops(pybind11::module_& m) {
  register_cpu_add_norm(m);
  register_cpu_attention(m);
  register_cpu_attention_varlen(m);
  register_cpu_int8(m);
  register_cpu_decode(m);
  register_cpu_dropout(m);
  register_cpu_cross_entropy(m);
}

#ifdef FASTATTN_WITH_CUDA
void register_cuda_add_norm(pybind11::module_& m);   // csrc/cuda/add_norm_api.cpp
void register_cuda_attention(pybind11::module_& m);  // csrc/cuda/attention_api.cpp
void register_cuda_int8(pybind11::module_& m);       // csrc/cuda/int8_api.cpp

inline void register_cuda_ops(pybind11::module_& m) {
  register_cuda_add_norm(m);
  register_cuda_attention(m);
  register_cuda_int8(m);
}
#endif

}  // namespace fastattn
