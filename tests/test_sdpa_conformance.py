"""fastattn.scaled_dot_product_attention against torch's own F.scaled_dot_product_attention where a drop-in once
differed: torch's CausalBias masks, exception types, batch broadcasting, dropout_p=1, torch.func transforms, and
fully masked rows. Outputs and gradients are bounded by torch's own float32 error against float64."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn
from fastattn.ops.attention import api as attn_api
from fastattn.ops.attention import function as attn_function
from conftest import assert_bounded, backend_device

BK = pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)


def randn(*shape, dev="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dev)


def compare(backend_name, ours, theirs, *inputs):
    """ours(*inputs) on backend_name against theirs in float32, both bounded against theirs in float64: the output
    and the gradient of every input."""
    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(randn(*out.shape, dev=out.device, seed=99).to(dtype))
        return [out] + [t.grad for t in leaves]

    with fastattn.backend(backend_name):
        got = run(ours, torch.float32)
    base, exact = run(theirs, torch.float32), run(theirs, torch.float64)
    for name, a, b, e in zip(["out"] + [f"grad {i}" for i in range(len(inputs))], got, base, exact):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != torch's {tuple(e.shape)}"
        assert_bounded(name, a, e, b, torch.float32)


# ---- CausalBias ------------------------------------------------------------------------------------------------
@BK
@pytest.mark.parametrize("variant", [causal_upper_left, causal_lower_right], ids=["upper_left", "lower_right"])
@pytest.mark.parametrize("L, S", [(7, 7), (5, 11), (11, 5)])
def test_causal_bias(backend_name, variant, L, S):
    if variant is causal_lower_right and L > S:
        pytest.skip("rows with no key: torch's lower-right bias gives NaN there")
    dev = backend_device(backend_name)
    bias = variant(L, S)
    q, k, v = randn(2, 3, L, 16, dev=dev), randn(2, 3, S, 16, dev=dev, seed=1), randn(2, 3, S, 8, dev=dev, seed=2)
    compare(backend_name, lambda *t: fastattn.scaled_dot_product_attention(*t, attn_mask=bias),
            lambda *t: F.scaled_dot_product_attention(*t, attn_mask=bias), q, k, v)


@pytest.mark.parametrize("variant", [causal_upper_left, causal_lower_right], ids=["upper_left", "lower_right"])
def test_causal_bias_under_compile(variant):
    q, k, v = randn(2, 3, 6, 16), randn(2, 3, 10, 16, seed=1), randn(2, 3, 10, 16, seed=2)
    bias = variant(6, 10)
    compiled = torch.compile(lambda q, k, v, m: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


@pytest.mark.parametrize("same", ["qkv", "kv", "qk"])
def test_one_tensor_as_several_inputs_under_fullgraph_compile(same):
    """attention(x, x, x) (and k is v, q is k) compiles with fullgraph=True and trains: dynamo refuses one tensor as
    two inputs of an autograd.Function, so the duplicates go in as views; output and gradients as eager torch's
    (float64)."""
    def fn(a, b):
        q, k, v = {"qkv": (a, a, a), "kv": (a, b, b), "qk": (a, a, b)}[same]
        return q, k, v

    outs = []
    for sdpa in (torch.compile(lambda a, b: fastattn.scaled_dot_product_attention(*fn(a, b), is_causal=True),
                               backend="aot_eager", fullgraph=True),
                 lambda a, b: F.scaled_dot_product_attention(*fn(a, b), is_causal=True)):
        a, b = randn(2, 3, 6, 16).double().requires_grad_(), randn(2, 3, 6, 16, seed=1).double().requires_grad_()
        out = sdpa(a, b)
        out.square().sum().backward()
        outs.append((out, a.grad, b.grad))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y)


def test_causal_bias_errors():
    q = randn(1, 2, 6, 8)
    for fn in (F.scaled_dot_product_attention, fastattn.scaled_dot_product_attention):  # torch's error, ours
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            fn(q, q, q, attn_mask=causal_upper_left(6, 6), is_causal=True)
    with pytest.raises(RuntimeError, match="CausalBias for \\(6, 7\\)"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=causal_lower_right(6, 7))
    with pytest.raises(ValueError, match="CausalBias"):
        fastattn.attention(q, q, q, causal="top_left", attn_mask=causal_lower_right(6, 6))


def test_other_tensor_subclasses_are_refused_not_read():
    class Biased(torch.Tensor):  # a subclass that gives torch functions its own meaning
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    class Plain(torch.Tensor):  # no torch-function override: its memory is what it says
        pass

    q = randn(1, 2, 6, 8)
    mask = torch.rand(6, 6) > 0.3
    with pytest.raises(RuntimeError, match="attn_mask: tensor subclass Biased"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=mask.as_subclass(Biased))
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, q, q, attn_mask=mask.as_subclass(Plain)),
                               F.scaled_dot_product_attention(q, q, q, attn_mask=mask))


# ---- exception types: torch raises RuntimeError; ours is also a ValueError -------------------------------------
@pytest.mark.parametrize("case", ["mask-and-causal", "1-d", "dtypes", "batch", "batch-3d-kv", "gqa-heads", "no-gqa",
                                  "dropout>1", "dropout<0", "head-dim", "mask-dtype", "half-mask"])
def test_errors_are_torchs_exception_type(case):
    q, k, v, kw = randn(2, 4, 5, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 8), {}
    if case == "mask-and-causal":
        kw = dict(attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True)
    elif case == "1-d":
        q, k, v = q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]
    elif case == "dtypes":
        q = q.double()
    elif case == "batch":
        k, v = randn(3, 4, 6, 8), randn(3, 4, 6, 8)
    elif case == "batch-3d-kv":  # k, v (2, 4, 8): 2 heads of 4 keys, whose first dims match q's (B, H) by chance
        k, v = randn(2, 4, 8), randn(2, 4, 8)
    elif case == "gqa-heads":
        k, v, kw = randn(2, 3, 6, 8), randn(2, 3, 6, 8), dict(enable_gqa=True)
    elif case == "no-gqa":
        k, v = randn(2, 2, 6, 8), randn(2, 2, 6, 8)
    elif case == "dropout>1":
        kw = dict(dropout_p=1.5)
    elif case == "dropout<0":
        kw = dict(dropout_p=-0.1)
    elif case == "head-dim":
        k = randn(2, 4, 6, 4)
    elif case == "mask-dtype":  # a float mask: float32 or q's dtype
        kw = dict(attn_mask=torch.zeros(5, 6, dtype=torch.float64))
    elif case == "half-mask":
        q, k, v, kw = q.bfloat16(), k.bfloat16(), v.bfloat16(), dict(attn_mask=torch.zeros(5, 6, dtype=torch.half))
    try:
        F.scaled_dot_product_attention(q, k, v, **kw)
    except RuntimeError:
        pass
    else:  # torch 2.11's CPU path took a mask with is_causal=True; later releases refuse it, as we do
        assert case == "mask-and-causal", f"torch {torch.__version__} accepted case {case!r}"
    with pytest.raises(RuntimeError) as err:
        fastattn.scaled_dot_product_attention(q, k, v, **kw)
    assert isinstance(err.value, ValueError) and isinstance(err.value, fastattn.ArgumentError)
    assert any(name in str(err.value) for name in ("query", "key", "value", "attn_mask", "dropout_p")), err.value


def test_signature_is_torchs():
    """scale and enable_gqa are keyword-only, as in torch; a float32 mask goes with a half query."""
    q = randn(1, 2, 3, 4)
    for f in (F.scaled_dot_product_attention, fastattn.scaled_dot_product_attention):
        with pytest.raises(TypeError, match="positional"):
            f(q, q, q, None, 0.0, False, 0.5)
    qh = q.bfloat16()
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(qh, qh, qh, attn_mask=torch.ones(3, 3)),
                               F.scaled_dot_product_attention(qh, qh, qh, attn_mask=torch.ones(3, 3)))


# ---- batch broadcasting ----------------------------------------------------------------------------------------
SHAPES = [((1, 4, 3, 8), (2, 4, 5, 8), (2, 4, 5, 8), False), ((2, 4, 3, 8), (1, 4, 5, 8), (2, 4, 5, 8), False),
          ((2, 1, 3, 8), (2, 4, 5, 8), (2, 4, 5, 8), False), ((2, 4, 3, 8), (4, 5, 8), (4, 5, 8), False),
          ((3, 8), (2, 4, 5, 8), (2, 4, 5, 8), False), ((5, 2, 4, 3, 8), (2, 4, 5, 8), (2, 4, 5, 8), False),
          ((1, 8, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8), True), ((2, 8, 3, 8), (2, 2, 5, 8), (2, 1, 5, 8), True),
          ((2, 8, 3, 8), (2, 2, 5, 8), (2, 4, 5, 8), True)]


@BK
@pytest.mark.parametrize("qs, ks, vs, gqa", SHAPES, ids=[f"{q}-{k}-{v}" for q, k, v, _ in SHAPES])
def test_batch_dims_broadcast(backend_name, qs, ks, vs, gqa):
    dev = backend_device(backend_name)
    q, k, v = randn(*qs, dev=dev), randn(*ks, dev=dev, seed=1), randn(*vs, dev=dev, seed=2)
    compare(backend_name, lambda *t: fastattn.scaled_dot_product_attention(*t, enable_gqa=gqa),
            lambda *t: F.scaled_dot_product_attention(*t, enable_gqa=gqa), q, k, v)


def test_broadcast_mask_and_batch():
    q, k, v = randn(1, 4, 3, 8), randn(2, 4, 5, 8, seed=1), randn(2, 4, 5, 8, seed=2)
    mask = randn(2, 1, 3, 5, seed=3)
    compare("cpu", lambda *t: fastattn.scaled_dot_product_attention(*t, attn_mask=mask),
            lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v)


def test_broadcast_is_never_materialized(monkeypatch):
    seen = []
    real = attn_function.fwd

    def spy(q, k, v, mask, *args):
        seen.append((q.stride(0), k.stride(0), v.stride(0), mask.stride()))
        return real(q, k, v, mask, *args)

    monkeypatch.setattr(attn_function, "fwd", spy)  # with a gradient: through the autograd.Function
    monkeypatch.setattr(attn_api, "fwd", spy)  # without: straight from the API
    q, k, v = randn(1, 4, 3, 8), randn(2, 4, 5, 8), randn(2, 4, 5, 8)
    fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.rand(3, 5) > 0.2)
    assert seen[0][0] == 0 and seen[0][3][:2] == (0, 0), seen  # q and the mask read through stride-0 views


# ---- dropout_p = 1 ---------------------------------------------------------------------------------------------
@BK
def test_dropout_one_gives_zeros_and_zero_grads(backend_name):
    dev = backend_device(backend_name)
    leaves = [randn(2, 3, 5, 8, dev=dev, seed=s).requires_grad_() for s in range(3)]
    with fastattn.backend(backend_name):
        out = fastattn.scaled_dot_product_attention(*leaves, dropout_p=1.0)
        out.sum().backward()
        _, lse = fastattn.attention(*leaves, dropout_p=1.0, return_lse=True)
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    with sdpa_kernel(SDPBackend.MATH):  # F.dropout's meaning; CUDA's efficient backend divides by 1 - p = 0: NaN
        theirs = F.scaled_dot_product_attention(*ref, dropout_p=1.0)
    theirs.sum().backward()
    assert torch.equal(out, theirs) and not out.any()
    for a, b in zip(leaves, ref):
        assert torch.equal(a.grad, b.grad) and not a.grad.any()
    torch.testing.assert_close(lse, fastattn.attention(*leaves, return_lse=True)[1])  # independent of dropout


# ---- torch.func ------------------------------------------------------------------------------------------------
@BK
@pytest.mark.parametrize("in_dims", [0, (0, None, None), (None, 1, 1), (3, 0, 0)], ids=str)
def test_vmap_folds_into_one_launch(backend_name, in_dims, monkeypatch):
    dev = backend_device(backend_name)
    q = randn(3, 2, 2, 5, 8, dev=dev)
    if in_dims == (3, 0, 0):
        q = q.movedim(0, 3)  # the vmapped dim is the one before head_dim: a non-unit last-dim stride after moving
    k = randn(3, 2, 2, 7, 8, dev=dev, seed=1)
    v = randn(3, 2, 2, 7, 8, dev=dev, seed=2)
    if in_dims == (0, None, None):
        k, v = k[0], v[0]
    elif in_dims == (None, 1, 1):
        q, k, v = q[0], k.movedim(0, 1), v.movedim(0, 1)
    calls = []
    real = attn_function.fwd
    monkeypatch.setattr(attn_function, "fwd", lambda *a: calls.append(a[0].shape) or real(*a))
    with fastattn.backend(backend_name):
        got = vmap(fastattn.scaled_dot_product_attention, in_dims=in_dims)(q, k, v)
    expected = vmap(F.scaled_dot_product_attention, in_dims=in_dims)(q, k, v)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert len(calls) == 1 and calls[0][0] == 3 * 2, calls  # the vmapped dim folded into the batch: one call


@BK
def test_grad_jacrev_and_per_sample_grads(backend_name):
    dev = backend_device(backend_name)
    q, k, v = randn(3, 2, 5, 8, dev=dev), randn(3, 2, 7, 8, dev=dev, seed=1), randn(3, 2, 7, 8, dev=dev, seed=2)

    def loss(sdpa):
        return lambda q, k, v: sdpa(q, k, v, is_causal=True).sin().sum()

    with fastattn.backend(backend_name):
        ours = [grad(loss(fastattn.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v),
                jacrev(lambda q: fastattn.scaled_dot_product_attention(q, k[0], v[0]))(q[0]),
                vmap(grad(loss(fastattn.scaled_dot_product_attention), argnums=(0, 1, 2)))(q, k, v)]
    theirs = [grad(loss(F.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v),
              jacrev(lambda q: F.scaled_dot_product_attention(q, k[0], v[0]))(q[0]),
              vmap(grad(loss(F.scaled_dot_product_attention), argnums=(0, 1, 2)))(q, k, v)]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(mask=True)], ids=["plain", "causal", "mask"])
def test_gradcheck_batched_float64(backend_name, kw):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5))
    mask = torch.randn(3, 5, generator=g, dtype=torch.float64) if kw.pop("mask", False) else None

    def f(q, k, v):
        with fastattn.backend(backend_name):
            return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v), check_batched_grad=True)


# ---- fully masked rows -----------------------------------------------------------------------------------------
def test_fully_masked_rows_match_torch_sdpa_on_cpu():
    """README: a row whose keys are all masked gives 0; torch's SDPA (math and flash CPU kernels) gives 0 too in
    this torch, while torch.nn.MultiheadAttention gives NaN. If torch changes, this says so."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = randn(2, 2, 4, 8), randn(2, 2, 6, 8, seed=1), randn(2, 2, 6, 8, seed=2)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    ours = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not ours[:, :, 1].any()
    for be in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(be):
            torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@BK
@pytest.mark.parametrize("bias", [-1e9, -1e6])
def test_rows_of_large_finite_scores(backend_name, bias):
    """A float mask writing "masked" as a big finite number over a whole row (a learned bias, which makes auto
    dispatch choose the reference backend): torch's softmax is still a distribution there. The reference's
    exp(s - logsumexp) in float32 dropped logsumexp's log(S): that row came out S times too large."""
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 16, 8, seed=1), randn(1, 2, 16, 8, seed=2)
    mask = randn(4, 16, seed=3)
    mask[1] = bias
    mask[2, 5:] = bias
    if backend_name == "reference":  # the mask's gradient too
        compare(backend_name, fastattn.scaled_dot_product_attention, F.scaled_dot_product_attention, q, k, v, mask)
    else:
        compare(backend_name, lambda *x: fastattn.scaled_dot_product_attention(*x, attn_mask=mask),
                lambda *x: F.scaled_dot_product_attention(*x, attn_mask=mask.to(x[0].dtype)), q, k, v)


def test_learned_mask_keeps_what_torch_keeps():
    """A float mask that requires grad runs on the reference under autograd: it keeps the (B, H, L, S) scores' size
    twice for the backward, as torch's SDPA does (it kept four: the masked scores, exp, the probabilities, twice
    the memory of torch's at L 2048)."""
    q, k, v = (randn(2, 2, 64, 8, seed=s).requires_grad_() for s in range(3))
    mask = randn(2, 64, 64, seed=3)[:, None].requires_grad_()
    square = 2 * 2 * 64 * 64

    def saved_squares(fn):
        n = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(t.numel() >= square) or t, lambda t: t):
            fn(q, k, v, attn_mask=mask).sum()
        return sum(n)
    assert saved_squares(fastattn.scaled_dot_product_attention) <= saved_squares(F.scaled_dot_product_attention)


@BK
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the Triton interpreter's numpy)
def test_rows_masked_with_the_lowest_float(backend_name):
    """README: a row whose float mask is torch.finfo(dtype).min throughout counts as masked on the kernels (their
    scaling by log2(e) overflows to -inf): 0 there; the reference follows torch (the row spread evenly)."""
    q, k, v = randn(1, 1, 3, 8), randn(1, 1, 5, 8, seed=1), randn(1, 1, 5, 8, seed=2)
    mask = torch.zeros(3, 5)
    mask[1] = torch.finfo(torch.float32).min
    with fastattn.backend(backend_name):
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[:, :, ::2], F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, ::2])
    expect = v.mean(2) if backend_name == "reference" else torch.zeros(1, 1, 8)
    torch.testing.assert_close(out[:, :, 1], expect)


@BK
@pytest.mark.parametrize("qs, kvs", [((2, 0, 7, 16), (2, 0, 9, 16)), ((0, 7, 16), (0, 9, 16)),
                                     ((0, 2, 5, 8), (0, 2, 6, 8)), ((1, 2, 0, 8), (1, 2, 6, 8)), ((7, 8), (9, 8))],
                         ids=["no-heads", "3d-empty-batch", "empty-batch", "no-queries", "2d"])
def test_empty_dims_as_torch(backend_name, qs, kvs):
    """Zero heads, an empty (3-D) batch, no queries: torch's shapes, forward and backward (zero heads were taken
    for 2-D inputs' missing head dim; an empty gradient kept an expanded dout's zero strides)."""
    compare(backend_name, fastattn.scaled_dot_product_attention, F.scaled_dot_product_attention,
            randn(*qs), randn(*kvs, seed=1), randn(*kvs, seed=2))


def test_vmap_of_a_decode_sized_call():
    """One query against a long cache is routed to the decode kernel outside transforms; under vmap the attention
    Function's rule runs it (the decode kernel cannot read batched tensors)."""
    q, k, v = randn(3, 2, 4, 1, 16), randn(3, 2, 4, 700, 16, seed=1), randn(3, 2, 4, 700, 16, seed=2)
    torch.testing.assert_close(vmap(fastattn.scaled_dot_product_attention)(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)


# ---- autocast ---------------------------------------------------------------------------------------------------
@BK
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.float32, torch.bfloat16),
                                    (torch.float16,) * 3, (torch.float64,) * 3], ids=["fp32", "mixed", "fp16", "fp64"])
def test_autocast_casts_like_torch(backend_name, dtypes):
    """Under autocast torch's SDPA runs in autocast's dtype (mixed and float16 inputs included; float64 stays):
    ours returns the same dtype and values within bfloat16's error, and gradients reach the inputs in theirs."""
    if dtypes[0] == torch.float64 and backend_name == "triton":
        pytest.skip("the Triton kernels have no float64")
    dev = backend_device(backend_name)
    q, k, v = (randn(2, 4, 6, 16, dev=dev, seed=i).to(dt).requires_grad_() for i, dt in enumerate(dtypes))
    with torch.autocast(dev, dtype=torch.bfloat16):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with fastattn.backend(backend_name):
            got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.dtype == want.dtype
    exact = F.scaled_dot_product_attention(*(t.detach().double() for t in (q, k, v)), is_causal=True)
    assert_bounded("out", got, exact, want, want.dtype)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in (q, k, v))
