// fastattn._C: one pybind11 module for every C++ and CUDA op. Each op family registers itself from its own
// binding file (csrc/cpu/*_api.cpp, csrc/cuda/*_api.cpp), so kernels stay in torch-free translation units.
#include <torch/extension.h>

#include "cpu/cpu_features.h"
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn C++/CUDA ops";
  m.attr("version") = FASTATTN_VERSION;
#ifdef FASTATTN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = FASTATTN_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.def("cpu_has_avx2", &fastattn::cpu_has_avx2, "whether this CPU supports the AVX2/FMA/F16C code paths");
  m.def("cpu_stream_min_bytes", &fastattn::cpu_stream_min_bytes,
        "bytes a CPU add+norm call moves before it writes its outputs with non-temporal stores");
  fastattn::register_cpu_ops(m);
#ifdef FASTATTN_WITH_CUDA
  fastattn::register_cuda_ops(m);
#endif
}
