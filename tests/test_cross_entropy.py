"""fastattn.linear_cross_entropy and its row op: per-row losses and in-place gradients of every backend against a
float64 reference (bounded by torch's own error in the same dtype), the chunked fused op against the unfused
expression (values and gradients, bias, ignored rows, reductions, autocast, partial requires_grad), its errors,
and the models' fused loss against their unfused one."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.errors import ArgumentError
from fastattn.ops.cross_entropy import chunk_rows, dispatcher, linear_cross_entropy
from fastattn.reference import linear_cross_entropy_ref
from conftest import assert_bounded, backend_device, skip_if_not_built

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _rows(n, V, dtype, device, pad=3, seed=0):
    """Rows of V + pad (the pad NaN: a read past the row shows; the op gets the (n, V) view), targets with some
    ignored rows, and the float64 logits."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, V, generator=g, dtype=torch.float64) * 4
    store = torch.full((n, V + pad), float("nan"), dtype=dtype)
    store[:, :V] = x64.to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[1::5] = -100
    return store.to(device), t.to(device), store[:, :V].double()


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 130, 4099])
@pytest.mark.parametrize("write_grad", [True, False])
def test_rows_against_float64(backend_name, dtype, V, write_grad):
    skip_if_not_built(backend_name, "cross_entropy")
    if backend_name == "triton" and dtype == torch.float64:
        pytest.skip("triton: no float64")
    n = 11
    dev = backend_device(backend_name)
    store, t, x64 = _rows(n, V, dtype, dev)
    x = store[:, :V]
    loss = torch.empty(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=dev)
    before = x.clone()
    dispatcher.impls[backend_name].fwd(x, t, loss, -100, write_grad)
    ignored = (t == -100).cpu()
    ref = F.cross_entropy(x64, t.cpu(), reduction="none")  # 0 where ignored
    # torch in the same dtype (float16 / bfloat16 logits upcast on CPU, as torch's CPU kernels require float)
    xt = before.cpu().float() if dtype in (torch.float16, torch.bfloat16) else before.cpu()
    xt.requires_grad_(True)
    torch_loss = F.cross_entropy(xt, t.cpu(), reduction="none")
    assert_bounded("loss", loss.cpu(), ref, torch_loss.detach(), dtype)
    assert torch.equal(loss.cpu()[ignored], torch.zeros_like(loss.cpu()[ignored]))
    if write_grad:
        g64 = torch.softmax(x64, -1) - F.one_hot(t.cpu().clamp_min(0), V)
        g64[ignored] = 0
        torch_loss.sum().backward()
        assert_bounded("grad", x.cpu(), g64, xt.grad.to(dtype), dtype)
        assert torch.isnan(store[:, V:]).all()  # nothing written past a row
    else:
        assert torch.equal(x.cpu(), before.cpu())


def _problem(N=50, d=24, V=101, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    return x, w, b, t


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [u for u in tensors if u is not None])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 16, None])
def test_fused_equals_unfused_float64(backend, reduction, bias, chunk):
    x, w, b, t = _problem(bias=bias)
    with fastattn.backend(backend):
        got = linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=chunk)
    want = linear_cross_entropy_ref(x, w, t, b, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grads(got * 1.7, (x, w, b)), _grads(want * 1.7, (x, w, b))):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_fused_float32_bounded_by_torch():
    """float32: the loss and every gradient within 2x the unfused float32 expression's error against float64."""
    x, w, b, t = _problem(N=300, d=64, V=1000)
    x32, w32, b32 = (u.detach().float().requires_grad_() for u in (x, w, b))
    got = linear_cross_entropy(x32, w32, t, b32, chunk_size=64)
    torch_out = linear_cross_entropy_ref(x32, w32, t, b32)
    ref = linear_cross_entropy_ref(x, w, t, b)
    assert_bounded("loss", got.detach(), ref.detach(), torch_out.detach(), torch.float32)
    for name, a, c, r in zip("xwb", _grads(got, (x32, w32, b32)), _grads(torch_out, (x32, w32, b32)),
                             _grads(ref, (x, w, b))):
        assert_bounded(f"grad {name}", a, r, c, torch.float32, scale=r.abs().max().item())


def test_3d_input_and_gradcheck():
    x, w, b, t = _problem(N=12, d=5, V=9)
    x3, t3 = x.detach().view(3, 4, 5).requires_grad_(), t.view(3, 4)
    got = linear_cross_entropy(x3, w, t3, b, chunk_size=5)
    torch.testing.assert_close(got, linear_cross_entropy_ref(x3, w, t3, b), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, c, d: linear_cross_entropy(a, c, t3, d, chunk_size=5), (x3, w, b))


def test_partial_requires_grad_and_no_grad():
    x, w, b, t = _problem()
    w.requires_grad_(False)
    loss = linear_cross_entropy(x, w, t, b)
    gx, gb = torch.autograd.grad(loss, (x, b))
    want = linear_cross_entropy_ref(x, w, t, b)
    torch.testing.assert_close(gx, torch.autograd.grad(want, x, retain_graph=True)[0])
    torch.testing.assert_close(gb, torch.autograd.grad(want, b)[0])
    with torch.no_grad():
        out = linear_cross_entropy(x, w, t, b)
    assert not out.requires_grad
    torch.testing.assert_close(out, want.detach())


def test_reduction_none_and_edge_cases():
    x, w, b, t = _problem()
    torch.testing.assert_close(linear_cross_entropy(x, w, t, b, reduction="none"),
                               F.cross_entropy(F.linear(x, w, b), t, reduction="none"))
    everything_ignored = torch.full_like(t, -100)
    assert torch.isnan(linear_cross_entropy(x, w, everything_ignored, b))  # torch: 0 / 0
    assert torch.isnan(F.cross_entropy(F.linear(x, w, b), everything_ignored))
    # ... and its gradients are 0, as torch's (they were nan: one such micro-batch poisoned the accumulated ones)
    xg, wg, bg = (p.detach().requires_grad_() for p in (x, w, b))
    linear_cross_entropy(xg, wg, everything_ignored, bg).backward()
    assert all(bool((p.grad == 0).all()) for p in (xg, wg, bg))
    with pytest.raises(ArgumentError, match="target: class index"):  # (reduction none: torch's bare IndexError)
        linear_cross_entropy(x, w, torch.full_like(t, w.shape[0]), b, reduction="none")
    assert linear_cross_entropy(x[:0].double(), w.double(), t[:0], b.double()).dtype == torch.float64
    assert linear_cross_entropy(x, w, everything_ignored, b, reduction="sum").item() == 0.0
    empty = linear_cross_entropy(x[:0], w, t[:0], b)
    assert torch.isnan(empty) and torch.isnan(F.cross_entropy(F.linear(x[:0], w, b), t[:0]))
    # a custom ignore_index; -100 is then a class index out of range
    t2 = t.clone()
    t2[t2 == -100] = 3
    torch.testing.assert_close(linear_cross_entropy(x, w, t2, b, ignore_index=3),
                               F.cross_entropy(F.linear(x, w, b), t2, ignore_index=3))


def test_autocast_bfloat16_matches_unfused():
    """Under CPU autocast the GEMMs run in bfloat16 and the softmax in float32, as in the unfused expression."""
    x, w, b, t = _problem(N=200, d=64, V=300)
    x32, w32, b32 = (u.detach().float().requires_grad_() for u in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x32, w32, t, b32, chunk_size=64)
        want = linear_cross_entropy_ref(x32, w32, t, b32)
    assert got.dtype == want.dtype == torch.float32
    ref = linear_cross_entropy_ref(x, w, t, b)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    for a, c, r in zip(_grads(got, (x32, w32, b32)), _grads(want, (x32, w32, b32)), _grads(ref, (x, w, b))):
        assert a.dtype == torch.float32
        assert (a.double() - r).abs().max() <= 2 * (c.double() - r).abs().max() + 1e-3 * r.abs().max()


@pytest.mark.parametrize("bad, match", [
    (dict(target=torch.tensor([0, 5, 101])), r"target: class index 101 is outside \[0, 101\)"),
    (dict(target=torch.tensor([0, -1, 2])), r"target: class index -1"),
    (dict(target=torch.zeros(4, dtype=torch.long)), r"target: expected shape \(3,\)"),
    (dict(target=torch.zeros(3)), r"target: expected class indices"),
    (dict(weight=torch.randn(101, 5)), r"weight: expected shape \(V, 24\)"),
    (dict(bias=torch.randn(100)), r"bias: expected shape \(101,\)"),
    (dict(reduction="avg"), r"reduction: expected 'mean', 'sum' or 'none'"),
    (dict(chunk_size=0), r"chunk_size: expected a positive int"),
    (dict(chunk_size=0, reduction="none"), r"chunk_size: expected a positive int"),
    (dict(input=torch.zeros(3, 24, dtype=torch.long)), r"input: expected a floating tensor"),
])
def test_errors_name_the_argument(bad, match):
    args = dict(input=torch.randn(3, 24), weight=torch.randn(101, 24), target=torch.tensor([0, 5, 100]),
                bias=None, reduction="mean", chunk_size=None)
    args.update(bad)
    with pytest.raises(ArgumentError, match=match):
        linear_cross_entropy(args.pop("input"), args.pop("weight"), args.pop("target"), args.pop("bias"), **args)


def test_torch_compile_runs_the_fused_op():
    """torch.compile (fullgraph) records the fused forward as one custom op: loss and gradients equal eager's."""
    x, w, b, t = _problem()
    f = torch.compile(lambda a, c, d: linear_cross_entropy(a, c, t, d, chunk_size=16), backend="aot_eager",
                      fullgraph=True)
    got, want = f(x, w, b), linear_cross_entropy(x, w, t, b, chunk_size=16)
    assert torch.equal(got, want)
    for a, c in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b))):
        assert torch.equal(a, c)


def test_chunk_rows():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(2048, 4096, cpu) == 1024
    assert chunk_rows(8192, 50257, cpu) == 256  # at least MIN_CHUNK_ROWS
    assert chunk_rows(100, 50257, cpu) == 100
    assert chunk_rows(8192, 50257, cuda) == 5341  # 512 MB of bf16 logits: two chunks of 8192 tokens
    assert chunk_rows(8192, 128256, cuda) == 2092


# ---- the models' loss --------------------------------------------------------------------------------------------
def _models():
    from fastattn.models import BERT, BERTConfig, GPT, GPTConfig, Seq2Seq, Seq2SeqConfig
    small = dict(vocab_size=97, d_model=32, n_layer=2, n_head=4, max_seq_len=24)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 24), generator=g)
    masked = torch.where(torch.rand(3, 24, generator=g) < 0.3, ids, -100)
    return [
        ("gpt", GPT(GPTConfig(**small)), dict(input_ids=ids, labels=ids)),
        ("gpt-bias-free-rmsnorm", GPT(GPTConfig(**small, bias=False, norm="rmsnorm", tie_embeddings=False)),
         dict(input_ids=ids, labels=ids)),
        ("bert", BERT(BERTConfig(**small)), dict(input_ids=ids, labels=masked,
                                                   next_sentence_label=torch.tensor([0, 1, 0]))),
        ("seq2seq", Seq2Seq(Seq2SeqConfig(**small)), dict(input_ids=ids, labels=masked)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["gpt", "gpt-bias-free-rmsnorm", "bert", "seq2seq"])
def test_models_fused_loss_equals_unfused(index):
    """In training the fastattn backend skips the logits; loss and every parameter's gradient equal the unfused
    head's (skip_logits=False) to float32 rounding; in eval the logits come back."""
    name, model, kw = _models()[index]
    torch.manual_seed(0)
    model.train()
    fused = model(**kw)
    assert fused.logits is None
    fused.loss.backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(0)
    plain = model(**kw, skip_logits=False)
    assert plain.logits is not None
    plain.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert model.eval()(**kw).logits is not None


def test_gpt_shift_labels():
    from fastattn.models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, max_seq_len=12)).train()
    ids = torch.randint(0, 50, (2, 12))
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    torch.testing.assert_close(model(ids, labels=ids).loss, model(ids, shift_labels=shifted).loss)
    torch.testing.assert_close(model(ids, labels=ids).loss, model.eval()(ids, labels=ids).loss)
    with pytest.raises(ValueError, match="labels, shift_labels: pass one of them"):
        model(ids, labels=ids, shift_labels=shifted)
    with pytest.raises(ValueError, match=r"shift_labels: expected integer class ids of input_ids' shape \(2, 12\)"):
        model(ids, shift_labels=shifted[:, :5])


def _fused(loss) -> bool:
    return type(loss.grad_fn).__name__ == "LinearCrossEntropyFunctionBackward"


@pytest.mark.parametrize("N, V, d", [(16, 100, 32), (300, 100, 16), (16, 16384, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_float32_runs_unfused_within_bounds(N, V, d, bias):
    """CPU float32 in auto mode, at most TORCH_MAX_LOGITS logits, or with the weight's gradient at most
    TORCH_MAX_ROWS_PER_D rows per hidden unit: the unfused reference runs (faster there: see
    fastattn.ops.cross_entropy.TORCH_MAX_LOGITS); loss and gradients within the fused path's float32 bounds and equal
    to the reference's. No timing: the choice is checked."""
    from fastattn.ops import cross_entropy as ce
    assert N * V <= ce.TORCH_MAX_LOGITS or N <= ce.TORCH_MAX_ROWS_PER_D * d
    x, w, b, t = _problem(N=N, d=d, V=V, bias=bias)
    x32, w32, b32 = (None if u is None else u.detach().float().requires_grad_() for u in (x, w, b))
    got = linear_cross_entropy(x32, w32, t, b32)
    assert not _fused(got)
    torch_out = linear_cross_entropy_ref(x32, w32, t, b32)
    assert torch.equal(got, torch_out)
    ref = linear_cross_entropy_ref(x, w, t, b)
    assert_bounded("loss", got.detach(), ref.detach(), torch_out.detach(), torch.float32)
    for name, a, c, r in zip("xwb", _grads(got, (x32, w32, b32)), _grads(torch_out, (x32, w32, b32)),
                             _grads(ref, (x, w, b))):
        assert torch.equal(a, c), name
        assert_bounded(f"grad {name}", a, r, c, torch.float32, scale=r.abs().max().item())
    with pytest.raises(ArgumentError, match="target: class index"):  # still checked, as on the fused path
        linear_cross_entropy(x32, w32, torch.full_like(t, V), b32)


def test_small_problems_under_compile_keep_the_target_error():
    """The unfused small-problem path, compiled or exported, still raises ArgumentError for a class index outside
    [0, V) (torch's own IndexError / an inductor bounds assert before)."""
    x, w = torch.randn(12, 16), torch.randn(30, 16)
    bad = torch.randint(0, 30, (12,))
    bad[3] = 32

    class Loss(torch.nn.Module):
        def forward(self, x, t):
            return fastattn.linear_cross_entropy(x, w, t)

    compiled = torch.compile(Loss(), backend="aot_eager", fullgraph=True)
    good = torch.randint(0, 30, (12,))
    torch.testing.assert_close(compiled(x, good), F.cross_entropy(x @ w.t(), good))
    with pytest.raises(ArgumentError, match="class index 32"):
        compiled(x, bad)
    exported = torch.export.export(Loss(), (x, good)).module()
    with pytest.raises(ArgumentError, match="class index 32"):
        exported(x, bad)


def test_fused_path_keeps_larger_problems():
    """The fused path keeps more logits than TORCH_MAX_LOGITS (with more rows than TORCH_MAX_ROWS_PER_D per hidden
    unit, or without the weight's gradient), an explicit chunk_size, other dtypes and a forced backend."""
    from fastattn.ops import cross_entropy as ce
    x, w, b, t = _problem(N=300, d=64, V=1000)
    assert 300 * 1000 > ce.TORCH_MAX_LOGITS and 300 > ce.TORCH_MAX_ROWS_PER_D * 64
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    assert _fused(linear_cross_entropy(x32, w32, t))
    assert not _fused(linear_cross_entropy(x32[:16], w32, t[:16]))
    assert _fused(linear_cross_entropy(x32[:16], w32, t[:16], chunk_size=8))
    assert _fused(linear_cross_entropy(x[:16], w, t[:16]))  # float64
    with fastattn.backend("reference"):
        assert _fused(linear_cross_entropy(x32[:16], w32, t[:16]))
    big_v = torch.randn(ce.TORCH_MAX_LOGITS // 16 + 1, 64)
    t16 = torch.randint(0, big_v.shape[0], (16,))
    assert ce.torch_faster(x32[:16], big_v.requires_grad_(), None, torch.float32, True)  # 16 rows <= d / 4
    assert not ce.torch_faster(x32[:16], big_v, None, torch.float32, False)  # no weight gradient: fused
    assert _fused(linear_cross_entropy(x32[:16], big_v.detach(), t16))
