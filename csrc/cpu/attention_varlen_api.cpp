// Python bindings of attention over packed variable-length sequences (varlen) on CPU: sequence b is rows
// [cu_q[b], cu_q[b + 1]) of q (Tq, H, E) and rows [cu_k[b], cu_k[b + 1]) of k (Tk, Hk, E) and v (Tk, Hk, Ev). Each
// sequence runs on the attention kernels as a batch of one, through views (nothing is copied or padded); its
// dropout counters are those of batch b of the padded (B, H, max_q, max_k) layout.
// Contract: fastattn/ops/attention/varlen.py (module docstring).
#include "attention_args.h"
#include "registry.h"

#include <limits>
#include <vector>

namespace fastattn {
namespace {

using namespace attn_api;

// The B + 1 offsets of cu (int32 or int64, 1-D, CPU), checked: cu[0] == 0, non-decreasing, cu[B] == rows, every
// length <= max_len.
std::vector<int64_t> read_offsets(const Checker& c, const at::Tensor& cu, const char* name, int64_t rows,
                                  int64_t max_len) {
  c.cpu_strided(cu, name);
  FA_CHECK(cu.dim() == 1 && cu.size(0) >= 1, c.op, ": ", name, " must be 1-D (batch + 1,), got shape ",
           cu.sizes());
  FA_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, c.op, ": ", name,
           " must have dtype Int or Long, got ", cu.scalar_type());
  const at::Tensor cu64 = cu.to(at::kLong).contiguous();
  const int64_t* p = cu64.data_ptr<int64_t>();
  std::vector<int64_t> off(p, p + cu64.numel());
  FA_CHECK(off.front() == 0 && off.back() == rows, c.op, ": ", name, " must start at 0 and end at the ", rows,
           " packed rows, got ", off.front(), " ... ", off.back());
  for (size_t b = 0; b + 1 < off.size(); ++b) {
    const int64_t len = off[b + 1] - off[b];
    FA_CHECK(len >= 0 && len <= max_len, c.op, ": ", name, " gives sequence ", b, " length ", len,
             " (must be in [0, max_seqlen=", max_len, "])");
  }
  return off;
}

// Rows [start, start + len) of a packed (T, heads, D) tensor as a (1, heads, len, D) view.
at::Tensor seq(const at::Tensor& t, int64_t start, int64_t len) {
  return t.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
}

// q, k, v of the packed layout (3-D, float, one dtype, a unit last stride; heads and head dims that fit)
void check_packed(const Checker& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *ts[i];
    c.cpu_strided(t, names[i]);
    FA_CHECK(t.dim() == 3, c.op, ": ", names[i], " must be 3-D (total rows, heads, head dim), got shape ",
             t.sizes());
    FA_CHECK(is_float_dtype(t.scalar_type()), c.op, ": ", names[i],
             " must have dtype Float, Half, BFloat16 or Double, got ", t.scalar_type());
    c.same_dtype(t, names[i], q);
  }
  FA_CHECK(k.size(2) == q.size(2), c.op, ": k's head dim ", k.size(2), " must equal q's ", q.size(2));
  FA_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1), c.op, ": v must have k's rows and heads (",
           k.size(0), ", ", k.size(1), "), got ", v.sizes());
}

// q, k, v and both offsets checked: sequence b is rows [q_off[b], q_off[b + 1]) of q, [k_off[b], k_off[b + 1]) of k, v
struct Batch {
  std::vector<int64_t> q_off, k_off;
  int64_t B;
};

Batch read_batch(const Checker& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                 const c10::optional<at::Tensor>& alibi) {
  check_packed(c, q, k, v);
  Batch s{read_offsets(c, cu_q, "cu_seqlens_q", q.size(0), max_q),
          read_offsets(c, cu_k, "cu_seqlens_k", k.size(0), max_k), 0};
  FA_CHECK(s.q_off.size() == s.k_off.size(), c.op, ": cu_seqlens_q and cu_seqlens_k must have one length, got ",
           s.q_off.size(), " and ", s.k_off.size());
  s.B = int64_t(s.q_off.size()) - 1;
  if (alibi && alibi->defined()) c.shape_is(*alibi, "alibi", {s.B, q.size(1)}, "(B, H)");
  return s;
}

struct Common {
  double scale, softcap, dropout_p;
  bool causal, bottom_right;
  int64_t window_left, window_right, seed, offset, max_q, max_k;
};

// fills a for sequence b (views qb, kb, vb of Lb and Sb rows): its causal diagonal and its dropout counters
void fill_seq(const Checker& c, cpu::AttnArgs& a, const at::Tensor& qb, const at::Tensor& kb, const at::Tensor& vb,
              const c10::optional<at::Tensor>& alibi, int64_t b, const Common& p) {
  c10::optional<at::Tensor> alibi_b;
  if (alibi && alibi->defined()) alibi_b = alibi->narrow(0, b, 1);  // (B, H), checked by read_batch
  const int64_t diag = p.bottom_right ? kb.size(2) - qb.size(2) : 0;
  fill_args(c, a, qb, kb, vb, c10::nullopt, alibi_b, p.scale, p.causal, diag, p.window_left, p.window_right,
            p.softcap, p.dropout_p, p.seed, p.offset);
  a.rng_b = b;
  a.rng_L = p.max_q;
  a.rng_S = p.max_k;
}

std::vector<at::Tensor> attention_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                 int64_t max_k, const c10::optional<at::Tensor>& alibi,
                                                 double scale, bool causal, bool bottom_right, int64_t window_left,
                                                 int64_t window_right, double softcap, double dropout_p,
                                                 int64_t seed, int64_t offset) {
  const Checker c{"attention_varlen_fwd_cpu"};
  const Batch s = read_batch(c, q, k, v, cu_q, cu_k, max_q, max_k, alibi);
  const auto &oq = s.q_off, &ok = s.k_off;
  const int64_t B = s.B, H = q.size(1);
  const Common p{scale, softcap, dropout_p, causal, bottom_right, window_left, window_right, seed, offset, max_q,
                 max_k};
  at::Tensor out = at::zeros({q.size(0), H, v.size(2)}, q.options());
  at::Tensor lse = at::full({B, H, max_q}, std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lb = oq[b + 1] - oq[b], Sb = ok[b + 1] - ok[b];
    if (Lb == 0 || Sb == 0) continue;  // no query, or rows with no key: out 0, lse +inf as filled
    cpu::AttnFwdArgs a;
    fill_seq(c, a, seq(q, oq[b], Lb), seq(k, ok[b], Sb), seq(v, ok[b], Sb), alibi, b, p);
    at::Tensor ob = seq(out, oq[b], Lb);
    at::Tensor lb = at::empty({1, H, Lb}, lse.options());
    a.out = out_of(ob);
    a.lse = lb.data_ptr<float>();
    cpu::attention_fwd(a);
    lse[b].narrow(1, 0, Lb).copy_(lb[0]);
  }
  return {out, lse};
}

std::vector<at::Tensor> attention_varlen_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                 const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                 int64_t max_k, const c10::optional<at::Tensor>& alibi,
                                                 double scale, bool causal, bool bottom_right, int64_t window_left,
                                                 int64_t window_right, double softcap, double dropout_p,
                                                 int64_t seed, int64_t offset) {
  const Checker c{"attention_varlen_bwd_cpu"};
  const Batch s = read_batch(c, q, k, v, cu_q, cu_k, max_q, max_k, alibi);
  const auto &oq = s.q_off, &ok = s.k_off;
  const int64_t B = s.B, H = q.size(1);
  const std::vector<int64_t> o_shape = {q.size(0), H, v.size(2)};
  c.cpu_strided(dout, "dout");
  c.same_dtype(dout, "dout", q);
  c.shape_is(dout, "dout", o_shape, "(Tq, H, Ev)");
  c.cpu_strided(out, "out");
  c.same_dtype(out, "out", q);
  c.shape_is(out, "out", o_shape, "(Tq, H, Ev)");
  c.cpu_strided(lse, "lse");
  FA_CHECK(lse.scalar_type() == at::kFloat, c.op, ": lse must have dtype Float, got ", lse.scalar_type());
  c.shape_is(lse, "lse", {B, H, max_q}, "(B, H, max_seqlen_q)");
  const Common p{scale, softcap, dropout_p, causal, bottom_right, window_left, window_right, seed, offset, max_q,
                 max_k};
  // zeros: keys of a sequence without queries, and queries without keys, get no gradient
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lb = oq[b + 1] - oq[b], Sb = ok[b + 1] - ok[b];
    if (Lb == 0 || Sb == 0) continue;
    cpu::AttnBwdArgs a;
    fill_seq(c, a, seq(q, oq[b], Lb), seq(k, ok[b], Sb), seq(v, ok[b], Sb), alibi, b, p);
    a.dout = view_of(seq(dout, oq[b], Lb));
    a.out = view_of(seq(out, oq[b], Lb));
    at::Tensor lb = lse.narrow(0, b, 1).narrow(2, 0, Lb);
    a.lse = lb.data_ptr<float>();
    for (int d = 0; d < 3; ++d) a.lse_stride[d] = lb.stride(d);
    a.dq = out_of(seq(dq, oq[b], Lb));
    a.dk = out_of(seq(dk, ok[b], Sb));
    a.dv = out_of(seq(dv, ok[b], Sb));
    cpu::attention_bwd(a);
  }
  return {dq, dk, dv};
}

}  // namespace

void register_cpu_attention_varlen(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_varlen_fwd_cpu", &attention_varlen_fwd_cpu,
        "Attention over packed variable-length sequences on CPU -> [out (Tq, H, Ev), lse (B, H, max_q) float32, "
        "+inf past each sequence's queries]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("alibi"), py::arg("scale"), py::arg("causal"),
        py::arg("bottom_right"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("offset"));
  m.def("attention_varlen_bwd_cpu", &attention_varlen_bwd_cpu,
        "Backward of attention_varlen_fwd_cpu -> [dq, dk, dv] (packed like q, k, v; dk, dv summed over each GQA "
        "group)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("alibi"), py::arg("scale"), py::arg("causal"), py::arg("bottom_right"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"));
}

}  // namespace fastattn
