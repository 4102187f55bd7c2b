// The float32 register-tile GEMM of gemm_f32.h, width-generic: compiled once per ISA by foreach_isa.h. No #include.

// Register tile: MR rows x (Vec::W * NV) columns, accumulated over K in MR * NV vector registers.
template <int MR, int NV, bool AT, int MODE>
inline void micro(int64_t K, const float* A, int64_t sa, const float* B, int64_t sbk, float* C, int64_t scm,
                  float alpha, const float* rs) {
  Vec::F c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = Vec::zero();
  if constexpr (AT) {  // A(m, k) = A[k * sa + m]
    for (int64_t k = 0; k < K; ++k) {
      const float* bk = B + k * sbk;
      const float* ak = A + k * sa;
      Vec::F b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = Vec::load(bk + Vec::W * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Vec::F x = Vec::bcast(ak + r);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = Vec::fmadd(x, b[v], c[r][v]);
      }
    }
  } else {  // A(m, k) = A[m * sa + k]
    const float* ar[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) ar[r] = A + r * sa;
    for (int64_t k = 0; k < K; ++k) {
      const float* bk = B + k * sbk;
      Vec::F b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = Vec::load(bk + Vec::W * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Vec::F x = Vec::bcast(ar[r] + k);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = Vec::fmadd(x, b[v], c[r][v]);
      }
    }
  }
  const Vec::F va = Vec::set1(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * scm;
    const Vec::F vr = MODE == kRescale ? Vec::set1(rs[r]) : va;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cv = cr + Vec::W * v;
      if constexpr (MODE == kStore) {
        Vec::store(cv, Vec::mul(c[r][v], va));
      } else if constexpr (MODE == kAccum) {
        Vec::store(cv, Vec::add(Vec::load(cv), c[r][v]));
      } else {
        Vec::store(cv, Vec::fmadd(Vec::load(cv), vr, c[r][v]));
      }
    }
  }
}

// Columns [n, n + Vec::W * NV) of every row: tiles of 6 rows, then one of the remaining 1-5.
template <int NV, bool AT, int MODE>
inline void gemm_cols(const Gemm<float>& g, int64_t n) {
  const int64_t sa = AT ? g.sak : g.sam, ma = AT ? 1 : g.sam;
  const float* B = g.B + n;
  float* C = g.C + n;
  int64_t m = 0;
  for (; m + 6 <= g.M; m += 6)
    micro<6, NV, AT, MODE>(g.K, g.A + m * ma, sa, B, g.sbk, C + m * g.scm, g.scm, g.alpha, g.rs + (g.rs ? m : 0));
  const float* A = g.A + m * ma;
  const float* rs = g.rs ? g.rs + m : nullptr;
  C += m * g.scm;
  switch (g.M - m) {
    case 5: micro<5, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 4: micro<4, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 3: micro<3, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 2: micro<2, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 1: micro<1, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    default: break;
  }
}

// All columns: tiles of 2 vectors, then 1; the AVX-512 copy first takes tiles of 4 (24 of its 32 registers
// accumulate: twice the multiply-adds per broadcast A element and per call; attention at L 512-2048 5-9% faster,
// forward and backward) and leaves the last 8 columns to the AVX2 tile.
template <bool AT, int MODE>
void gemm_tiles(const Gemm<float>& g) {
  int64_t n = 0;
  if constexpr (Vec::W > 8) {
    for (; n + 4 * Vec::W <= g.N; n += 4 * Vec::W) gemm_cols<4, AT, MODE>(g, n);
  }
  for (; n + 2 * Vec::W <= g.N; n += 2 * Vec::W) gemm_cols<2, AT, MODE>(g, n);
  if (n + Vec::W <= g.N) {
    gemm_cols<1, AT, MODE>(g, n);
    n += Vec::W;
  }
  if constexpr (Vec::W > 8) {
    if (n < g.N) avx2::gemm_cols<1, AT, MODE>(g, n);  // N % 8 == 0
  }
}

inline void gemm(const Gemm<float>& g) {
  if (g.M <= 0 || g.N <= 0) return;
  const bool at = g.sam == 1 && g.sak != 1;
  switch (g.mode) {
    case kStore: at ? gemm_tiles<true, kStore>(g) : gemm_tiles<false, kStore>(g); break;
    case kAccum: at ? gemm_tiles<true, kAccum>(g) : gemm_tiles<false, kAccum>(g); break;
    default: at ? gemm_tiles<true, kRescale>(g) : gemm_tiles<false, kRescale>(g); break;
  }
}
