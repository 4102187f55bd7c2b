// Philox on Vec::W consecutive counters at a time, width-generic: compiled once per ISA by foreach_isa.h (included
// by philox.h). No #include.

// a * b per 32-bit lane (a: a 32-bit splat): returns the high words, the low words in *lo.
inline Vec::I mulhilo(Vec::I a, Vec::I b, Vec::I* lo) {
  const Vec::I pe = Vec::mul_epu32(a, b);
  const Vec::I po = Vec::mul_epu32(a, Vec::srli64<32>(b));
  *lo = Vec::blend_odd(pe, Vec::slli64<32>(po));
  return Vec::blend_odd(Vec::srli64<32>(pe), po);
}

// philox_uniform(seed, (hi << 32) + lo0 + i) for lane i < Vec::W; lo0 + i must not carry into the high word.
inline Vec::F philox_uniform(uint64_t seed, uint32_t lo0, uint32_t hi) {
  Vec::I c0 = Vec::addi(Vec::set1i(lo0), Vec::lane_index());
  Vec::I c1 = Vec::set1i(hi), c2 = Vec::zeroi(), c3 = Vec::zeroi();
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const Vec::I ra = Vec::set1i(kPhiloxRoundA), rb = Vec::set1i(kPhiloxRoundB);
  for (int r = 0; r < 10; ++r) {
    Vec::I loa, lob;
    const Vec::I hia = mulhilo(ra, c0, &loa), hib = mulhilo(rb, c2, &lob);
    c0 = Vec::xori(Vec::xori(hib, c1), Vec::set1i(k0));
    c2 = Vec::xori(Vec::xori(hia, c3), Vec::set1i(k1));
    c1 = lob;
    c3 = loa;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const Vec::I x = Vec::xori(c0, Vec::srai32<31>(c0));  // x < 0 ? ~x : x
  return Vec::mul(Vec::to_float(x), Vec::set1(kUniformScale));
}

// keep_row_scalar, Vec::W counters at a time; the rest by the next narrower path (AVX-512 -> AVX2 -> scalar).
inline void keep_row(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
  const Vec::F vp = Vec::set1(p);
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) {
    const uint64_t c = ctr + uint64_t(j);
    const uint32_t lo = uint32_t(c);
    if (lo > 0xFFFFFFFFu - uint32_t(Vec::W - 1)) {  // the group crosses a 2^32 boundary of the counter
      keep_row_scalar(seed, c, Vec::W, p, keep + j);
      continue;
    }
    Vec::store_ge(keep + j, philox_uniform(seed, lo, uint32_t(c >> 32)), vp);
  }
  if constexpr (Vec::W > 8) {
    avx2::keep_row(seed, ctr + uint64_t(j), n - j, p, keep + j);
  } else {
    keep_row_scalar(seed, ctr + uint64_t(j), n - j, p, keep + j);
  }
}
