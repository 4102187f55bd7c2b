// CPU flash attention: forward and backward.
//
// Operands: every matrix product is one routine, gemm (C = alpha A B, C += A B or C = C * rs[m] + A B; A read
//   through two strides so that it may be transposed), on operands in the compute type (float32; float64 for
//   float64 inputs): K^T and V^T per key block of kBN keys ((E or Ev) x kBN, keys past S zero), packed lazily by the
//   first work item that needs a block; Q / dO / K / V rows read in place when the input already is in the compute
//   type and its rows are adjacent, else copied into row buffers padded to a multiple of 8 columns. (Rows a wide
//   stride apart, a head of a packed (B, L, 3 * H * D) projection, share a few L1 sets: read in place as a B
//   operand they made the products ~12% slower.)
// Kernel sets (attention_ops.h, chosen once at run time): Avx512 (AVX-512F register tiles of 6 rows x 32 or 16
//   columns and 16-lane exp), Avx2 (AVX2/FMA register tiles of 6 rows x 16 or 8 columns, 8-lane exp / tanh /
//   Philox), Portable (plain loops; also the float64 path). FASTATTN_CPU_NO_AVX512=1 and FASTATTN_CPU_NO_AVX2=1
//   force the lower ones. Their parts: gemm_f32.h (tiles), vec_math.h (exp2, tanh), philox.h, kernel_util.h.
// Forward: one work item per (batch, head, block of kBM queries), OpenMP dynamic schedule. Per key block, stripes
//   of kMR query rows: S = Q K^T (scaled to base 2) -> softcap / alibi / mask / bounds, only on tiles that need them
//   -> online softmax (max, exp2, sum) -> O = O * alpha + P V. Key blocks (and key columns of a block, by multiples
//   of 8) that the causal / window bounds rule out are skipped; in a diagonal block each stripe stops at the last
//   key its last row sees. out = O / l, lse = (m + log2 l) ln 2.
// Backward: P is recomputed per (query block, key block) tile from lse (recomputed in float64 for float64 inputs);
//   a tile the bounds cut diagonally runs as sub-tiles of kSubBM queries, each trimmed to its keys;
//   delta = rowsum(dO * O). "fused" schedule (enough (batch, kv head) groups for the threads): one item per group
//   computes dQ, dK and dV of all its query heads (5 products per tile, no races). "split" schedule otherwise:
//   dK/dV items per (batch, kv head, key block) and dQ items per (batch, head, query block) (7 products per tile).
#include "attention_kernel.h"
#include "attention_ops.h"
#include "cpu_features.h"
#include "float_bits.h"
#include "gemm_f32.h"
#include "kernel_util.h"
#include "philox.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastattn {
namespace cpu {
namespace {

constexpr int kDotMaxL = 16;  // forward with L <= this: scores as dot products with K rows (no K^T packing)
// forward: query blocks per work item (at most). 8 (512 queries): up to L 512 a head is one item, so its K^T / V
// blocks are packed once, not once by each thread that takes one of its chunks (L512 x batch 8: 2-5% faster than 4)
constexpr int kChunk = 8;
constexpr int kSubBM = 12;    // backward: queries per sub-tile of a tile the causal / window bounds cut
constexpr double kLog2e = 1.44269504088896340736;
constexpr double kLn2 = 0.69314718055994530942;

// ---------------------------------------------------------------------------------------------------------------
// Rows of a (B, heads, n, width) operand in the compute type: a packed buffer of ours, or the input itself when
// it already is in the compute type (and, for a B operand, its width is a multiple of 8).
template <class T>
struct Rows {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const T* at(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
  static Rows packed(const T* p, int64_t heads, int64_t n, int64_t width) { return {p, heads * n * width, n * width, width}; }
  static Rows input(const AttnView& v) { return {static_cast<const T*>(v.data), v.stride[0], v.stride[1], v.stride[2]}; }
};

// ---------------------------------------------------------------------------------------------------------------
// The attention itself, for compute type T, kernel set Ops and input storage type In.
template <class T, class Ops, class In>
class Attention {
 public:
  explicit Attention(const AttnArgs& a) : a_(a) {
    B = a.B; H = a.H; Hk = a.Hk; L = a.L; S = a.S; E = a.E; Ev = a.Ev;
    G = Hk > 0 ? H / Hk : 1;
    Ep = round_up(E, 8);
    Evp = round_up(Ev, 8);
    nqb = cdiv(L, kBM);
    nkb = cdiv(S, kBN);
    causal = a.causal;
    diag = a.diag_offset;
    // a window wider than every |i + diag - j| is unbounded (also keeps the bound arithmetic far from overflow)
    const int64_t span = L + S + (diag < 0 ? -diag : diag) + 1;
    wl = a.window_left < 0 || a.window_left > span ? -1 : a.window_left;
    wr = a.window_right < 0 || a.window_right > span ? -1 : a.window_right;
    has_mask = a.mask.data != nullptr;
    has_alibi = a.alibi != nullptr;
    softcap = a.softcap > 0;
    dropout = a.dropout_p > 0;
    p_drop = float(a.dropout_p);
    keep_scale = dropout ? T(1.0 / (1.0 - a.dropout_p)) : T(1);
    alpha_s = softcap ? T(a.scale / a.softcap) : T(a.scale * kLog2e);
    cap2 = T(a.softcap * kLog2e);
    nt = std::max(1, a.num_threads);
  }

  void forward(const AttnFwdArgs& f);
  void backward(const AttnBwdArgs& g);

 private:
  const AttnArgs& a_;
  int64_t B, H, Hk, G, L, S, E, Ev, Ep, Evp, nqb, nkb, diag, wl, wr;
  bool causal, has_mask, has_alibi, softcap, dropout;
  float p_drop;
  T keep_scale, alpha_s, cap2;
  int nt;

  template <class X>
  const X* ptr(const AttnView& v, int64_t i0, int64_t i1, int64_t i2) const {
    return static_cast<const X*>(v.data) + i0 * v.stride[0] + i1 * v.stride[1] + i2 * v.stride[2];
  }
  int64_t bk_of(int64_t b, int64_t h) const { return b * Hk + h / G; }
  uint64_t counter(int64_t b, int64_t h, int64_t i) const {  // dropout counter of (b, h, i, 0): rows S4 apart
    const int64_t rl = a_.rng_L > 0 ? a_.rng_L : L, rs = a_.rng_L > 0 ? a_.rng_S : S;
    return a_.offset + (uint64_t((a_.rng_b + b) * H + h) * uint64_t(rl) + uint64_t(i)) * dropout_row_stride(rs);
  }

  // keys [jlo, jhi) that some query of [i0, i0 + bm) may see
  void kv_range(int64_t i0, int64_t bm, int64_t& jlo, int64_t& jhi) const {
    jlo = 0;
    jhi = S;
    const int64_t last = i0 + bm - 1;
    if (causal) jhi = std::min(jhi, last + diag + 1);
    if (wr >= 0) jhi = std::min(jhi, last + diag + wr + 1);
    if (wl >= 0) jlo = std::max(jlo, i0 + diag - wl);
    jlo = std::min(jlo, S);  // a left window past the last key: none (the loops over [jlo, jhi) stay inside S)
    if (jhi < jlo) jhi = jlo;
  }
  // queries [ilo, ihi) that may see some key of [j0, j0 + bn)
  void q_range(int64_t j0, int64_t bn, int64_t& ilo, int64_t& ihi) const {
    ilo = 0;
    ihi = L;
    if (causal) ilo = std::max(ilo, j0 - diag);
    if (wr >= 0) ilo = std::max(ilo, j0 - diag - wr);
    if (wl >= 0) ihi = std::min(ihi, j0 + bn - 1 - diag + wl + 1);
    ilo = std::min(ilo, L);  // likewise for queries past the last one
    if (ihi < ilo) ihi = ilo;
  }
  // keys [lo, hi) of the block starting at j0 that query i sees (bounds only)
  void row_range(int64_t i, int64_t j0, int64_t bn, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = bn;
    const int64_t d = i + diag - j0;
    if (causal) hi = std::min(hi, d + 1);
    if (wr >= 0) hi = std::min(hi, d + wr + 1);
    if (wl >= 0) lo = std::max(lo, d - wl);
    lo = std::min(std::max<int64_t>(lo, 0), bn);
    hi = std::min(std::max(hi, lo), bn);
  }
  bool bounds_full(int64_t i0, int64_t bm, int64_t j0, int64_t bn) const {
    if (causal && j0 + bn - 1 > i0 + diag) return false;
    if (wr >= 0 && j0 + bn - 1 > i0 + diag + wr) return false;
    if (wl >= 0 && j0 < i0 + bm - 1 + diag - wl) return false;
    return true;
  }

  // The scores tile s (bm x round_up(bn, 8), row stride kBN), given s = alpha_s * q k^T: turned into base-2 scores
  // (softcap, alibi, mask, bounds; -inf where masked). t (optional): tanh(q k^T scale / softcap), 0 where masked.
  // Returns false when the tile needed nothing (no masked entry: the exp may skip its exact-zero handling).
  bool scores(int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0, int64_t bn, T* s, T* t) const {
    const int64_t nbp = round_up(bn, 8);
    if (!softcap && !has_alibi && !has_mask && bn == nbp && bounds_full(i0, bm, j0, bn)) return false;
    const T ninf = -std::numeric_limits<T>::infinity();
    const T slope = has_alibi ? T(double(a_.alibi[b * H + h]) * kLog2e) : T(0);
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t i = i0 + r;
      T* row = s + r * kBN;
      T* trow = t ? t + r * kBN : nullptr;
      int64_t lo, hi;
      row_range(i, j0, bn, lo, hi);
      if (softcap && lo < hi) Ops::softcap_row(row, trow, nbp, cap2);
      for (int64_t j = 0; j < lo; ++j) row[j] = ninf;
      for (int64_t j = hi; j < nbp; ++j) row[j] = ninf;
      if (trow) {
        for (int64_t j = 0; j < lo; ++j) trow[j] = 0;
        for (int64_t j = hi; j < nbp; ++j) trow[j] = 0;
      }
      if (lo >= hi) continue;
      if (has_alibi) {
        const int64_t d = i + diag - j0;
        for (int64_t j = lo; j < hi; ++j) row[j] -= slope * T(d > j ? d - j : j - d);
      }
      if (has_mask) apply_mask(b, h, i, j0, lo, hi, row);
    }
    return true;
  }

  void apply_mask(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t lo, int64_t hi, T* row) const {
    const AttnView& m = a_.mask;
    const int64_t sj = m.stride[3];
    const int64_t base = b * m.stride[0] + h * m.stride[1] + i * m.stride[2] + j0 * sj;
    const T ninf = -std::numeric_limits<T>::infinity();
    switch (a_.mask_dtype) {
      case AttnDType::kBool: {
        const uint8_t* mp = static_cast<const uint8_t*>(m.data) + base;
        for (int64_t j = lo; j < hi; ++j) row[j] = mp[j * sj] ? row[j] : ninf;
        break;
      }
      case AttnDType::kFloat32: add_mask(static_cast<const float*>(m.data) + base, sj, lo, hi, row); break;
      case AttnDType::kFloat64: add_mask(static_cast<const double*>(m.data) + base, sj, lo, hi, row); break;
      case AttnDType::kFloat16: add_mask(static_cast<const Half*>(m.data) + base, sj, lo, hi, row); break;
      case AttnDType::kBFloat16: add_mask(static_cast<const BF16*>(m.data) + base, sj, lo, hi, row); break;
    }
  }
  template <class M>
  static void add_mask(const M* mp, int64_t sj, int64_t lo, int64_t hi, T* row) {
    // in the compute type (the reference adds mask.to(compute dtype)), then to base 2
    for (int64_t j = lo; j < hi; ++j) row[j] += T(T(to_acc(mp[j * sj])) * T(kLog2e));
  }

  void fwd_item(const AttnFwdArgs& f, int64_t b, int64_t h, int64_t qb, const T* ktg, const Rows<T>& kr,
                const Rows<T>& vr, T* buf, uint8_t* keep) const;
  bool trim(int64_t& i0, int64_t& bm, int64_t& j0, int64_t& bn) const;
  void exact_lse2(int64_t b, int64_t h, int64_t i0, int64_t bm, T* lse2) const;
  void bwd_tile(int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0, int64_t bn, T* dq, T* dk, T* dv, T* buf,
                uint8_t* keep) const;
  // the tile of query block qb and key block kb, trimmed; dq holds query rows from dq0, dk / dv key rows from dk0
  // A tile the bounds cut diagonally goes in sub-tiles of kSubBM queries, each trimmed to the keys it sees: the
  // masked upper triangle is mostly not multiplied.
  void bwd_block(int64_t b, int64_t h, int64_t qb, int64_t kb, T* dq, int64_t dq0, T* dk, T* dv, int64_t dk0,
                 T* buf, uint8_t* keep) const {
    int64_t i0 = qb * kBM, bm = std::min<int64_t>(kBM, L - i0), j0 = kb * kBN, bn = std::min<int64_t>(kBN, S - j0);
    if (!trim(i0, bm, j0, bn)) return;
    const int64_t sub = bounds_full(i0, bm, j0, bn) ? bm : kSubBM;
    for (int64_t s0 = 0; s0 < bm; s0 += sub) {
      int64_t si = i0 + s0, sm = std::min(sub, bm - s0), sj = j0, sn = bn;
      if (sub < bm && !trim(si, sm, sj, sn)) continue;
      bwd_tile(b, h, si, sm, sj, sn, dq ? dq + (si - dq0) * Ep : nullptr, dk ? dk + (sj - dk0) * Ep : nullptr,
               dv ? dv + (sj - dk0) * Evp : nullptr, buf, keep);
    }
  }

  // packed backward operands
  Rows<T> qr_, dor_, kr_;
  const T *kt_ = nullptr, *vt_ = nullptr;
  const T *delta_ = nullptr, *lse2_ = nullptr;
};

// ---- forward ---------------------------------------------------------------------------------------------------
template <class T, class Ops, class In>
// ktg: the packed K^T blocks of this head, or nullptr for dot mode (scores from the K rows kr)
void Attention<T, Ops, In>::fwd_item(const AttnFwdArgs& f, int64_t b, int64_t h, int64_t qb, const T* ktg,
                                     const Rows<T>& kr, const Rows<T>& vr, T* buf, uint8_t* keep) const {
  const int64_t i0 = qb * kBM, bm = std::min<int64_t>(kBM, L - i0), kvh = h / G;
  const int64_t so = f.out.stride[2];
  In* out = static_cast<In*>(f.out.data) + b * f.out.stride[0] + h * f.out.stride[1] + i0 * so;
  float* lse = f.lse + (b * H + h) * L + i0;
  int64_t jlo, jhi;
  kv_range(i0, bm, jlo, jhi);
  if (jhi <= jlo) {  // no key for any row of the block
    for (int64_t r = 0; r < bm; ++r) {
      for (int64_t e = 0; e < Ev; ++e) out[r * so + e] = from_acc<In>(T(0));
      lse[r] = std::numeric_limits<float>::infinity();
    }
    return;
  }
  T* qbuf = buf;              // bm x Ep
  T* s = qbuf + kBM * Ep;     // kMR x kBN (one stripe)
  T* o = s + kMR * kBN;       // bm x Evp
  T* m = o + kBM * Evp;       // running max (base 2)
  T* l = m + kBM;             // running sum
  T* alpha = l + kBM;         // rescale factor of this block
  const T* q = qbuf;
  int64_t sq = Ep;
  if constexpr (std::is_same_v<In, T>) {  // an A operand: read in place
    q = ptr<T>(a_.q, b, h, i0);
    sq = a_.q.stride[2];
  } else {
    pack_rows(ptr<In>(a_.q, b, h, i0), a_.q.stride[2], bm, E, qbuf, Ep);
  }
  std::fill(o, o + bm * Evp, T(0));
  std::fill(m, m + bm, -std::numeric_limits<T>::infinity());
  std::fill(l, l + bm, T(0));
  const T* vrg = vr.at(b, kvh, 0);
  for (int64_t kb = jlo / kBN; kb * kBN < jhi; ++kb) {
    // the keys of the block that the bounds leave, starting at a multiple of 8 within the block
    const int64_t jb0 = kb * kBN, koff = std::max<int64_t>(0, jlo - jb0) / 8 * 8, j0 = jb0 + koff;
    const int64_t bnb = std::min(std::min<int64_t>(kBN, S - jb0), jhi - jb0) - koff;
    // stripes of kMR query rows: S stripe -> softmax -> P V, reusing the K^T / V blocks from cache
    for (int64_t r0 = 0; r0 < bm; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, bm - r0);
      // a diagonal block: the stripe stops at the last key its last row may see (the causal / right-window bound
      // grows with the row), so the masked upper triangle is not multiplied; a stripe that sees none skips it
      int64_t bn = bnb, lo_unused;
      if (causal || wr >= 0) row_range(i0 + r0 + mr - 1, j0, bnb, lo_unused, bn);
      if (bn <= 0) continue;
      const int64_t nbp = round_up(bn, 8);
      if (ktg) {
        Gemm<T> g;
        g.M = mr; g.N = nbp; g.K = E;
        g.A = q + r0 * sq; g.sam = sq; g.sak = 1;
        g.B = ktg + kb * E * kBN + koff; g.sbk = kBN;
        g.C = s; g.scm = kBN;
        g.mode = kStore; g.alpha = alpha_s;
        Ops::gemm(g);
      } else {
        Ops::dot_scores(q + r0 * sq, sq, mr, kr.at(b, kvh, j0), kr.s2, bn, E, alpha_s, s, kBN);
      }
      const bool exact = scores(b, h, i0 + r0, mr, j0, bn, s, nullptr);
      for (int64_t r = 0; r < mr; ++r) {
        T* row = s + r * kBN;
        const int64_t rr = r0 + r;
        const T mn = running_max(m[rr], Ops::row_max(row, nbp), row, nbp);
        if (mn == -std::numeric_limits<T>::infinity()) {  // no key for this row yet
          alpha[rr] = 1;
          std::fill(row, row + nbp, T(0));
          continue;
        }
        alpha[rr] = m[rr] == mn ? T(1) : T(std::exp2(m[rr] - mn));
        const T sum = Ops::exp2_sum(row, nbp, mn, exact);
        l[rr] = l[rr] * alpha[rr] + sum;
        m[rr] = mn;
        if (dropout) {
          Ops::keep_row(a_.seed, counter(b, h, i0 + rr) + uint64_t(j0), bn, p_drop, keep);
          Ops::dropout_fwd_row(row, keep, bn);
        }
      }
      Gemm<T> pv;
      pv.M = mr; pv.N = Evp; pv.K = bn;
      pv.A = s; pv.sam = kBN; pv.sak = 1;
      pv.B = vrg + j0 * vr.s2; pv.sbk = vr.s2;
      pv.C = o + r0 * Evp; pv.scm = Evp;
      pv.mode = kRescale; pv.rs = alpha + r0;
      Ops::gemm(pv);
    }
  }
  for (int64_t r = 0; r < bm; ++r) {
    const bool empty = l[r] == 0;  // (a NaN sum is no empty row: NaN out and lse)
    const T inv = empty ? T(0) : keep_scale / l[r];
    for (int64_t e = 0; e < Ev; ++e) out[r * so + e] = from_acc<In>(o[r * Evp + e] * inv);
    lse[r] = empty ? std::numeric_limits<float>::infinity()
                   : float((double(m[r]) + std::log2(double(l[r]))) * kLn2);
  }
}

template <class T, class Ops, class In>
void Attention<T, Ops, In>::forward(const AttnFwdArgs& f) {
  if (B == 0 || H == 0 || L == 0) return;
  // Work items: (batch, head, chunk of up to kChunk query blocks), dynamic schedule. Each thread packs the key
  // blocks its item needs into its own buffers (L2-resident; kept while it stays on the same kv head): K^T blocks
  // (or K rows, for short queries: dot mode) and V rows in the compute type. K / V rows already in the compute
  // type are read in place (V only when its rows are adjacent: see the top of this file).
  const bool dot = L <= kDotMaxL, k_direct = dot && std::is_same_v<In, T>;
  const bool v_direct = std::is_same_v<In, T> && Ev % 8 == 0 && a_.v.stride[2] == Ev;
  const int64_t nkt = dot ? 0 : nkb * E * kBN, nkr = !dot || k_direct ? 0 : S * Ep, nvr = v_direct ? 0 : S * Evp;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(kChunk, B * H * nqb / (8 * nt)));
  const int64_t nch = cdiv(nqb, chunk), items = B * H * nch;
  const int64_t work = round_up(kBM * Ep + kMR * kBN + kBM * Evp + 3 * kBM, 16);
  const int64_t per_thread = work + round_up(nkt, 16) + round_up(nkr, 16) + round_up(nvr, 16);
  ABuf<T> scratch(nt * per_thread);
  ABuf<uint8_t> keeps(nt * (kBN + nkb));
#pragma omp parallel num_threads(nt) if (nt > 1 && items > 1)
  {
    const int tid = thread_id();
    T* buf = scratch.get() + tid * per_thread;
    T* kt = buf + work;
    T* kbuf = kt + round_up(nkt, 16);
    T* vbuf = kbuf + round_up(nkr, 16);
    uint8_t* keep = keeps.get() + tid * (kBN + nkb);
    uint8_t* have = keep + kBN;  // key blocks of kv head `cur` packed in this thread's buffers
    int64_t cur = -1;
    const Rows<T> kr = k_direct ? Rows<T>::input(a_.k) : Rows<T>{kbuf, 0, 0, Ep};
    const Rows<T> vr = v_direct ? Rows<T>::input(a_.v) : Rows<T>{vbuf, 0, 0, Evp};
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < items; ++idx) {
      const int64_t bh = idx / nch, ci = nch - 1 - idx % nch;  // heavy (causal) chunks first
      const int64_t b = bh / H, h = bh % H, bk = b * Hk + h / G;
      const int64_t qb0 = ci * chunk, qb1 = std::min(nqb, qb0 + chunk);
      int64_t jlo, jhi;  // the keys of the chunk (both bounds grow with the query index: the union of its blocks')
      kv_range(qb0 * kBM, std::min(L, qb1 * kBM) - qb0 * kBM, jlo, jhi);
      if (bk != cur) {
        std::fill(have, have + nkb, uint8_t(0));
        cur = bk;
      }
      for (int64_t kb = jlo / kBN; kb * kBN < jhi; ++kb) {
        if (have[kb]) continue;
        have[kb] = 1;
        const int64_t j0 = kb * kBN, bn = std::min<int64_t>(kBN, S - j0), kvh = h / G;
        if (nkt) Ops::pack_t(ptr<In>(a_.k, b, kvh, j0), a_.k.stride[2], bn, E, kt + kb * E * kBN);
        if (nkr) pack_rows(ptr<In>(a_.k, b, kvh, j0), a_.k.stride[2], bn, E, kbuf + j0 * Ep, Ep);
        if (nvr) pack_rows(ptr<In>(a_.v, b, kvh, j0), a_.v.stride[2], bn, Ev, vbuf + j0 * Evp, Evp);
      }
      for (int64_t qb = qb1 - 1; qb >= qb0; --qb) fwd_item(f, b, h, qb, nkt ? kt : nullptr, kr, vr, buf, keep);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------------------
// Shrinks the tile [i0, i0 + bm) x [j0, j0 + bn) (inside one key block) to the queries and keys that the causal /
// window bounds leave; j0 moves by a multiple of 8 within its block. False when nothing is left.
template <class T, class Ops, class In>
bool Attention<T, Ops, In>::trim(int64_t& i0, int64_t& bm, int64_t& j0, int64_t& bn) const {
  int64_t jlo, jhi, ilo, ihi;
  kv_range(i0, bm, jlo, jhi);
  const int64_t jend = std::min(j0 + bn, jhi);
  const int64_t ja = j0 + std::max<int64_t>(0, jlo - j0) / 8 * 8;
  if (jend <= ja || jend <= jlo) return false;
  q_range(ja, jend - ja, ilo, ihi);
  const int64_t ia = std::max(i0, ilo), iend = std::min(i0 + bm, ihi);
  if (iend <= ia) return false;
  i0 = ia;
  bm = iend - ia;
  j0 = ja;
  bn = jend - ja;
  return true;
}

// Base-2 logsumexp of the scores of queries [i0, i0 + bm) recomputed in T (+inf for a row with no key). The
// float64 backward uses it instead of the float32 lse of the contract, for gradients exact to float64.
template <class T, class Ops, class In>
void Attention<T, Ops, In>::exact_lse2(int64_t b, int64_t h, int64_t i0, int64_t bm, T* lse2) const {
  T s[kMR * kBN];
  const int64_t bk = b * Hk + h / G;
  int64_t jlo, jhi;
  kv_range(i0, bm, jlo, jhi);
  for (int64_t r0 = 0; r0 < bm; r0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, bm - r0);
    T m[kMR], l[kMR];
    std::fill(m, m + kMR, -std::numeric_limits<T>::infinity());
    std::fill(l, l + kMR, T(0));
    for (int64_t kb = jlo / kBN; kb * kBN < jhi; ++kb) {
      const int64_t jb0 = kb * kBN, koff = std::max<int64_t>(0, jlo - jb0) / 8 * 8, j0 = jb0 + koff;
      const int64_t bn = std::min(std::min<int64_t>(kBN, S - jb0), jhi - jb0) - koff, nbp = round_up(bn, 8);
      Gemm<T> g;
      g.M = mr; g.N = nbp; g.K = E;
      g.A = qr_.at(b, h, i0 + r0); g.sam = qr_.s2; g.sak = 1;
      g.B = kt_ + (bk * nkb + kb) * E * kBN + koff; g.sbk = kBN;
      g.C = s; g.scm = kBN;
      g.mode = kStore; g.alpha = alpha_s;
      Ops::gemm(g);
      scores(b, h, i0 + r0, mr, j0, bn, s, nullptr);
      for (int64_t r = 0; r < mr; ++r) {
        T* row = s + r * kBN;
        const T mx = Ops::row_max(row, nbp);
        if (mx == -std::numeric_limits<T>::infinity()) continue;
        const T mn = std::max(m[r], mx);
        l[r] = l[r] * std::exp2(m[r] - mn) + Ops::exp2_sum(row, nbp, mn, true);
        m[r] = mn;
      }
    }
    for (int64_t r = 0; r < mr; ++r) lse2[r0 + r] = l[r] > 0 ? m[r] + std::log2(l[r]) : std::numeric_limits<T>::infinity();
  }
}

// One tile (queries [i0, i0 + bm), keys [j0, j0 + bn) within one key block): accumulates into dq (bm x Ep),
// dk (bn x Ep), dv (bn x Evp) those given.
template <class T, class Ops, class In>
void Attention<T, Ops, In>::bwd_tile(int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0, int64_t bn, T* dq,
                                     T* dk, T* dv, T* buf, uint8_t* keep) const {
  const int64_t kb = j0 / kBN, koff = j0 - kb * kBN, nbp = round_up(bn, 8);
  const int64_t bh = b * H + h, bk = b * Hk + h / G;
  const T* q = qr_.at(b, h, i0);
  const T* dout = dor_.at(b, h, i0);
  const int64_t sq = qr_.s2, sdo = dor_.s2;
  const T* lse2 = lse2_ + bh * L + i0;
  const T* delta = delta_ + bh * L + i0;
  T* s = buf;                  // scores, then P
  T* dp = s + kBM * kBN;       // dP, then dS
  T* pd = dp + kBM * kBN;      // P with dropout
  T* t = pd + kBM * kBN;       // tanh (softcap) of one stripe
  Gemm<T> g;
  for (int64_t r0 = 0; r0 < bm; r0 += kMR) {  // stripes of kMR rows: S, P, dP, dS, dQ
    const int64_t mr = std::min<int64_t>(kMR, bm - r0);
    T* sr = s + r0 * kBN;
    T* dpr = dp + r0 * kBN;
    T* tr = softcap ? t : nullptr;
    g.M = mr; g.N = nbp; g.K = E;
    g.A = q + r0 * sq; g.sam = sq; g.sak = 1;
    g.B = kt_ + (bk * nkb + kb) * E * kBN + koff; g.sbk = kBN;
    g.C = sr; g.scm = kBN;
    g.mode = kStore; g.alpha = alpha_s;
    Ops::gemm(g);
    const bool exact = scores(b, h, i0 + r0, mr, j0, bn, sr, tr);
    for (int64_t r = 0; r < mr; ++r) Ops::exp2_sub(sr + r * kBN, nbp, lse2[r0 + r], exact);
    g.M = mr; g.N = nbp; g.K = Ev;
    g.A = dout + r0 * sdo; g.sam = sdo; g.sak = 1;
    g.B = vt_ + (bk * nkb + kb) * Ev * kBN + koff; g.sbk = kBN;
    g.C = dpr; g.scm = kBN;
    g.mode = kStore; g.alpha = 1;
    Ops::gemm(g);
    if (dropout) {
      for (int64_t r = 0; r < mr; ++r) {
        Ops::keep_row(a_.seed, counter(b, h, i0 + r0 + r) + uint64_t(j0), bn, p_drop, keep);
        T* pdr = pd + (r0 + r) * kBN;
        Ops::dropout_bwd_row(sr + r * kBN, pdr, dpr + r * kBN, keep, bn, keep_scale);
        for (int64_t j = bn; j < nbp; ++j) pdr[j] = 0;
      }
    }
    for (int64_t r = 0; r < mr; ++r)
      Ops::ds_row(dpr + r * kBN, sr + r * kBN, tr ? tr + r * kBN : nullptr, nbp, delta[r0 + r]);
    if (dq) {  // dQ += dS K   (times scale at the end)
      g.M = mr; g.N = Ep; g.K = bn;
      g.A = dpr; g.sam = kBN; g.sak = 1;
      g.B = kr_.at(b, h / G, j0); g.sbk = kr_.s2;
      g.C = dq + r0 * Ep; g.scm = Ep;
      g.mode = kAccum;
      Ops::gemm(g);
    }
  }
  const T* pv = dropout ? pd : s;
  if (dv) {  // dV += (P * keep)^T dO
    g.M = bn; g.N = Evp; g.K = bm;
    g.A = pv; g.sam = 1; g.sak = kBN;
    g.B = dout; g.sbk = sdo;
    g.C = dv; g.scm = Evp;
    g.mode = kAccum;
    Ops::gemm(g);
  }
  if (dk) {  // dK += dS^T Q   (times scale at the end)
    g.M = bn; g.N = Ep; g.K = bm;
    g.A = dp; g.sam = 1; g.sak = kBN;
    g.B = q; g.sbk = sq;
    g.C = dk; g.scm = Ep;
    g.mode = kAccum;
    Ops::gemm(g);
  }
}

// rows [r0, r0 + rows) of (b, h) of the output o: dst row r = src row r * mul
template <class In, class T>
void store_rows(const T* src, int64_t sstride, int64_t rows, int64_t cols, T mul, const AttnOut& o, int64_t b,
                int64_t h, int64_t r0) {
  In* dst = static_cast<In*>(o.data) + b * o.stride[0] + h * o.stride[1] + r0 * o.stride[2];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * o.stride[2] + c] = from_acc<In>(src[r * sstride + c] * mul);
}

template <class In>
void zero_out(const AttnOut& o, int64_t B, int64_t H, int64_t rows, int64_t cols) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < rows; ++r) {
        In* dst = static_cast<In*>(o.data) + b * o.stride[0] + h * o.stride[1] + r * o.stride[2];
        std::fill(dst, dst + cols, from_acc<In>(0.0f));
      }
}

template <class T, class Ops, class In>
void Attention<T, Ops, In>::backward(const AttnBwdArgs& g) {
  if (B == 0 || Hk == 0) return;
  const T scale = T(a_.scale);
  if (L == 0 || H == 0 || S == 0) {  // nothing to attend: zero gradients
    zero_out<In>(g.dq, B, H, L, E);
    zero_out<In>(g.dk, B, Hk, S, E);
    zero_out<In>(g.dv, B, Hk, S, Ev);
    return;
  }
  // Packed operands, each block packed by the first item that needs it: K^T, V^T blocks and K rows per key
  // block; Q, dO rows, delta = rowsum(dO * O) and lse (base 2) per query block.
  // (Q, dO and K rows are read in place when they already are in the compute type, with widths multiple of 8 and
  // adjacent rows.)
  const bool qk_direct = std::is_same_v<In, T> && E % 8 == 0 && a_.q.stride[2] == E && a_.k.stride[2] == E;
  const bool do_direct = std::is_same_v<In, T> && Ev % 8 == 0 && g.dout.stride[2] == Ev;
  ABuf<T> kt(B * Hk * nkb * E * kBN), vt(B * Hk * nkb * Ev * kBN), kr(qk_direct ? 0 : B * Hk * S * Ep);
  ABuf<T> qr(qk_direct ? 0 : B * H * L * Ep), dor(do_direct ? 0 : B * H * L * Evp), delta(B * H * L), lse2(B * H * L);
  qr_ = qk_direct ? Rows<T>::input(a_.q) : Rows<T>::packed(qr.get(), H, L, Ep);
  kr_ = qk_direct ? Rows<T>::input(a_.k) : Rows<T>::packed(kr.get(), Hk, S, Ep);
  dor_ = do_direct ? Rows<T>::input(g.dout) : Rows<T>::packed(dor.get(), H, L, Evp);
  kt_ = kt.get(); vt_ = vt.get();
  delta_ = delta.get(); lse2_ = lse2.get();
  OnceFlags k_packed(B * Hk * nkb), q_packed(B * H * nqb);
  auto pack_k1 = [&](int64_t idx) {  // idx = (b * Hk + kvh) * nkb + kb
    const int64_t bk = idx / nkb, kb = idx % nkb, b = bk / Hk, kvh = bk % Hk;
    const int64_t j0 = kb * kBN, bn = std::min<int64_t>(kBN, S - j0);
    Ops::pack_t(ptr<In>(a_.k, b, kvh, j0), a_.k.stride[2], bn, E, kt.get() + idx * E * kBN);
    Ops::pack_t(ptr<In>(a_.v, b, kvh, j0), a_.v.stride[2], bn, Ev, vt.get() + idx * Ev * kBN);
    if (!qk_direct) pack_rows(ptr<In>(a_.k, b, kvh, j0), a_.k.stride[2], bn, E, kr.get() + (bk * S + j0) * Ep, Ep);
  };
  // makes key blocks [lo, hi) ready
  auto pack_k = [&](int64_t lo, int64_t hi) { k_packed.run(lo, hi, pack_k1); };
  auto pack_q1 = [&](int64_t idx) {  // idx = (b * H + h) * nqb + qb
    {
      const int64_t bh = idx / nqb, qb = idx % nqb, b = bh / H, h = bh % H;
      const int64_t i0 = qb * kBM, bm = std::min<int64_t>(kBM, L - i0);
      if (!qk_direct) pack_rows(ptr<In>(a_.q, b, h, i0), a_.q.stride[2], bm, E, qr.get() + (bh * L + i0) * Ep, Ep);
      if (!do_direct)
        pack_rows(ptr<In>(g.dout, b, h, i0), g.dout.stride[2], bm, Ev, dor.get() + (bh * L + i0) * Evp, Evp);
      for (int64_t r = 0; r < bm; ++r) {
        const In* o = ptr<In>(g.out, b, h, i0 + r);
        const In* d = ptr<In>(g.dout, b, h, i0 + r);
        T acc = 0;
        if constexpr (std::is_same_v<In, T>) {
          acc = Ops::row_dot(d, o, Ev);
        } else {
          for (int64_t e = 0; e < Ev; ++e) acc += T(to_acc(d[e])) * T(to_acc(o[e]));
        }
        delta.get()[bh * L + i0 + r] = acc;
        const float lv = g.lse[b * g.lse_stride[0] + h * g.lse_stride[1] + (i0 + r) * g.lse_stride[2]];
        // -inf (a public lse) also means "no key"
        lse2.get()[bh * L + i0 + r] =
            lv == -std::numeric_limits<float>::infinity() ? std::numeric_limits<T>::infinity() : T(double(lv) * kLog2e);
      }
      if constexpr (std::is_same_v<T, double>) {
        int64_t jlo, jhi;
        kv_range(i0, bm, jlo, jhi);
        if (jhi > jlo) pack_k(bk_of(b, h) * nkb + jlo / kBN, bk_of(b, h) * nkb + cdiv(jhi, kBN));
        exact_lse2(b, h, i0, bm, lse2.get() + bh * L + i0);
      }
    }
  };
  // makes query blocks [lo, hi) ready
  auto pack_q = [&](int64_t lo, int64_t hi) { q_packed.run(lo, hi, pack_q1); };

  const int64_t tile_buf = 3 * kBM * kBN + kMR * kBN;
  const int64_t groups = B * Hk;
  ABuf<uint8_t> keeps(nt * kBN);
  const bool fused = nt == 1 || groups % nt == 0 || groups >= 4 * nt;
  if (fused) {
    // one item per (batch, kv head): every gradient of the group is owned by one thread
    const int64_t per_thread = round_up(tile_buf + L * Ep + S * Ep + S * Evp, 16);
    ABuf<T> scratch(nt * per_thread);
#pragma omp parallel num_threads(nt) if (nt > 1 && groups > 1)
    {
      const int tid = thread_id();
      T* buf = scratch.get() + tid * per_thread;
      T* dq = buf + tile_buf;
      T* dk = dq + L * Ep;
      T* dv = dk + S * Ep;
      uint8_t* keep = keeps.get() + tid * kBN;
#pragma omp for schedule(dynamic, 1)
      for (int64_t bk = 0; bk < groups; ++bk) {
        const int64_t b = bk / Hk, kvh = bk % Hk;
        std::fill(dk, dk + S * Ep, T(0));
        std::fill(dv, dv + S * Evp, T(0));
        pack_k(bk * nkb, (bk + 1) * nkb);
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t h = kvh * G + hg;
          std::fill(dq, dq + L * Ep, T(0));
          pack_q((b * H + h) * nqb, (b * H + h + 1) * nqb);
          for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t j0 = kb * kBN, bn = std::min<int64_t>(kBN, S - j0);
            int64_t ilo, ihi;
            q_range(j0, bn, ilo, ihi);
            for (int64_t qb = ilo / kBM; qb * kBM < ihi; ++qb) bwd_block(b, h, qb, kb, dq, 0, dk, dv, 0, buf, keep);
          }
          store_rows<In>(dq, Ep, L, E, scale, g.dq, b, h, 0);
        }
        store_rows<In>(dk, Ep, S, E, scale, g.dk, b, kvh, 0);
        store_rows<In>(dv, Evp, S, Ev, T(1), g.dv, b, kvh, 0);
      }
    }
    return;
  }
  // split schedule: dK/dV items per (batch, kv head, key block), then dQ items per (batch, head, query block)
  const int64_t per_thread = round_up(tile_buf + kBM * Ep + kBN * Ep + kBN * Evp, 16);
  ABuf<T> scratch(nt * per_thread);
  const int64_t nk_items = B * Hk * nkb, nq_items = B * H * nqb;
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    T* buf = scratch.get() + tid * per_thread;
    T* dq = buf + tile_buf;
    T* dk = dq + kBM * Ep;
    T* dv = dk + kBN * Ep;
    uint8_t* keep = keeps.get() + tid * kBN;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t idx = 0; idx < nk_items; ++idx) {
      const int64_t bk = idx / nkb, kb = idx % nkb, b = bk / Hk, kvh = bk % Hk;
      const int64_t j0 = kb * kBN, bn = std::min<int64_t>(kBN, S - j0);
      pack_k(idx, idx + 1);
      std::fill(dk, dk + bn * Ep, T(0));
      std::fill(dv, dv + bn * Evp, T(0));
      int64_t ilo, ihi;
      q_range(j0, bn, ilo, ihi);
      for (int64_t hg = 0; hg < G; ++hg) {
        const int64_t h = kvh * G + hg;
        if (ihi > ilo) pack_q((b * H + h) * nqb + ilo / kBM, (b * H + h) * nqb + cdiv(ihi, kBM));
        for (int64_t qb = ilo / kBM; qb * kBM < ihi; ++qb) bwd_block(b, h, qb, kb, nullptr, 0, dk, dv, j0, buf, keep);
      }
      store_rows<In>(dk, Ep, bn, E, scale, g.dk, b, kvh, j0);
      store_rows<In>(dv, Evp, bn, Ev, T(1), g.dv, b, kvh, j0);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < nq_items; ++idx) {
      const int64_t bh = idx / nqb, qb = nqb - 1 - idx % nqb, b = bh / H, h = bh % H;
      const int64_t i0 = qb * kBM, bm = std::min<int64_t>(kBM, L - i0);
      pack_q(bh * nqb + qb, bh * nqb + qb + 1);
      std::fill(dq, dq + bm * Ep, T(0));
      int64_t jlo, jhi;
      kv_range(i0, bm, jlo, jhi);
      if (jhi > jlo) pack_k((b * Hk + h / G) * nkb + jlo / kBN, (b * Hk + h / G) * nkb + cdiv(jhi, kBN));
      for (int64_t kb = jlo / kBN; kb * kBN < jhi; ++kb) bwd_block(b, h, qb, kb, dq, i0, nullptr, nullptr, 0, buf, keep);
      store_rows<In>(dq, Ep, bm, E, scale, g.dq, b, h, i0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
template <class F>
void dispatch(const AttnArgs& a, F&& f) {
  switch (a.dtype) {
    case AttnDType::kFloat64: f(Attention<double, Portable<double>, double>(a)); return;
#ifdef FA_X86
    case AttnDType::kFloat32:
      if (cpu_use_avx512()) return f(Attention<float, Avx512, float>(a));
      if (cpu_use_avx2()) return f(Attention<float, Avx2, float>(a));
      return f(Attention<float, Portable<float>, float>(a));
    case AttnDType::kFloat16:
      if (cpu_use_avx512()) return f(Attention<float, Avx512, Half>(a));
      if (cpu_use_avx2()) return f(Attention<float, Avx2, Half>(a));
      return f(Attention<float, Portable<float>, Half>(a));
    case AttnDType::kBFloat16:
      if (cpu_use_avx512()) return f(Attention<float, Avx512, BF16>(a));
      if (cpu_use_avx2()) return f(Attention<float, Avx2, BF16>(a));
      return f(Attention<float, Portable<float>, BF16>(a));
#else
    case AttnDType::kFloat32: return f(Attention<float, Portable<float>, float>(a));
    case AttnDType::kFloat16: return f(Attention<float, Portable<float>, Half>(a));
    case AttnDType::kBFloat16: return f(Attention<float, Portable<float>, BF16>(a));
#endif
    default: return;
  }
}

}  // namespace

void attention_fwd(const AttnFwdArgs& a) {
  dispatch(a, [&](auto&& attn) { attn.forward(a); });
}

void attention_bwd(const AttnBwdArgs& a) {
  dispatch(a, [&](auto&& attn) { attn.backward(a); });
}

void attention_dropout_mask(int64_t B, int64_t H, int64_t L, int64_t S, double dropout_p, uint64_t seed,
                            uint64_t offset, bool* keep, int num_threads) {
  const int64_t rows = B * H * L;
  if (rows == 0 || S == 0) return;
  const float p = float(dropout_p);
  [[maybe_unused]] const int nt = std::max(1, num_threads);
  static_assert(sizeof(bool) == 1, "bool is one byte");
  uint8_t* out = reinterpret_cast<uint8_t*>(keep);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * S >= (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t ctr = offset + uint64_t(r) * dropout_row_stride(S);
#ifdef FA_X86
    if (cpu_use_avx512()) {
      Avx512::keep_row(seed, ctr, S, p, out + r * S);
      continue;
    }
    if (cpu_use_avx2()) {
      Avx2::keep_row(seed, ctr, S, p, out + r * S);
      continue;
    }
#endif
    keep_row_scalar(seed, ctr, S, p, out + r * S);
  }
}

}  // namespace cpu
}  // namespace fastattn
