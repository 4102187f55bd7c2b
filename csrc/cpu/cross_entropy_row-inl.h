// One float32 row of the CPU cross-entropy (cross_entropy_kernel.cpp), width-generic: compiled once per ISA by
// foreach_isa.h, and once with one lane. Needs from the including namespace: Vec (vec_traits.h) and vexp2(Vec::F).
// No #include.

// x: V floats, in place. Returns logsumexp(x) - x[t]; with grad, x becomes softmax(x) - onehot(t). Three passes
// over a row that stays in L2: the max; 2^((x - max) log2 e), summed (and stored when grad); the scale by 1 / sum.
inline float ce_row(float* x, int64_t V, int64_t t, bool grad) {
  const float xt = x[t];
  const float m = row_max(x, V);
  const float l2e = 1.4426950408889634f;
  const typename Vec::F vl2e = Vec::set1(l2e), vmb = Vec::set1(-m * l2e);
  typename Vec::F acc = Vec::zero();
  int64_t j = 0;
  if (grad) {
    for (; j + Vec::W <= V; j += Vec::W) {
      const typename Vec::F e = vexp2(Vec::fmadd(Vec::load(x + j), vl2e, vmb));
      Vec::store(x + j, e);
      acc = Vec::add(acc, e);
    }
  } else {
    for (; j + Vec::W <= V; j += Vec::W) acc = Vec::add(acc, vexp2(Vec::fmadd(Vec::load(x + j), vl2e, vmb)));
  }
  float sum = Vec::reduce_add(acc);
  for (; j < V; ++j) {
    const float e = std::exp2(x[j] * l2e - m * l2e);
    if (grad) x[j] = e;
    sum += e;
  }
  if (grad) {
    const float inv = 1.0f / sum;
    const typename Vec::F vinv = Vec::set1(inv);
    j = 0;
    for (; j + Vec::W <= V; j += Vec::W) Vec::store(x + j, Vec::mul(Vec::load(x + j), vinv));
    for (; j < V; ++j) x[j] *= inv;
    x[t] -= 1.0f;
  }
  return std::log(sum) + m - xt;
}
