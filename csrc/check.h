// FA_CHECK(cond, parts...): TORCH_CHECK whose message is assembled here with std::string / std::to_string, never
// through iostreams. On the GPU machine's image (torch 2.11) c10::str's ostream formatting inside fastattn._C crashed
// the process (SIGSEGV in std::ostream::_M_insert<long>; cuda-gdb backtrace, 2026-11-26), so a refused argument
// killed Python instead of raising. TORCH_CHECK given one std::string does no formatting of its own.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

#include "cpu/float_bits.h"  // cpu::DType

namespace fastattn {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::Layout v) {
  switch (v) {
    case c10::Layout::Strided: s += "torch.strided"; break;
    case c10::Layout::Sparse: s += "torch.sparse_coo"; break;
    case c10::Layout::SparseCsr: s += "torch.sparse_csr"; break;
    default: s += "layout #" + std::to_string(static_cast<int>(v));
  }
}

template <class... A>
std::string message(const A&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace fastattn

#define FA_CHECK(cond, ...)                                 \
  do {                                                      \
    if (C10_UNLIKELY(!(cond))) {                            \
      TORCH_CHECK(false, ::fastattn::message(__VA_ARGS__)); \
    }                                                       \
  } while (0)

namespace fastattn {

// The kernels' DType of a floating torch dtype; op names the caller in the error for any other dtype.
inline cpu::DType cpu_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kHalf: return cpu::DType::kFloat16;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kDouble: return cpu::DType::kFloat64;
    default: FA_CHECK(false, op, ": unsupported dtype ", t, " (Float, Half, BFloat16 or Double)");
  }
  return cpu::DType::kFloat32;
}

// A defined, dense (strided) CPU tensor; messages name the op and the argument. Shared by the CPU bindings.
inline void check_cpu_strided(const char* op, const at::Tensor& t, const char* name) {
  FA_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  FA_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ", t.layout());
  FA_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

}  // namespace fastattn
