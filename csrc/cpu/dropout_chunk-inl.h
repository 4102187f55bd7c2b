// One chunk of the dropout (at most kDropChunk elements), width-generic: compiled once per ISA by foreach_isa.h
// (and once for the scalar path) so that the keep flags come from that ISA's keep_row and the multiply pass is
// vectorised for it. No #include.

template <class T, class Acc>
inline void dropout_chunk(const T* x, T* out, int64_t n, float p, Acc scale, uint64_t seed, uint64_t ctr) {
  alignas(64) uint8_t keep[kDropChunk];
  keep_row(seed, ctr, n, p, keep);
  const Acc zero(0);
  for (int64_t j = 0; j < n; ++j) out[j] = from_acc<T>(to_acc(x[j]) * (keep[j] ? scale : zero));  // NaN * 0 = NaN
}
