"""fastattn.attention_varlen (packed variable-length sequences) on every backend: outputs and gradients against the
float64 reference of each sequence alone, bounded by torch's own error in the same dtype; equality with dense
attention over the padded batch (dropout included); lse; torch.compile; bad input."""
import pytest
import torch

import fastattn
from fastattn.errors import ArgumentError
from fastattn.ops.attention import varlen as V
from fastattn.reference import attention_ref
from conftest import assert_bounded, backend_device, skip_if_not_built

# the backends with a varlen path (the CUDA C++ kernel has none: test_cuda_backend_refuses_by_name)
VB = pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
# empty sequences on either side, a single row, lengths across several kernel blocks, keys longer and shorter
LENS_Q = [5, 0, 37, 12, 1, 70]
LENS_K = [7, 3, 37, 40, 0, 33]


def offsets(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def packed(lens, heads, dim, dtype, device, gen):
    return (torch.randn(sum(lens), heads, dim, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def per_sequence(q, k, v, cu_q, cu_k, fn):
    """fn (on (1, heads, rows, dim) views) over each sequence, packed back: out (Tq, H, Ev)."""
    outs = []
    for b in range(cu_q.numel() - 1):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if qs.stop == qs.start:
            continue
        out = fn(*(t[rows].transpose(0, 1).unsqueeze(0) for t, rows in ((q, qs), (k, ks), (v, ks))), b)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def check(backend_name, dtype=torch.float32, H=4, Hk=2, E=32, Ev=None, causal=None, window=(-1, -1),
          alibi=False, softcap=0.0, lens_q=LENS_Q, lens_k=LENS_K, seed=0):
    skip_if_not_built(backend_name, "attention_varlen_fwd")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(seed)
    Ev = Ev or E
    q, k, v = packed(lens_q, H, E, dtype, dev, g), packed(lens_k, Hk, E, dtype, dev, g), packed(lens_k, Hk, Ev,
                                                                                                 dtype, dev, g)
    dout = packed(lens_q, H, Ev, dtype, dev, g)
    cu_q, cu_k = offsets(lens_q, dev), offsets(lens_k, dev)
    slopes = torch.rand(len(lens_q), H, generator=g).to(dev) if alibi else None
    kw = dict(window=window, softcap=softcap)
    br = None if causal is None else ("top_left" if causal == "top_left" else "bottom_right")

    def grads(q, k, v, fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out] + [t.grad for t in leaves]

    def ours(q, k, v):
        with fastattn.backend(backend_name):
            return fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, alibi_slopes=slopes, **kw)

    def ref(upcast):
        return lambda q, k, v: per_sequence(q, k, v, cu_q, cu_k, lambda qb, kb, vb, b: attention_ref(
            qb, kb, vb, causal=br, alibi_slopes=None if slopes is None else slopes[b:b + 1], upcast=upcast, **kw))

    got = grads(q, k, v, ours)
    base = grads(q, k, v, ref(False))
    exact = grads(q.double(), k.double(), v.double(), ref(True))
    scale = max([1.0] + [e.abs().max().item() for e in exact if e.numel()])
    for name, a, t, e in zip(["out", "dq", "dk", "dv"], got, base, exact):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_bounded(name, a, e, t, dtype, scale)


@VB
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right", True])
def test_causal(backend_name, causal):
    check(backend_name, causal=causal)


@VB
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("E, Ev", [(16, 16), (64, 32)])
def test_dtypes_and_head_dims(backend_name, dtype, E, Ev):
    check(backend_name, dtype=dtype, E=E, Ev=Ev, causal="bottom_right")


@VB
@pytest.mark.parametrize("feature", ["window", "alibi", "softcap", "mha"])
def test_features(backend_name, feature):
    kw = {"window": dict(window=(5, 2), causal=None), "alibi": dict(alibi=True, causal="bottom_right"),
          "softcap": dict(softcap=3.0), "mha": dict(Hk=4)}[feature]
    check(backend_name, **kw)


@VB
def test_equals_dense_padded_attention_with_dropout(backend_name):
    """Dropout draws the counters of dense attention over the (B, H, max_q, max_k) padded batch: varlen attention
    equals that dense attention (a key padding mask for the padding) on every real row, output and gradients."""
    skip_if_not_built(backend_name, "attention_varlen_fwd")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k, H, E = [9, 20, 1], [12, 20, 5], 2, 16
    q, k, v = packed(lens_q, H, E, torch.float32, dev, g), packed(lens_k, H, E, torch.float32, dev, g), \
        packed(lens_k, H, E, torch.float32, dev, g)
    cu_q, cu_k = offsets(lens_q, dev), offsets(lens_k, dev)
    Lm, Sm, B = max(lens_q), max(lens_k), len(lens_q)

    def pad(t, cu, n):  # (B, heads, n, dim) zero-padded, differentiable
        return torch.stack([torch.nn.functional.pad(t[int(cu[b]):int(cu[b + 1])], (0, 0, 0, 0, 0, n - int(
            cu[b + 1] - cu[b]))).transpose(0, 1) for b in range(B)])

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    key_pad = torch.arange(Sm, device=dev)[None, :] >= torch.tensor(lens_k, device=dev)[:, None]
    with fastattn.backend(backend_name):
        torch.manual_seed(11)
        out = fastattn.attention_varlen(*leaves, cu_q, cu_k, dropout_p=0.4)
        torch.manual_seed(11)
        dense = fastattn.attention(pad(dense_leaves[0], cu_q, Lm), pad(dense_leaves[1], cu_k, Sm),
                                   pad(dense_leaves[2], cu_k, Sm), key_padding_mask=key_pad, dropout_p=0.4)
    rows = torch.cat([dense[b, :, :n].transpose(0, 1) for b, n in enumerate(lens_q)])
    torch.testing.assert_close(out, rows, rtol=1e-5, atol=1e-5)
    assert (out == 0).float().mean() < 0.9  # something was kept
    dout = torch.randn(out.shape, generator=g).to(dev)
    out.backward(dout)
    rows.backward(dout)
    for a, b in zip(leaves, dense_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@VB
def test_lse_per_row(backend_name):
    skip_if_not_built(backend_name, "attention_varlen_fwd")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(1)
    q, k, v = packed(LENS_Q, 4, 16, torch.float32, dev, g), packed(LENS_K, 4, 16, torch.float32, dev, g), \
        packed(LENS_K, 4, 16, torch.float32, dev, g)
    cu_q, cu_k = offsets(LENS_Q, dev), offsets(LENS_K, dev)
    with fastattn.backend(backend_name):
        out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal="bottom_right", return_lse=True)
    assert lse.shape == (q.shape[0], 4) and lse.dtype == torch.float32
    want = per_sequence(q, k, v, cu_q, cu_k, lambda qb, kb, vb, b: attention_ref(
        qb, kb, vb, causal="bottom_right", return_lse=True)[1][..., None])[..., 0]
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)
    empty = sum(LENS_Q[:4]) + torch.arange(LENS_Q[4])  # the sequence with no key: lse +inf, out 0
    assert torch.isinf(lse[empty]).all() and (out[empty] == 0).all()


def test_backends_agree_and_cuda_refuses_by_name():
    """cpu and reference agree on one packed batch; the CUDA C++ backend has no varlen path and says so."""
    skip_if_not_built("cpu", "attention_varlen_fwd")
    g = torch.Generator().manual_seed(2)
    q, k, v = (packed(LENS_Q if i == 0 else LENS_K, 2, 16, torch.float64, "cpu", g) for i in range(3))
    cu_q, cu_k = offsets(LENS_Q, "cpu"), offsets(LENS_K, "cpu")
    outs = {}
    for b in ("cpu", "reference"):
        with fastattn.backend(b):
            outs[b] = fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    torch.testing.assert_close(outs["cpu"], outs["reference"], rtol=1e-12, atol=1e-12)
    why = V.dispatcher.why_not(V.VarlenRequest("cuda", torch.float16, 64, 64))
    assert "cuda" not in V.dispatcher.impls and why["triton"] == []  # on GPUs Triton runs it
    with fastattn.backend("cuda"), pytest.raises(fastattn.BackendNotSupported, match="cuda"):
        fastattn.attention_varlen(q, k, v, cu_q, cu_k)


def test_dropout_one_gives_zeros():
    g = torch.Generator().manual_seed(0)
    q = packed([3, 4], 2, 8, torch.float32, "cpu", g).requires_grad_()
    cu = offsets([3, 4], "cpu")
    out = fastattn.attention_varlen(q, q, q, cu, cu, dropout_p=1.0)
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_torch_compile_fullgraph():
    skip_if_not_built("cpu", "attention_varlen_fwd")
    g = torch.Generator().manual_seed(4)
    lens = [6, 11, 3]
    q, k, v = (packed(lens, 2, 16, torch.float32, "cpu", g).requires_grad_() for _ in range(3))
    cu = offsets(lens, "cpu")

    def fn(q, k, v):
        return fastattn.attention_varlen(q, k, v, cu, cu, 11, 11, causal=True).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match="max_seqlen_q"):  # the offsets cannot be read while tracing
        torch._dynamo.reset()
        torch.compile(lambda q: fastattn.attention_varlen(q, q, q, cu, cu), fullgraph=True,
                      backend="aot_eager")(q)


@pytest.mark.parametrize("change, match", [
    (dict(cu_q=torch.tensor([0, 3, 7], dtype=torch.float32)), "cu_seqlens_q: expected a 1-D int32"),
    (dict(cu_q=torch.tensor([1, 3, 7], dtype=torch.int32)), "cu_seqlens_q: expected non-decreasing offsets"),
    (dict(cu_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), "cu_seqlens_q: expected non-decreasing"),
    (dict(cu_k=torch.tensor([0, 3, 6], dtype=torch.int32)), "cu_seqlens_k: .* 7 packed rows"),
    (dict(cu_k=torch.tensor([0, 7], dtype=torch.int32)), "cu_seqlens_k: 1 sequences != cu_seqlens_q's 2"),
    (dict(max_q=3), "max_seqlen_q: 3 < the longest sequence's 4 rows"),
    (dict(max_k=-1), "max_seqlen_k: expected an int >= 0"),
    (dict(q=torch.zeros(1, 7, 2, 8)), "q: expected 3-D"),
    (dict(k=torch.zeros(7, 3, 8), v=torch.zeros(7, 3, 8)), "k, v: 3 heads must divide q's 2"),
    (dict(v=torch.zeros(6, 2, 8)), r"v: rows and heads \(6, 2\) != k's \(7, 2\)"),
    (dict(k=torch.zeros(7, 2, 4)), "k: head dim 4 != q's 8"),
    (dict(q=torch.zeros(7, 2, 8, dtype=torch.int32)), "q: dtype torch.int32 is not supported"),
    (dict(causal="upper"), "causal: expected one of"),
    (dict(window=(2,)), "window: expected"),
    (dict(dropout_p=1.5), "dropout_p: expected a probability"),
    (dict(alibi_slopes=torch.zeros(3)), r"alibi_slopes: expected a tensor of shape \(2,\) or \(2, 2\)"),
])
def test_bad_input_names_the_argument(change, match):
    args = dict(q=torch.zeros(7, 2, 8), k=torch.zeros(7, 2, 8), v=torch.zeros(7, 2, 8),
                cu_q=torch.tensor([0, 3, 7], dtype=torch.int32), cu_k=torch.tensor([0, 3, 7], dtype=torch.int32),
                max_q=None, max_k=None)
    extra = {key: change.pop(key) for key in list(change) if key not in args}
    args.update(change)
    with pytest.raises(ArgumentError, match=match):
        fastattn.attention_varlen(*args.values(), **extra)


def test_varlen_attn_bad_input_names_the_argument():
    """torch's varlen_attn signature: a list, a bare int or a float window, and a value pool smaller than the key
    pool raised AttributeError / TypeError / IndexError or truncated 1.7 to 1."""
    q, cu = torch.zeros(7, 2, 8), torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(TypeError, match="query: expected a torch.Tensor, got list"):
        fastattn.varlen_attn([0.0], q, q, cu, cu, 4, 4)
    for window in (3, (1.7, 0)):
        with pytest.raises(ArgumentError, match="window_size: expected"):
            fastattn.varlen_attn(q, q, q, cu, cu, 4, 4, window_size=window)
    pool = torch.zeros(4, 4, 2, 8)
    with torch.no_grad(), pytest.raises(ArgumentError, match=r"value: a pool of \(3, 4\)"):
        fastattn.varlen_attn(q, pool, pool[:3], cu, None, 4, 8, seqused_k=torch.tensor([3, 8]),
                             block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))


def test_validate_false_trusts_the_caller():
    """validate=False reads no offset on the host (no device-to-host copy a call on a GPU): the max lengths must be
    given; the result is the validated call's."""
    g = torch.Generator().manual_seed(5)
    q = packed([3, 4], 2, 8, torch.float32, "cpu", g)
    cu = offsets([3, 4], "cpu")
    with pytest.raises(ArgumentError, match="max_seqlen_q: required .* validate=False"):
        fastattn.attention_varlen(q, q, q, cu, cu, validate=False)
    torch.testing.assert_close(fastattn.attention_varlen(q, q, q, cu, cu, 4, 4, causal=True, validate=False),
                               fastattn.attention_varlen(q, q, q, cu, cu, causal=True))


# ---- fastattn.varlen_attn: torch.nn.attention.varlen.varlen_attn's signature --------------------------------------
def _torch_varlen():
    return pytest.importorskip("torch.nn.attention.varlen")


def test_varlen_attn_torch_signature_and_meaning():
    """Same arguments as torch's varlen_attn (torch 2.14's runs on CUDA only); window_size (-1, 0) is causal
    bottom-right, other windows align the same way; return_aux lse comes (Hq, Tq); GQA needs enable_gqa, with
    torch's ValueError."""
    import inspect
    tv = _torch_varlen()
    assert list(inspect.signature(fastattn.varlen_attn).parameters) == \
        list(inspect.signature(tv.varlen_attn).parameters)
    g = torch.Generator().manual_seed(6)
    q, k, v = packed(LENS_Q, 4, 16, torch.float32, "cpu", g), packed(LENS_K, 2, 16, torch.float32, "cpu", g), \
        packed(LENS_K, 2, 16, torch.float32, "cpu", g)
    cu_q, cu_k = offsets(LENS_Q, "cpu"), offsets(LENS_K, "cpu")
    mq, mk = max(LENS_Q), max(LENS_K)
    with pytest.raises(ValueError, match="Try setting enable_gqa=True"):
        fastattn.varlen_attn(q, k, v, cu_q, cu_k, mq, mk)
    for window, kw in (((-1, 0), dict(causal=True)), ((3, 1), dict(window=(3, 1))), ((-1, -1), {})):
        out, lse = fastattn.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, window_size=window, enable_gqa=True,
                                        return_aux=tv.AuxRequest(lse=True), scale=0.3)
        want, want_lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, scale=0.3, return_lse=True, **kw)
        torch.testing.assert_close(out, want)
        assert lse.shape == (4, q.shape[0])
        torch.testing.assert_close(lse, want_lse.T)


def test_varlen_attn_seqused_k_and_block_table():
    """seqused_k: sequence i sees the first seqused_k[i] keys of its range (bottom-right aligned to them); with
    block_table, of its pages in a shuffled page pool. Inference-only, as in torch."""
    g = torch.Generator().manual_seed(7)
    lens_q, cap, used = [2, 1, 3], [9, 16, 12], [5, 16, 0]
    q = packed(lens_q, 2, 8, torch.float32, "cpu", g)
    k, v = packed(cap, 2, 8, torch.float32, "cpu", g), packed(cap, 2, 8, torch.float32, "cpu", g)
    cu_q, cu_k, seqused = offsets(lens_q, "cpu"), offsets(cap, "cpu"), torch.tensor(used, dtype=torch.int32)
    want = torch.cat([fastattn.attention_varlen(
        q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i] + u], v[cu_k[i]:cu_k[i] + u],
        torch.tensor([0, lens_q[i]], dtype=torch.int32), torch.tensor([0, u], dtype=torch.int32), causal=True)
        for i, u in enumerate(used)])
    got = fastattn.varlen_attn(q, k, v, cu_q, cu_k, 3, 16, window_size=(-1, 0), seqused_k=seqused)
    torch.testing.assert_close(got, want)
    page, n_pages = 4, 4  # a pool of 3 * 4 shuffled pages holding each sequence's keys
    perm = torch.randperm(3 * n_pages, generator=g)
    pool_k, pool_v = torch.zeros(3 * n_pages, page, 2, 8), torch.zeros(3 * n_pages, page, 2, 8)
    table = perm.view(3, n_pages).to(torch.int32)
    for i in range(3):
        seq_k = torch.zeros(n_pages * page, 2, 8)
        seq_v = torch.zeros(n_pages * page, 2, 8)
        seq_k[:cap[i]], seq_v[:cap[i]] = k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        pool_k[table[i].long()] = seq_k.view(n_pages, page, 2, 8)
        pool_v[table[i].long()] = seq_v.view(n_pages, page, 2, 8)
    paged = fastattn.varlen_attn(q, pool_k, pool_v, cu_q, None, 3, 16, window_size=(-1, 0), seqused_k=seqused,
                                 block_table=table)
    torch.testing.assert_close(paged, want)
    with pytest.raises(ArgumentError, match="block_table: needs seqused_k"):
        fastattn.varlen_attn(q, pool_k, pool_v, cu_q, None, 3, 16, block_table=table)
    for bad in (-1, 3 * n_pages):  # a negative page wrapped around to another page, silently
        wrong = table.clone()
        wrong[1, 0] = bad
        with pytest.raises(ArgumentError, match=rf"block_table: page indices must be in \[0, {3 * n_pages}\)"):
            fastattn.varlen_attn(q, pool_k, pool_v, cu_q, None, 3, 16, seqused_k=seqused, block_table=wrong)
    with pytest.raises(ArgumentError, match="seqused_k: expected an integer tensor"):
        fastattn.varlen_attn(q, k, v, cu_q, cu_k, 3, 16, seqused_k=seqused > 0)
    with pytest.raises(RuntimeError, match="inference-only"):
        fastattn.varlen_attn(q.requires_grad_(), k, v, cu_q, cu_k, 3, 16, seqused_k=seqused)
    empty = fastattn.varlen_attn(q[:0].detach(), pool_k, pool_v, torch.tensor([0]), None, 0, 0,  # (torch.cat of [])
                                 seqused_k=seqused[:0], block_table=table[:0])
    assert empty.shape == (0, 2, 8)


def test_alibi_slopes_that_require_grad_get_their_gradient():
    """ALiBi slopes that require grad: their gradient (the reference's autograd; the kernels have none), the same in
    eager and under torch.func, dense and varlen, against a central finite difference in float64. Before: None in
    eager (the output still required grad: an optimizer never moved the slopes), zeros under torch.func (dense)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(5, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    calls = {"varlen": lambda s: fastattn.attention_varlen(q, k, v, cu, cu, alibi_slopes=s, causal="bottom_right"),
             "dense": lambda s: fastattn.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                   alibi_slopes=s, causal="top_left")}
    w = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)
    for name, f in calls.items():
        def loss(s, f=f, name=name):
            out = f(s)
            return (out * (w if name == "varlen" else w.transpose(0, 1))).sum()
        eps = 1e-3  # (the kernels take the slopes in float32: a smaller step would be lost to their rounding)
        fd = torch.stack([(loss(slopes + eps * e) - loss(slopes - eps * e)) / (2 * eps) for e in torch.eye(2)])
        s = slopes.clone().requires_grad_()
        loss(s).backward()
        torch.testing.assert_close(s.grad, fd, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(torch.func.grad(loss)(slopes), fd, rtol=1e-4, atol=1e-6, msg=name)
        with fastattn.backend("cpu"), pytest.raises(fastattn.BackendNotSupported, match="alibi_slopes requires grad"):
            loss(slopes.clone().requires_grad_())
        # without grad (eval of a model whose slopes are parameters): the kernels, as for detached slopes
        with torch.no_grad(), fastattn.backend("cpu"):
            assert torch.equal(loss(torch.nn.Parameter(slopes.float())), loss(slopes.float()))  # (float32: no copy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen_attn runs on CUDA only")
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (8, 0)])
def test_varlen_attn_matches_torch_on_gpu(window):
    """fastattn.varlen_attn (Triton) and torch's own varlen_attn (Flash Attention) in bf16 against the float32
    reference backend: ours within twice torch's error (GQA; every query has a key, so both give the same rows)."""
    tv = _torch_varlen()
    g = torch.Generator().manual_seed(8)
    lens_q, lens_k = [5, 37, 12, 1, 30], [7, 37, 40, 2, 33]
    q = packed(lens_q, 8, 64, torch.bfloat16, "cuda", g)
    k, v = packed(lens_k, 2, 64, torch.bfloat16, "cuda", g), packed(lens_k, 2, 64, torch.bfloat16, "cuda", g)
    cu = (offsets(lens_q, "cuda"), offsets(lens_k, "cuda"), max(lens_q), max(lens_k))
    theirs = tv.varlen_attn(q, k, v, *cu, window_size=window, enable_gqa=True)
    ours = fastattn.varlen_attn(q, k, v, *cu, window_size=window, enable_gqa=True)
    with fastattn.backend("reference"):
        exact = fastattn.varlen_attn(q.float(), k.float(), v.float(), *cu, window_size=window, enable_gqa=True)
    assert_bounded("varlen_attn", ours, exact, theirs, torch.bfloat16)


def test_meta_device_gives_shapes():
    """On the meta device (shapes only, as torch's ops run there) the output, lse and gradients' shapes."""
    q = torch.empty(12, 4, 16, device="meta", requires_grad=True)
    k = torch.empty(9, 2, 16, device="meta")
    cu_q = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = fastattn.attention_varlen(q, k, k, cu_q, cu_q, causal=True, return_lse=True)
    assert out.shape == (12, 4, 16) and lse.shape == (12, 4) and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_cpu_binding_checks_its_arguments():
    """The C++ entry point checks what it reads itself (it is callable without the Python checks): offsets, max
    lengths, the ALiBi slopes' shape, each named in the error."""
    skip_if_not_built("cpu", "attention_varlen_fwd")
    from fastattn import _ext
    q = torch.randn(7, 2, 8)
    good = torch.tensor([0, 3, 7], dtype=torch.int32)
    call = _ext._C.attention_varlen_fwd_cpu
    tail = (1.0, False, True, -1, -1, 0.0, 0.0, 0, 0)
    for cu, mx, alibi, match in ((torch.tensor([0, 5, 3, 7], dtype=torch.int32), 7, None, "cu_seqlens_q"),
                                 (good, 3, None, r"cu_seqlens_q gives sequence 1 length 4 \(must be in \[0, "
                                                 r"max_seqlen=3\]\)"),
                                 (good, 4, torch.zeros(3, 2), r"alibi must have shape \[2, 2\]")):
        with pytest.raises(RuntimeError, match=match):
            call(q, q, q, cu, good if cu is not good else cu, mx, 7, alibi, *tail)
