// The key loop of the CPU decode attention (decode_kernel.cpp), width-generic: compiled by foreach_isa.h for
// AVX2 (8 lanes) and AVX-512F (16 lanes), and for the portable path with one lane. No #include. Needs from the
// including namespace: Vec (vec_traits.h), vexp2(Vec::F), vtanh(Vec::F), reduce8(Vec::F[8], float*) and
// widen(const In*, int64_t, float*).

// dst[j] = q . k_j for j < n; q and the k rows hold Dp floats (Dp a multiple of Vec::W; zero past the head dim).
// Eight keys at a time, their eight sums reduced together (reduce8: one transposing tree, not eight reductions).
inline void dot_keys(const float* q, const float* k, int64_t sk, int64_t n, int64_t Dp, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* kj = k + j * sk;
    typename Vec::F a[8];
    for (int t = 0; t < 8; ++t) a[t] = Vec::zero();
    for (int64_t e = 0; e < Dp; e += Vec::W) {
      const typename Vec::F qv = Vec::load(q + e);
      for (int t = 0; t < 8; ++t) a[t] = Vec::fmadd(qv, Vec::load(kj + t * sk + e), a[t]);
    }
    reduce8(a, dst + j);
  }
  for (; j < n; ++j) {
    const float* kj = k + j * sk;
    typename Vec::F a = Vec::zero();
    for (int64_t e = 0; e < Dp; e += Vec::W) a = Vec::fmadd(Vec::load(q + e), Vec::load(kj + e), a);
    dst[j] = Vec::reduce_add(a);
  }
}

// Two query rows at once (GQA groups, several queries): each K load serves both. Four keys x two rows per reduce8.
inline void dot_keys2(const float* q0, const float* q1, const float* k, int64_t sk, int64_t n, int64_t Dp,
                      float* d0, float* d1) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* kj = k + j * sk;
    typename Vec::F a[8];
    for (int t = 0; t < 8; ++t) a[t] = Vec::zero();
    for (int64_t e = 0; e < Dp; e += Vec::W) {
      const typename Vec::F x0 = Vec::load(q0 + e), x1 = Vec::load(q1 + e);
      for (int t = 0; t < 4; ++t) {
        const typename Vec::F kv = Vec::load(kj + t * sk + e);
        a[t] = Vec::fmadd(x0, kv, a[t]);
        a[4 + t] = Vec::fmadd(x1, kv, a[4 + t]);
      }
    }
    float r[8];
    reduce8(a, r);
    for (int t = 0; t < 4; ++t) d0[j + t] = r[t], d1[j + t] = r[4 + t];
  }
  if (j < n) {
    dot_keys(q0, k + j * sk, sk, n - j, Dp, d0 + j);
    dot_keys(q1, k + j * sk, sk, n - j, Dp, d1 + j);
  }
}

// o0 += sum_j p0[j] v_j and o1 += sum_j p1[j] v_j, each V load serving both rows; sparse: keys with p0[j] and
// p1[j] both 0 are skipped (masked keys: their V rows are never read)
inline void add_pv2(const float* p0, const float* p1, const float* v, int64_t sv, int64_t n, int64_t Dvp, float* o0,
                    float* o1, bool sparse) {
  int64_t e = 0;
  for (; e + 4 * Vec::W <= Dvp; e += 4 * Vec::W) {
    typename Vec::F a[4], b[4];
    for (int c = 0; c < 4; ++c) a[c] = Vec::load(o0 + e + c * Vec::W), b[c] = Vec::load(o1 + e + c * Vec::W);
    for (int64_t j = 0; j < n; ++j) {
      if (sparse && p0[j] == 0.0f && p1[j] == 0.0f) continue;
      const typename Vec::F x0 = Vec::set1(p0[j]), x1 = Vec::set1(p1[j]);
      const float* vj = v + j * sv + e;
      for (int c = 0; c < 4; ++c) {
        const typename Vec::F vv = Vec::load(vj + c * Vec::W);
        a[c] = Vec::fmadd(x0, vv, a[c]);
        b[c] = Vec::fmadd(x1, vv, b[c]);
      }
    }
    for (int c = 0; c < 4; ++c) Vec::store(o0 + e + c * Vec::W, a[c]), Vec::store(o1 + e + c * Vec::W, b[c]);
  }
  for (; e < Dvp; e += Vec::W) {
    typename Vec::F a = Vec::load(o0 + e), b = Vec::load(o1 + e);
    for (int64_t j = 0; j < n; ++j) {
      if (sparse && p0[j] == 0.0f && p1[j] == 0.0f) continue;
      const typename Vec::F vv = Vec::load(v + j * sv + e);
      a = Vec::fmadd(Vec::set1(p0[j]), vv, a);
      b = Vec::fmadd(Vec::set1(p1[j]), vv, b);
    }
    Vec::store(o0 + e, a);
    Vec::store(o1 + e, b);
  }
}

// o[e, e + C * W) += sum_j p[j] v_j[e, e + C * W): C accumulators; with fewer than 8 (no cover for the FMA
// latency) two keys at a time into two sets. sparse: keys with p[j] == 0 are skipped (masked keys' V never read).
template <int C>
inline void add_pv_cols(const float* p, const float* v, int64_t sv, int64_t n, float* o, bool sparse) {
  constexpr bool two = C < 8;
  typename Vec::F a[C], b[C];
  for (int c = 0; c < C; ++c) a[c] = Vec::load(o + c * Vec::W), b[c] = Vec::zero();
  int64_t j = 0;
  if (two && !sparse) {
    for (; j + 2 <= n; j += 2) {
      const typename Vec::F p0 = Vec::set1(p[j]), p1 = Vec::set1(p[j + 1]);
      const float* v0 = v + j * sv;
      for (int c = 0; c < C; ++c) a[c] = Vec::fmadd(p0, Vec::load(v0 + c * Vec::W), a[c]);
      for (int c = 0; c < C; ++c) b[c] = Vec::fmadd(p1, Vec::load(v0 + sv + c * Vec::W), b[c]);
    }
  }
  for (; j < n; ++j) {
    if (sparse && p[j] == 0.0f) continue;
    const typename Vec::F pj = Vec::set1(p[j]);
    for (int c = 0; c < C; ++c) a[c] = Vec::fmadd(pj, Vec::load(v + j * sv + c * Vec::W), a[c]);
  }
  for (int c = 0; c < C; ++c) Vec::store(o + c * Vec::W, two ? Vec::add(a[c], b[c]) : a[c]);
}

// o[0, Dvp) += sum_j p[j] v_j, in column chunks of 8 vectors (a whole D 64 row on AVX2: one pass over the block's
// V rows, each read in full, as a memory stream wants), then 4, then 1.
inline void add_pv(const float* p, const float* v, int64_t sv, int64_t n, int64_t Dvp, float* o, bool sparse) {
  int64_t e = 0;
  for (; e + 8 * Vec::W <= Dvp; e += 8 * Vec::W) add_pv_cols<8>(p, v + e, sv, n, o + e, sparse);
  for (; e + 4 * Vec::W <= Dvp; e += 4 * Vec::W) add_pv_cols<4>(p, v + e, sv, n, o + e, sparse);
  for (; e < Dvp; e += Vec::W) add_pv_cols<1>(p, v + e, sv, n, o + e, sparse);
}

// x[j] = 2^(x[j] - m) for j < n (2^-inf = 0); returns the sum
inline float exp2_sum_row(float* x, int64_t n, float m) {
  const typename Vec::F neg_m = Vec::set1(-m);
  typename Vec::F s = Vec::zero();
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) {
    const typename Vec::F e = vexp2(Vec::add(Vec::load(x + j), neg_m));
    Vec::store(x + j, e);
    s = Vec::add(s, e);
  }
  float r = Vec::reduce_add(s);
  for (; j < n; ++j) {
    x[j] = std::exp2(x[j] - m);
    r += x[j];
  }
  return r;
}

inline float max_row(const float* x, int64_t n) {
  typename Vec::F mv = Vec::set1(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) mv = Vec::max(mv, Vec::load(x + j));
  float r = Vec::reduce_max(mv);
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

// x = c * tanh(x)
inline void softcap_row(float* x, int64_t n, float c) {
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) Vec::store(x + j, Vec::mul(Vec::set1(c), vtanh(Vec::load(x + j))));
  for (; j < n; ++j) x[j] = c * std::tanh(x[j]);
}

// The keys [j0, j1) of one split for the M = G * L query rows of one (batch, kv head): updates the running output
// o (M x Dvp, unnormalised), maxima m and sums l (base 2) of every row. q: M x Dp rows, pre-scaled.
template <class In>
void decode_keys(const DecodeJob& J, const float* q, float* o, float* m, float* l, float* s, float* kbuf,
                 float* vbuf, uint8_t* km) {
  const int64_t Dp = round_up(J.E, Vec::W), Dvp = round_up(J.Ev, Vec::W);
  const bool k_direct = std::is_same_v<In, float> && Dp == J.E;
  const bool v_direct = std::is_same_v<In, float> && Dvp == J.Ev;
  const float ninf = -std::numeric_limits<float>::infinity();
  if (!k_direct) std::fill(kbuf, kbuf + kDecodeBlock * Dp, 0.0f);
  if (!v_direct) std::fill(vbuf, vbuf + kDecodeBlock * Dvp, 0.0f);
  const In* kin = static_cast<const In*>(J.k);
  const In* vin = static_cast<const In*>(J.v);
  for (int64_t jb = J.j0; jb < J.j1; jb += kDecodeBlock) {
    const int64_t n = std::min<int64_t>(kDecodeBlock, J.j1 - jb);
    bool any_masked = false;
    if (J.keep) {
      bool any_kept = false;
      for (int64_t t = 0; t < n; ++t) {
        km[t] = J.keep[(jb + t) * J.keep_stride] != 0;
        any_kept |= km[t] != 0;
        any_masked |= km[t] == 0;
      }
      if (!any_kept) continue;  // a block of padding (a static cache's unwritten slots): never read
    }
    const float* kb = kbuf;  // the block's K and V rows in float32: in place when the input allows it
    const float* vb = vbuf;
    int64_t skb = Dp, svb = Dvp;
    bool kd = false, vd = false;
    if constexpr (std::is_same_v<In, float>) {
      if (k_direct) kb = kin + jb * J.sk, skb = J.sk, kd = true;
      if (v_direct) vb = vin + jb * J.sv, svb = J.sv, vd = true;
    }
    for (int64_t t = 0; t < n; ++t) {
      if (any_masked && !km[t]) continue;
      if (!kd) widen(kin + (jb + t) * J.sk, J.E, kbuf + t * Dp);
      if (!vd) widen(vin + (jb + t) * J.sv, J.Ev, vbuf + t * Dvp);
    }
    // row r's scores (in s) -> its probabilities; rescales its output. False: no key for the row yet.
    auto softmax = [&](int64_t r) {
      float* sr = s + r * kDecodeBlock;
      if (J.cap2 > 0) softcap_row(sr, n, J.cap2);
      if (any_masked)
        for (int64_t t = 0; t < n; ++t) sr[t] = km[t] ? sr[t] : ninf;
      if (J.causal) {  // row r is query i = r % L: it sees keys j <= i + len - L
        const int64_t last = r % J.L + J.len - J.L;
        for (int64_t t = std::max<int64_t>(0, last + 1 - jb); t < n; ++t) sr[t] = ninf;
      }
      const float mn = running_max(m[r], max_row(sr, n), sr, n);
      if (mn == ninf) return false;
      const float alpha = std::exp2(m[r] - mn);
      l[r] = l[r] * alpha + exp2_sum_row(sr, n, mn);
      m[r] = mn;
      float* orow = o + r * Dvp;
      if (alpha != 1.0f)
        for (int64_t e = 0; e < Dvp; e += Vec::W) Vec::store(orow + e, Vec::mul(Vec::set1(alpha), Vec::load(orow + e)));
      return true;
    };
    int64_t r = 0;
    for (; r + 2 <= J.M; r += 2) {  // rows in pairs: one pass over the block's K and V rows serves both
      float *s0 = s + r * kDecodeBlock, *s1 = s0 + kDecodeBlock;
      dot_keys2(q + r * Dp, q + (r + 1) * Dp, kb, skb, n, Dp, s0, s1);
      const bool live0 = softmax(r), live1 = softmax(r + 1);
      if (live0 && live1) {
        add_pv2(s0, s1, vb, svb, n, Dvp, o + r * Dvp, o + (r + 1) * Dvp, any_masked);
      } else if (live0 || live1) {
        add_pv(live0 ? s0 : s1, vb, svb, n, Dvp, o + (live0 ? r : r + 1) * Dvp, any_masked);
      }
    }
    if (r < J.M) {
      dot_keys(q + r * Dp, kb, skb, n, Dp, s + r * kDecodeBlock);
      if (softmax(r)) add_pv(s + r * kDecodeBlock, vb, svb, n, Dvp, o + r * Dvp, any_masked);
    }
  }
}
