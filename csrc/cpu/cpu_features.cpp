// Run-time CPU feature detection for the AVX2/FMA and AVX-512 code paths (the portable path runs everywhere else).
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define FA_CPU_SUPPORTS(f) __builtin_cpu_supports(f)
#else
#define FA_CPU_SUPPORTS(f) false
#endif

namespace fastattn {
namespace {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

}  // namespace

bool cpu_has_avx2() {
  static const bool ok = FA_CPU_SUPPORTS("avx2") && FA_CPU_SUPPORTS("fma") && FA_CPU_SUPPORTS("f16c");
  return ok;
}

bool cpu_use_avx2() {
  static const bool use = cpu_has_avx2() && !env_flag("FASTATTN_CPU_NO_AVX2");
  return use;
}

bool cpu_use_avx512() {
  static const bool use = cpu_use_avx2() && FA_CPU_SUPPORTS("avx512f") && !env_flag("FASTATTN_CPU_NO_AVX512");
  return use;
}

bool cpu_use_avx512_vnni() {
  static const bool use = cpu_use_avx512() && FA_CPU_SUPPORTS("avx512bw") && FA_CPU_SUPPORTS("avx512vl") &&
                          FA_CPU_SUPPORTS("avx512vnni");
  return use;
}

}  // namespace fastattn
