// The x86 SIMD switches shared by the CPU kernels: FA_X86 when building for x86; FA_AVX2 / FA_AVX512 mark a
// function compiled for AVX2/FMA/F16C / AVX-512F (chosen at run time, csrc/cpu/cpu_features.h), and
// FA_AVX2_BEGIN / FA_AVX512_BEGIN ... FA_TARGET_END compile every function defined between them so. Kernels that
// need more targets (VNNI) define their own on top.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC diagnostic push
// GCC 12's AVX-512 headers pass _mm512_undefined_* through masked builtins, which -Wall reports (fixed in GCC 13)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define FA_X86 1
#define FA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FA_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define FA_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define FA_AVX512_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx2,fma,f16c\")")
#define FA_TARGET_END _Pragma("GCC pop_options")
#endif
