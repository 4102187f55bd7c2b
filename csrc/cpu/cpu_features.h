// Run-time CPU feature choices shared by the CPU kernels: what the CPU supports, less what the environment turns
// off (FASTATTN_CPU_NO_AVX2 / _AVX512 / _AVXVNNI set and not "0"; read once). Definitions: cpu_features.cpp.
#pragma once

namespace fastattn {

bool cpu_has_avx2();          // AVX2 + FMA + F16C
bool cpu_use_avx2();          // the AVX2/FMA/F16C code paths run
bool cpu_use_avx512();        // ... and AVX-512F register tiles (attention)
bool cpu_use_avx512_vnni();   // ... and AVX-512F/BW/VL/VNNI int8 dot products (int8 matmul)
bool cpu_use_avx_vnni();      // the AVX2 paths and the VEX (256-bit) VNNI int8 dot products (int8 matmul)

// Bytes a call must move (reads + writes) before its large outputs are written with non-temporal stores: the
// last-level cache size (sysfs, else 32 MiB), or FASTATTN_CPU_STREAM_MIN_BYTES (read once; 0 streams always).
long long cpu_stream_min_bytes();

}  // namespace fastattn
