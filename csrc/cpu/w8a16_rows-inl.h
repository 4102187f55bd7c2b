// The vector bodies of the CPU w8a16 matmul and float32 GEMV (w8a16_kernel.cpp), width-generic: compiled by
// foreach_isa.h for AVX2 (8 lanes) and AVX-512F (16 lanes), and for the portable path with one lane. No #include.
// Needs Vec (vec_traits.h).

// A chunk of Vec::W weights as float: int8 widened (w8a16), float32 loaded (the float GEMV).
inline typename Vec::F load_w(const int8_t* p) { return Vec::load_i8(p); }
inline typename Vec::F load_w(const float* p) { return Vec::load(p); }

// s[r] = x_r . float(w) for MR float rows x_r (stride K) and one weight row w (int8 or float32): each weight chunk
// is loaded (widened) once and multiplied into every row; U chunks in flight per row hide the FMA latency. One
// weight row at a time keeps the weight one sequential stream, which the hardware prefetcher runs ahead of (NB rows
// read side by side are NB short streams it does not: 2 GB/s of weight at M = 1 on Zen 3, against ~10 here).
template <int MR, class T>
inline void dot_row(const float* x, const T* w, int64_t K, float* s) {
  constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  constexpr int64_t kStep = int64_t(U) * Vec::W * int64_t(sizeof(T));  // weight bytes per main-loop iteration
  typename Vec::F acc[MR][U];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[r][u] = Vec::zero();
  int64_t k = 0;
  const int64_t pf = gemv_prefetch();
  for (; k + U * Vec::W <= K; k += U * Vec::W) {
    if (pf) {  // software prefetch pf bytes ahead, on into the next weight rows (past the weight's end: harmless)
      const char* ahead = reinterpret_cast<const char*>(w + k) + pf;
#pragma GCC unroll 4
      for (int64_t b = 0; b < kStep; b += 64) __builtin_prefetch(ahead + b, 0, 3);
    }
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const typename Vec::F wv = load_w(w + k + u * Vec::W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][u] = Vec::fmadd(Vec::load(x + r * K + k + u * Vec::W), wv, acc[r][u]);
    }
  }
  for (; k + Vec::W <= K; k += Vec::W) {
    const typename Vec::F wv = load_w(w + k);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = Vec::fmadd(Vec::load(x + r * K + k), wv, acc[r][0]);
  }
  for (int r = 0; r < MR; ++r) {
    typename Vec::F a = acc[r][0];
    for (int u = 1; u < U; ++u) a = Vec::add(a, acc[r][u]);
    float t = Vec::reduce_add(a);
    for (int64_t e = k; e < K; ++e) t += x[r * K + e] * float(w[e]);  // the K tail
    s[r] = t;
  }
}

// s[m * ss + j] = x_m . float(w_j) for the MR rows of x and the weight rows j < rows.
template <int MR, class T>
inline void gemv_rows(const float* x, int64_t K, const T* w, int64_t rows, float* s, int64_t ss) {
  float t[MR];
  for (int64_t j = 0; j < rows; ++j) {
    dot_row<MR>(x, w + j * K, K, t);
    for (int r = 0; r < MR; ++r) s[r * ss + j] = t[r];
  }
}

// The small-M path (M <= 8 rows of x): the weight rows stream once.
template <class T>
inline void gemv(const float* x, int64_t M, int64_t K, const T* w, int64_t rows, float* s, int64_t ss) {
  switch (M) {
    case 1: return gemv_rows<1>(x, K, w, rows, s, ss);
    case 2: return gemv_rows<2>(x, K, w, rows, s, ss);
    case 3: return gemv_rows<3>(x, K, w, rows, s, ss);
    case 4: return gemv_rows<4>(x, K, w, rows, s, ss);
    case 5: return gemv_rows<5>(x, K, w, rows, s, ss);
    case 6: return gemv_rows<6>(x, K, w, rows, s, ss);
    case 7: return gemv_rows<7>(x, K, w, rows, s, ss);
    default: return gemv_rows<8>(x, K, w, rows, s, ss);
  }
}

// dst[e] = float(w[e]), e < n: a block of weight rows as a float32 panel for the GEMM of the large-M path.
inline void widen_i8(const int8_t* w, int64_t n, float* dst) {
  int64_t e = 0;
  for (; e + Vec::W <= n; e += Vec::W) Vec::store(dst + e, Vec::load_i8(w + e));
  for (; e < n; ++e) dst[e] = float(w[e]);
}
