// Philox on Vec::W consecutive counters at a time, width-generic: compiled once per ISA by foreach_isa.h (included
// by philox.h). No #include.

// a * b per 32-bit lane (a: a 32-bit splat): returns the high words, the low words in *lo.
inline Vec::I mulhilo(Vec::I a, Vec::I b, Vec::I* lo) {
  const Vec::I pe = Vec::mul_epu32(a, b);
  const Vec::I po = Vec::mul_epu32(a, Vec::srli64<32>(b));
  *lo = Vec::blend_odd(pe, Vec::slli64<32>(po));
  return Vec::blend_odd(Vec::srli64<32>(pe), po);
}

inline Vec::F word_uniform(Vec::I c) {
  const Vec::I x = Vec::xori(c, Vec::srai32<31>(c));  // x < 0 ? ~x : x
  return Vec::mul(Vec::to_float(x), Vec::set1(kUniformScale));
}

// Flags of the 4 * Vec::W logical counters from 4 * ((hi << 32) + lo0): byte 4 * lane + k = (word k of Philox at
// counter (hi << 32) + lo0 + lane) >= p, written to keep. lo0 + lane must not carry into the high word.
inline void keep_group(uint64_t seed, uint32_t lo0, uint32_t hi, Vec::F vp, uint8_t* keep) {
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
  // each 32-bit lane holds its counter's four flags as bytes 0..3 (little endian): stored, they are in order
  const Vec::I f = Vec::ori(Vec::ori(Vec::ge01(word_uniform(c0), vp), Vec::slli32<8>(Vec::ge01(word_uniform(c1), vp))),
                            Vec::ori(Vec::slli32<16>(Vec::ge01(word_uniform(c2), vp)),
                                     Vec::slli32<24>(Vec::ge01(word_uniform(c3), vp))));
  Vec::storei(keep, f);
}

// keep_row_scalar's flags, 4 * Vec::W at a time; partial groups (a start or end inside a Philox counter's four
// words, or a short row) through a buffer.
inline void keep_row(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
  constexpr int64_t G = 4 * Vec::W;
  const Vec::F vp = Vec::set1(p);
  alignas(64) uint8_t buf[G];
  for (int64_t j = 0; j < n;) {
    const uint64_t i = ctr + uint64_t(j), c = i >> 2;
    const int64_t skip = int64_t(i & 3), take = std::min(G - skip, n - j);
    uint8_t* dst = take == G ? keep + j : buf;
    const uint32_t lo = uint32_t(c);
    if (lo > 0xFFFFFFFFu - uint32_t(Vec::W - 1)) {  // the group crosses a 2^32 boundary of the counter
      keep_row_scalar(seed, c << 2, G, p, dst);
    } else {
      keep_group(seed, lo, uint32_t(c >> 32), vp, dst);
    }
    if (dst == buf) std::memcpy(keep + j, buf + skip, size_t(take));
    j += take;
  }
}
