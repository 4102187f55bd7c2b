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
