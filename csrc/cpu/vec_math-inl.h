// Row reductions of vec_math.h, width-generic: compiled once per ISA by foreach_isa.h. No #include.

// max_j x[j] (-inf for n == 0)
inline float row_max(const float* x, int64_t n) {
  Vec::F m = Vec::set1(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) m = Vec::max(m, Vec::load(x + j));
  float r = Vec::reduce_max(m);
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

// sum_j a[j] * b[j], in Vec::W partial sums
inline float row_dot(const float* a, const float* b, int64_t n) {
  Vec::F s = Vec::zero();
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) s = Vec::fmadd(Vec::load(a + j), Vec::load(b + j), s);
  float r = Vec::reduce_add(s);
  for (; j < n; ++j) r += a[j] * b[j];
  return r;
}
