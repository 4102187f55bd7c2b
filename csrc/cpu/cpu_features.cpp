// Run-time CPU feature detection for the AVX2/FMA and AVX-512 code paths (the portable path runs everywhere else).
#include "cpu_features.h"

#include <cstdio>
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

// The size of cpu0's level-3 cache from sysfs ("32768K"), or 32 MiB when it cannot be read. (sysconf's
// _SC_LEVEL3_CACHE_SIZE reports the host's cache inside some VMs.)
long long l3_bytes() {
  long long n = 0;
  char unit = 0;
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    if (std::fscanf(f, "%lld%c", &n, &unit) < 1) n = 0;
    std::fclose(f);
  }
  if (unit == 'K') n <<= 10;
  else if (unit == 'M') n <<= 20;
  return n > 0 ? n : 32LL << 20;
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

bool cpu_use_avx_vnni() {
  static const bool use = cpu_use_avx2() && FA_CPU_SUPPORTS("avxvnni") && !env_flag("FASTATTN_CPU_NO_AVXVNNI");
  return use;
}

long long cpu_stream_min_bytes() {
  static const long long n = [] {
    const char* v = std::getenv("FASTATTN_CPU_STREAM_MIN_BYTES");
    return v && *v ? std::atoll(v) : l3_bytes();
  }();
  return n;
}

}  // namespace fastattn
