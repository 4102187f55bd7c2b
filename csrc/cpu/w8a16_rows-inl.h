// The vector bodies of the CPU w8a16 matmul (w8a16_kernel.cpp), width-generic: compiled by foreach_isa.h for AVX2
// (8 lanes) and AVX-512F (16 lanes), and for the portable path with one lane. No #include. Needs Vec (vec_traits.h).

// s[r * NB + j] = x_r . float(w_j) for MR float rows x_r and NB int8 rows w_j (both of stride K): each weight
// chunk is widened to float once and multiplied into every row; one horizontal sum per (r, j) at the end.
template <int MR, int NB>
inline void dot_block(const float* x, const int8_t* w, int64_t K, float* s) {
  typename Vec::F acc[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = Vec::zero();
  int64_t k = 0;
  for (; k + Vec::W <= K; k += Vec::W) {
    typename Vec::F xv[MR];  // (with NB == 1 these loads fold into the FMAs)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xv[r] = Vec::load(x + r * K + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const typename Vec::F wv = Vec::load_i8(w + j * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][j] = Vec::fmadd(xv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      float t = Vec::reduce_add(acc[r][j]);
      for (int64_t e = k; e < K; ++e) t += x[r * K + e] * float(w[j * K + e]);  // the K tail
      s[r * NB + j] = t;
    }
}

// s[m * ss + j] = x_m . float(w_j) for the MR rows of x and the weight rows j < rows: NB weight rows at a time, so
// that the MR x NB accumulators and MR x chunks fit AVX2's 16 registers.
template <int MR>
inline void gemv_rows(const float* x, int64_t K, const int8_t* w, int64_t rows, float* s, int64_t ss) {
  constexpr int NB = MR == 1 ? 8 : MR == 2 ? 4 : MR == 3 ? 3 : MR == 4 ? 2 : 1;
  float t[MR * NB];
  int64_t j = 0;
  for (; j + NB <= rows; j += NB) {
    dot_block<MR, NB>(x, w + j * K, K, t);
    for (int r = 0; r < MR; ++r)
      for (int b = 0; b < NB; ++b) s[r * ss + j + b] = t[r * NB + b];
  }
  for (; j < rows; ++j) {
    dot_block<MR, 1>(x, w + j * K, K, t);
    for (int r = 0; r < MR; ++r) s[r * ss + j] = t[r];
  }
}

// The small-M path (M <= 8 rows of x): the weight rows stream once.
inline void gemv(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t rows, float* s, int64_t ss) {
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
