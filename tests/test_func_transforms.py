"""torch.func on add+norm and the INT8 ops (attention's are in test_sdpa_conformance.py): vmap folds the vmapped dim
into the kernel's rows (one launch), grad / jacrev / per-sample gradients match the reference's, and
gradcheck(check_batched_grad=True) passes in float64. And on the drop-in modules built on them: MultiheadAttention
(its attention weights too) and TransformerEncoderLayer against torch's own under vmap and per-sample gradients."""
import pytest
import torch
from torch.func import grad, jacrev, vmap

import fastattn
from fastattn.ops import add_norm as add_norm_op
from fastattn.reference import add_norm_ref, int8_matmul_ref, quantize_rows_ref, w8a16_matmul_ref
from conftest import backend_device

NORM_BK = pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)


def randn(*shape, seed=0, dtype=torch.float64, dev="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(dev)


def norm_fns(prenorm, rms):
    if rms:
        return (lambda x, r, w, b: fastattn.add_rms_norm(x, r, w, prenorm=prenorm),
                lambda x, r, w, b: add_norm_ref(x, r, w, None, 1e-6, is_rms=True, prenorm=prenorm, upcast=True))
    return (lambda x, r, w, b: fastattn.add_layer_norm(x, r, w, b, prenorm=prenorm),
            lambda x, r, w, b: add_norm_ref(x, r, w, b, prenorm=prenorm, upcast=True))


def scalar(f, prenorm):
    """A scalar loss of every output of f."""
    def loss(*args):
        out = f(*args)
        return out[0].sin().sum() + out[1].cos().sum() if prenorm else out.sin().sum()
    return loss


@NORM_BK
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_add_norm_vmap(backend_name, prenorm, rms, monkeypatch):
    dev = backend_device(backend_name)
    dt = torch.float32 if backend_name == "triton" else torch.float64
    x, r = randn(3, 4, 16, dtype=dt, dev=dev), randn(3, 4, 16, seed=1, dtype=dt, dev=dev)
    w, b = randn(3, 16, seed=2, dtype=dt, dev=dev), randn(3, 16, seed=3, dtype=dt, dev=dev)
    ours, ref = norm_fns(prenorm, rms)
    calls = []
    real = add_norm_op._fwd
    monkeypatch.setattr(add_norm_op, "_fwd", lambda x2, *a: calls.append(x2.shape) or real(x2, *a))
    with fastattn.backend(backend_name):
        for in_dims, args in [((0, 0, None, None), (x, r, w[0], b[0])), ((2, None, None, None), (x, r[:, :, 0],
                              w[0, :4], b[0, :4])), ((1, 1, None, None), (x, r, w[0], b[0]))]:
            calls.clear()
            torch.testing.assert_close(vmap(ours, in_dims=in_dims)(*args), vmap(ref, in_dims=in_dims)(*args))
            assert len(calls) == 1, calls  # the vmapped dim folded into the rows: one launch
        # a weight per sample: the reference, batched by torch
        torch.testing.assert_close(vmap(ours)(x, r, w, b), vmap(ref)(x, r, w, b))


@NORM_BK
@pytest.mark.parametrize("prenorm", [False, True])
def test_add_norm_grad_jacrev_per_sample(backend_name, prenorm):
    dev = backend_device(backend_name)
    dt = torch.float32 if backend_name == "triton" else torch.float64
    x, r = randn(3, 4, 16, dtype=dt, dev=dev), randn(3, 4, 16, seed=1, dtype=dt, dev=dev)
    w, b = randn(16, seed=2, dtype=dt, dev=dev), randn(16, seed=3, dtype=dt, dev=dev)
    ours, ref = norm_fns(prenorm, False)
    args = (0, 1, 2, 3)
    with fastattn.backend(backend_name):
        got = [grad(scalar(ours, prenorm), argnums=args)(x, r, w, b),
               jacrev(lambda x: ours(x, r[0], w, b)[0] if prenorm else ours(x, r[0], w, b))(x[0]),
               vmap(grad(scalar(ours, prenorm), argnums=args), in_dims=(0, 0, None, None))(x, r, w, b),
               vmap(grad(scalar(ours, prenorm), argnums=args))(x, r, w.expand(3, 16), b.expand(3, 16))]
    expected = [grad(scalar(ref, prenorm), argnums=args)(x, r, w, b),
                jacrev(lambda x: ref(x, r[0], w, b)[0] if prenorm else ref(x, r[0], w, b))(x[0]),
                vmap(grad(scalar(ref, prenorm), argnums=args), in_dims=(0, 0, None, None))(x, r, w, b),
                vmap(grad(scalar(ref, prenorm), argnums=args))(x, r, w.expand(3, 16), b.expand(3, 16))]
    tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else {}
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_add_norm_gradcheck_batched(backend_name, prenorm, rms):
    leaves = [randn(*s, seed=i).requires_grad_() for i, s in enumerate([(3, 8), (3, 8), (8,), (8,)])]
    ours, _ = norm_fns(prenorm, rms)

    def f(*t):
        with fastattn.backend(backend_name):
            return ours(*t)

    assert torch.autograd.gradcheck(f, leaves, check_batched_grad=True)


# ---- INT8 (inference ops: vmap) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
def test_int8_vmap(backend_name):
    dev = backend_device(backend_name)
    x = randn(3, 5, 32, dtype=torch.float32, dev=dev)
    w8, ws = quantize_rows_ref(randn(16, 32, seed=1, dtype=torch.float32, dev=dev))
    wb = torch.stack([w8, w8.flip(0), w8.flip(1)])
    smooth = torch.rand(3, 32, generator=torch.Generator().manual_seed(2)).to(dev) + 0.5
    with fastattn.backend(backend_name):
        q, s = vmap(fastattn.quantize_per_token)(x)
        qs, ss = vmap(fastattn.quantize_per_token)(x, smooth)
        out = vmap(lambda a, sa: fastattn.int8_matmul(a, w8, sa, ws, out_dtype=torch.float32))(q, s)
        out_w = vmap(lambda a, sa, w: fastattn.int8_matmul(a, w, sa, ws, out_dtype=torch.float32))(q, s, wb)
    for i in range(3):  # exact ops: bit-equal to the reference, sample by sample
        assert torch.equal(q[i], quantize_rows_ref(x[i])[0]) and torch.equal(s[i], quantize_rows_ref(x[i])[1])
        assert torch.equal(qs[i], quantize_rows_ref(x[i], smooth[i])[0])
        assert torch.equal(out[i], int8_matmul_ref(q[i], w8, s[i], ws, out_dtype=torch.float32))
        assert torch.equal(out_w[i], int8_matmul_ref(q[i], wb[i], s[i], ws, out_dtype=torch.float32))
    y = vmap(lambda x: fastattn.w8a16_matmul(x, w8, ws))(x)
    y_w = vmap(lambda x, w: fastattn.w8a16_matmul(x, w, ws))(x, wb)
    torch.testing.assert_close(y, torch.stack([w8a16_matmul_ref(x[i], w8, ws) for i in range(3)]))
    torch.testing.assert_close(y_w, torch.stack([w8a16_matmul_ref(x[i], wb[i], ws) for i in range(3)]))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16", "w8a8_static", "qat", "w8a16_matmul"])
def test_int8_layers_grad_jacrev_per_sample(mode):
    """Int8Linear (each mode, smoothed), QATLinear and w8a16_matmul under torch.func: grad, jacrev and per-sample
    gradients (vmap(grad)) give eager autograd's gradients (the int8 rounding passed straight through), and the
    values are the eager ones. Before, their old-style autograd Functions refused every torch.func transform."""
    from fastattn.nn import Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    if mode == "qat":
        layer = fastattn.prepare_qat(lin)
    elif mode == "w8a16_matmul":
        w8, ws = fastattn.quantize_per_channel(lin.weight.detach())
        bias = lin.bias.detach().clone().requires_grad_()
        layer = lambda t: fastattn.w8a16_matmul(t, w8, ws, bias)  # noqa: E731
    else:
        layer = Int8Linear.from_float(lin, mode, smooth=torch.rand(16) + 0.5, input_scale=0.05)
    g = torch.randn(4, 8)

    def loss(t):
        return (layer(t) * g[: t.shape[0]] if t.dim() == 2 else layer(t) * g[0]).sum()

    xe = x.clone().requires_grad_()
    loss(xe).backward()
    per_row = []
    for i in range(4):  # eager autograd, row by row (per-sample gradients' reference)
        xi = x[i:i + 1].clone().requires_grad_()
        (layer(xi) * g[i]).sum().backward()
        per_row.append(xi.grad[0])
    torch.testing.assert_close(grad(loss)(x), xe.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vmap(grad(lambda t, gi: (layer(t[None]) * gi).sum()))(x, g), torch.stack(per_row),
                               rtol=1e-6, atol=1e-6)
    jac = jacrev(lambda t: layer(t[None])[0])(x[0])  # (8, 16): d out_n / d x_k
    eager_jac = []
    for n in range(8):
        xi = x[:1].clone().requires_grad_()
        layer(xi)[0, n].backward()
        eager_jac.append(xi.grad[0])
    eager_jac = torch.stack(eager_jac)  # (the same for every row: the rounding passed straight through)
    torch.testing.assert_close(jac, eager_jac, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(vmap(lambda t: layer(t[None])[0])(x), layer(x), rtol=0, atol=0)
    # forward and reverse AD at once (an input that requires grad and carries a tangent: w8a16 raised "You must
    # implement the jvp function"): the tangent and the gradient each once
    import torch.autograd.forward_ad as fwAD
    tangent = torch.randn(4, 16)
    lin_x = x.clone().requires_grad_()
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(lin_x, tangent))
        jvp_out = fwAD.unpack_dual(out).tangent
    (out * g).sum().backward()
    torch.testing.assert_close(lin_x.grad, xe.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(jvp_out, tangent @ eager_jac.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_static", "w8a16"])
def test_int8_layer_grad_compiled(mode):
    """torch.compile(torch.func.grad(f)) through an Int8Linear gives eager's gradient: dynamo reads the grad-wrapped
    input as not requiring grad, and w8a8_static's torch-op rounding then traced with a zero gradient, silently."""
    from fastattn.nn import Int8Linear
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(16, 8), mode, smooth=torch.rand(16) + 0.5, input_scale=0.05)
    x, g = torch.randn(4, 16), torch.randn(4, 8)

    def loss(t):
        return (layer(t) * g).sum()
    expected = grad(loss)(x)
    assert expected.abs().max() > 0.1
    torch._dynamo.reset()  # (a frame another mode's trace gave up on would run eagerly)
    torch.testing.assert_close(torch.compile(grad(loss), backend="aot_eager")(x), expected, rtol=1e-6, atol=1e-6)


# ---- tensor subclasses (DTensor, AsyncCollectiveTensor, ...): torch ops, never the kernels' raw reads -------------
class Traced(torch.Tensor):
    """A subclass that sees every torch function (as DTensor and AsyncCollectiveTensor do)."""
    seen = set()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.add(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclasses_run_on_torch_ops():
    x, r = randn(4, 16, dtype=torch.float32), randn(4, 16, seed=1, dtype=torch.float32)
    w, b = randn(16, seed=2, dtype=torch.float32), randn(16, seed=3, dtype=torch.float32)
    y, s = fastattn.add_layer_norm(x.as_subclass(Traced), r, w, b, prenorm=True)
    ey, es = add_norm_ref(x, r, w, b, prenorm=True, upcast=True)
    assert isinstance(y, Traced) and Traced.seen, "the subclass did not see the computation"
    torch.testing.assert_close((y.as_subclass(torch.Tensor), s.as_subclass(torch.Tensor)), (ey, es))
    q, k = randn(1, 2, 5, 8, dtype=torch.float32), randn(1, 2, 7, 8, seed=1, dtype=torch.float32)
    out = fastattn.scaled_dot_product_attention(q.as_subclass(Traced), k, k)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), torch.nn.functional.scaled_dot_product_attention(q, k, k))


# ---- the drop-in modules ----------------------------------------------------------------------------------------
def _twins(cls, *args, **kw):
    import fastattn.nn as fnn
    torch.manual_seed(0)
    ours = getattr(fnn, cls)(*args, **kw).double().eval()
    theirs = getattr(torch.nn, cls)(*args, **kw).double().eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _per_sample_grads(m, loss, x, mha):
    """Gradients of loss(m(x)) in m's parameters, one set per x[i] (self-attention with weights when mha)."""
    from torch.func import functional_call

    def f(p, xi):
        out = functional_call(m, p, (xi, xi, xi), {"need_weights": True}) if mha else functional_call(m, p, (xi,))
        return loss(out)
    return vmap(grad(f), in_dims=(None, 0))(dict(m.named_parameters()), x)


def test_mha_with_weights_under_vmap_and_per_sample_grads():
    ours, theirs = _twins("MultiheadAttention", 16, 4, batch_first=True)
    x = randn(5, 3, 7, 16)  # vmapped dim 5, then the module's batch 3
    a = vmap(lambda x: ours(x, x, x, need_weights=True))(x)
    b = vmap(lambda x: theirs(x, x, x, need_weights=True))(x)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)

    def loss(out):
        return out[0].sin().sum() + out[1].cos().sum()
    ga, gb = _per_sample_grads(ours, loss, x, True), _per_sample_grads(theirs, loss, x, True)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_gradcheck_batched(need_weights):
    """need_weights=False: self-attention's packed-QKV Function, whose backward wrote into a tensor the kernel
    reads (no batched gradient: 'Cannot access data pointer')."""
    ours, _ = _twins("MultiheadAttention", 16, 4, batch_first=True)
    x = randn(2, 5, 16).requires_grad_()
    def f(x):
        out, w = ours(x, x, x, need_weights=need_weights, average_attn_weights=False)
        return (out, w) if need_weights else out
    assert torch.autograd.gradcheck(f, (x,), check_batched_grad=True)


def test_qkvpacked_and_encoder_layer_batched_grads():
    qkv = randn(2, 3, 3, 4, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastattn.attention_qkvpacked(t, causal="top_left"), (qkv,),
                                    check_batched_grad=True)
    ours, theirs = _twins("TransformerEncoderLayer", 16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    x = randn(2, 3, 16).requires_grad_()
    vs = randn(4, 2, 3, 16)
    for m in (ours, theirs):
        m.train()
    got, = torch.autograd.grad(ours(x), x, vs, is_grads_batched=True)
    want, = torch.autograd.grad(theirs(x), x, vs, is_grads_batched=True)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["mha-q", "mha-kv", "decoder-layer", "transformer"])
def test_vmap_with_inputs_not_vmapped(case):
    """vmap over some inputs only (a shared memory, one query for many key sets), parameters requiring grad: the
    projections of the inputs that are not vmapped are plain tensors under the transform (before, an old-style
    autograd.Function was applied to them, which torch.func refuses)."""
    q, mem = randn(3, 4, 16), randn(5, 16, seed=1)
    if case.startswith("mha"):
        mods = _twins("MultiheadAttention", 16, 4)
        if case == "mha-q":
            def call(m):
                return vmap(lambda a: m(a, mem, mem, need_weights=False)[0])(q)
        else:
            def call(m):
                return vmap(lambda a: m(q[0], a, a, need_weights=False)[0])(q)
    elif case == "decoder-layer":
        mods = _twins("TransformerDecoderLayer", 16, 4, 32, dropout=0.0)

        def call(m):
            return vmap(lambda a: m(a, mem))(q)
    else:
        mods = _twins("Transformer", 16, 4, 1, 1, 32, dropout=0.0)

        def call(m):
            return vmap(lambda a: m(a, q[0]))(q)
    ours, theirs = (m.eval() for m in mods)
    assert all(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(call(ours), call(theirs), rtol=1e-9, atol=1e-10)


def test_attention_dropout_follows_vmap_randomness():
    """Under vmap, attention dropout does what torch's random ops do: randomness="same" one mask for every sample
    (it gave each its own), "different" a mask per sample (it raised), "error" raises."""
    sdpa = fastattn.scaled_dot_product_attention
    q = randn(2, 4, 5, 8)
    qs = torch.stack([q] * 3)

    def f(a):
        return sdpa(a, a, a, dropout_p=0.5)
    torch.manual_seed(3)
    eager = f(q)
    torch.manual_seed(3)
    same = vmap(f, randomness="same")(qs)
    assert all(torch.equal(same[i], eager) for i in range(3))  # the eager call's mask: the same single draw
    torch.manual_seed(4)
    g = grad(lambda a: f(a).sin().sum())(q)
    torch.manual_seed(4)
    per_sample = vmap(grad(lambda a: f(a).sin().sum()), randomness="same")(qs)
    assert all(torch.equal(per_sample[i], g) for i in range(3))  # the backward's mask is the forward's
    different = vmap(f, randomness="different")(qs)
    assert not torch.equal(different[0], different[1]) and not torch.equal(different[1], different[2])
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(f)(qs)
    mha = fastattn.nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).double().train()
    x = randn(3, 2, 5, 8)
    out = vmap(lambda a: mha(a, a, a)[0], randomness="same")(x)  # need_weights: the weights' mask is the output's
    assert out.shape == x.shape
    with pytest.raises(fastattn.ArgumentError, match="randomness='different'"):
        vmap(lambda a: mha(a, a, a)[0], randomness="different")(x)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_per_sample_grads(norm_first):
    ours, theirs = _twins("TransformerEncoderLayer", 16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    x = randn(4, 2, 6, 16)

    def loss(out):
        return out.sin().sum()
    ga, gb = _per_sample_grads(ours, loss, x, False), _per_sample_grads(theirs, loss, x, False)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-7, atol=1e-9, msg=k)


# ---- torch.jit.trace -------------------------------------------------------------------------------------------
def test_jit_trace_records_the_custom_ops():
    """A direct call into the kernels is invisible to torch.jit.trace (it recorded only the output's allocation:
    the trace replayed uninitialized memory). While tracing, every op runs through its custom op, which the trace
    keeps: a traced GPT (float, w8a8, w8a16) and the ops alone give the eager results on new inputs."""
    import warnings
    from fastattn.models import GPT, GPTConfig

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).logits

    def traced(fn, *args):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of the Python-side checks
            return torch.jit.trace(fn, args, check_trace=False)

    ids, ids2 = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    for mode in (None, "w8a8", "w8a16"):
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=16)).eval()
        if mode:
            fastattn.quantize(m, mode=mode)
        tr = traced(Logits(m), ids)
        ops = {n.kind() for n in tr.inlined_graph.nodes() if n.kind().startswith("fastattn::")}
        assert {"fastattn::add_norm_fwd", "fastattn::attention_fwd"} <= ops, ops
        with torch.no_grad():
            torch.testing.assert_close(tr(ids2), m(ids2).logits, rtol=0, atol=0)
    w, b = randn(16, dtype=torch.float32), randn(16, seed=1, dtype=torch.float32)
    x, r = randn(4, 16, seed=2, dtype=torch.float32), randn(4, 16, seed=3, dtype=torch.float32)
    tr = traced(lambda x, r: fastattn.add_layer_norm(x, r, w, b), x, r)
    torch.testing.assert_close(tr(2 * x + 1, r), fastattn.add_layer_norm(2 * x + 1, r, w, b))
    q, k = randn(1, 2, 1, 16, seed=4, dtype=torch.float32), randn(1, 2, 64, 16, seed=5, dtype=torch.float32)
    tr = traced(lambda q, k: fastattn.decode_attention(q, k, k), q, k)
    torch.testing.assert_close(tr(q * 2, k + 1), fastattn.decode_attention(q * 2, k + 1, k + 1))
    tr = traced(lambda x: fastattn.ops.dropout.dropout(x, 0.5, True), x)
    assert 0.3 < (tr(torch.ones(4000)) == 0).float().mean() < 0.7  # a mask drawn per call, not a recorded one
