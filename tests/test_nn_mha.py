"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention across its argument space: parameters and
state_dict both ways, outputs, returned weights and the gradients of inputs and parameters (bounded by torch's own
float32 error against a float64 torch run), train and eval mode, every backend; is_causal as torch treats it;
dropout; the masks the kernel is handed; bad input raises torch's exception type."""
import contextlib
import copy
import zlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import MultiheadAttention
from conftest import TorchFunctionSubclass, assert_bounded, backend_device

E, H = 16, 4
BACKENDS = pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)

CTORS = {
    "plain": dict(),
    "batch_first": dict(batch_first=True),
    "no-bias": dict(bias=False, batch_first=True),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True, batch_first=True),
    "bias_kv+zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim-vdim": dict(kdim=6, vdim=10, batch_first=True),
}
MASKS = ["none", "bool-2d", "float-2d", "bool-3d", "float-3d", "kpm-bool", "kpm-float", "bool-2d+kpm-bool",
         "float-3d+kpm-bool", "bool-2d+kpm-float"]


def pair(seed=0, **kw):
    """(torch's module, ours with torch's state_dict loaded), parameters drawn at random (biases too)."""
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = MultiheadAttention(E, H, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def make_masks(kind, B, L, S, g, batched=True):
    """attn_mask / key_padding_mask in torch's convention (bool True = masked out), every row keeping a key."""
    kw = {}
    if "bool-2d" in kind:
        m = torch.rand(L, S, generator=g) < 0.4
        kw["attn_mask"] = m.index_fill_(1, torch.tensor([S - 1]), False)
    if "float-2d" in kind:
        kw["attn_mask"] = torch.randn(L, S, generator=g)
    if "bool-3d" in kind:
        m = torch.rand(B * H, L, S, generator=g) < 0.4
        kw["attn_mask"] = m.index_fill_(2, torch.tensor([S - 1]), False)
    if "float-3d" in kind:
        kw["attn_mask"] = torch.randn(B * H, L, S, generator=g)
    if "kpm-bool" in kind:
        kpm = torch.rand(B, S, generator=g) < 0.4
        kw["key_padding_mask"] = kpm.index_fill_(1, torch.tensor([S - 1]), False)
    if "kpm-float" in kind:
        kw["key_padding_mask"] = torch.randn(B, S, generator=g)
    if not batched:
        kw = {k: (v[0] if k == "key_padding_mask" else v[:H] if v.dim() == 3 else v) for k, v in kw.items()}
    return kw


def inputs(mha, kind, B, L, S, g, batched=True):
    """(query, key, value) with the identities torch checks: self-attention passes one tensor three times,
    cross-attention one tensor as key and value."""
    def t(n, d):
        shape = ((B, n, d) if mha.batch_first else (n, B, d)) if batched else (n, d)
        return torch.randn(shape, generator=g)
    q = t(L, E)
    if kind == "self":
        return q, q, q
    kv = t(S, mha.kdim)
    if kind == "cross":
        return q, kv, kv
    return q, kv, t(S, mha.vdim)


def run(mha, qkv, kw, grad_out, dtype=None):
    """Output, weights and the gradients of the distinct inputs and of every parameter (None where absent)."""
    if dtype is not None:
        mha = mha.to(dtype)
        kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    leaves, ids = [], {}
    for t in qkv:
        if id(t) not in ids:
            ids[id(t)] = len(leaves)
            leaves.append(t.detach().to(dtype or t.dtype).requires_grad_())
    args = [leaves[ids[id(t)]] for t in qkv]
    mha.zero_grad()
    out, w = mha(*args, **kw)
    loss = (out * grad_out[0].to(out)).sum()
    if w is not None:
        loss = loss + (w * grad_out[1].to(w)).sum()
    loss.backward()
    return [out, w] + [t.grad for t in leaves] + [p.grad for p in mha.parameters()]


def compare(ours, theirs, qkv, kw, g, dtype=torch.float32):
    """ours vs torch in float32, both bounded against torch in float64 (outputs, weights, every gradient)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "mismatched key_padding_mask and attn_mask" deprecation
        probe = theirs(*qkv, **kw)
        grad_out = (torch.randn(probe[0].shape, generator=g),
                    None if probe[1] is None else torch.randn(probe[1].shape, generator=g))
        ref = run(copy.deepcopy(theirs), qkv, kw, grad_out, torch.float64)
        base = run(theirs, qkv, kw, grad_out)
    got = run(ours, qkv, kw, grad_out)
    names = ["out", "weights"] + [f"input{i}.grad" for i in range(len(got) - 2 - len(list(ours.parameters())))] + \
        [f"{n}.grad" for n, _ in ours.named_parameters()]
    for name, a, b, e in zip(names, got, base, ref):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
            assert_bounded(name, a, e, b, dtype)


# ---- parameters and state_dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ctor", list(CTORS), ids=list(CTORS))
def test_parameters_and_state_dict_both_ways(ctor):
    kw = CTORS[ctor]
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(E, H, **kw)
    torch.manual_seed(3)
    ours = MultiheadAttention(E, H, **kw)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), f"{n}: the same seed initialized it differently"
    theirs, ours = pair(**kw)
    back = torch.nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


# ---- conformance --------------------------------------------------------------------------------------------
def _cases():
    """Every constructor with every mask kind on the cpu backend (every third case on the reference too); the input
    kind, the weights asked for and train / eval mode rotate through the cases."""
    cases = []
    for i, (ctor, kw) in enumerate(CTORS.items()):
        for j, mask in enumerate(MASKS):
            kinds = ["separate"] if "kdim" in kw else ["self", "cross", "separate"]
            kind = kinds[(i + j) % len(kinds)]
            weights = ["none", "average", "per-head"][(i + 2 * j) % 3]
            mode = ["train", "eval"][(i + j) % 2]
            for backend in ["cpu"] + (["reference"] if (i + j) % 3 == 0 else []):
                cases.append(pytest.param(backend, ctor, mask, kind, weights, mode,
                                          id=f"{backend}-{ctor}-{mask}-{kind}-{weights}-{mode}"))
    return cases


@pytest.mark.parametrize("backend_name, ctor, mask, kind, weights, mode", _cases(), indirect=["backend_name"])
def test_matches_torch(backend_name, ctor, mask, kind, weights, mode):
    g = torch.Generator().manual_seed(zlib.crc32(f"{ctor}-{mask}-{kind}".encode()))
    theirs, ours = pair(**CTORS[ctor])
    theirs.train(mode == "train")
    ours.train(mode == "train")
    B, L, S = 3, 5, 5 if kind == "self" else 7
    qkv = inputs(theirs, kind, B, L, S, g)
    kw = dict(make_masks(mask, B, L, S, g), need_weights=weights != "none", average_attn_weights=weights == "average")
    with fastattn.backend(backend_name):
        compare(ours, theirs, qkv, kw, g)


@pytest.mark.parametrize("mask", ["none", "bool-2d", "float-3d+kpm-bool", "bool-2d+kpm-float"])
@pytest.mark.parametrize("ctor", ["plain", "bias_kv+zero_attn", "kdim-vdim"])
def test_unbatched_matches_torch(mask, ctor):
    g = torch.Generator().manual_seed(11)
    theirs, ours = pair(**CTORS[ctor])
    L, S = 4, 6
    qkv = inputs(theirs, "separate" if "kdim" in ctor else "cross", 1, L, S, g, batched=False)
    kw = dict(make_masks(mask, 1, L, S, g, batched=False), average_attn_weights=len(mask) % 2 == 0)
    compare(ours, theirs, qkv, kw, g)


@BACKENDS
@pytest.mark.parametrize("ctor, mask, kind, weights", [
    ("batch_first", "bool-2d+kpm-bool", "self", "none"),
    ("plain", "float-3d", "cross", "average"),
    ("kdim-vdim", "kpm-float", "separate", "per-head"),
])
def test_matches_torch_every_backend(backend_name, ctor, mask, kind, weights):
    """Triton runs through its interpreter here: a few small cases."""
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(5)
    theirs, ours = pair(**CTORS[ctor])
    theirs, ours = theirs.to(dev), ours.to(dev)
    B, L, S = 2, 3, 3 if kind == "self" else 4
    qkv = [t.to(dev) for t in inputs(theirs, kind, B, L, S, g)]
    if kind == "self":
        qkv = [qkv[0]] * 3
    elif kind == "cross":
        qkv[2] = qkv[1]
    kw = dict({k: v.to(dev) for k, v in make_masks(mask, B, L, S, g).items()}, need_weights=weights != "none",
              average_attn_weights=weights == "average")
    with fastattn.backend(backend_name):
        compare(ours, theirs, qkv, kw, g)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool-2d", "kpm-bool", "bool-2d+kpm-bool"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_inference_matches_torch_fast_path(batch_first, mask, need_weights):
    """Under torch.inference_mode in eval mode torch takes its fused native path (self-attention, batch_first,
    bool masks); ours gives the same outputs and weights."""
    g = torch.Generator().manual_seed(2)
    theirs, ours = pair(batch_first=batch_first)
    theirs.eval()
    ours.eval()
    B, L = 2, 6
    x = inputs(theirs, "self", B, L, L, g)[0]
    kw = dict(make_masks(mask, B, L, L, g), need_weights=need_weights)
    with torch.inference_mode():
        a, wa = theirs(x, x, x, **kw)
        b, wb = ours(x, x, x, **kw)
    torch.testing.assert_close(b, a, atol=2e-6, rtol=2e-5)
    if need_weights:
        torch.testing.assert_close(wb, wa, atol=2e-6, rtol=2e-5)
    else:
        assert wa is None and wb is None


@pytest.mark.parametrize("backend_name", ["cpu", "reference", "triton"], indirect=True)
@pytest.mark.parametrize("ctor", ["plain", "batch_first", "no-bias"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["self", "self-causal", "cross", "cross-causal"])
def test_inference_short_way_equals_general_path(monkeypatch, backend_name, ctor, batched, dtype, kind):
    """Self- or cross-attention (key is value) without weights, gradient or masks but a causal one (is_causal with
    its attn_mask) takes the short way (no autograd node, checks only where inputs may differ): its output is
    bit-equal to the general path's, on every backend it dispatches to, and torch's."""
    import fastattn.nn.activation as act
    if backend_name == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32")
    theirs, ours = pair(**CTORS[ctor])
    ours = ours.to(dtype).eval()
    L, S = 7, 7 if kind.startswith("self") else 5
    q, k, _ = inputs(ours, kind.split("-")[0], 3, L, S, torch.Generator().manual_seed(5), batched)
    q = q.to(dtype)
    k = v = q if kind.startswith("self") else k.to(dtype)  # self: one tensor three times; cross: key is value
    kw = dict(need_weights=False)
    if kind.endswith("causal"):
        kw.update(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), is_causal=True)
    calls = []
    real = act.attention_fwd_nograd
    monkeypatch.setattr(act, "attention_fwd_nograd", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad(), fastattn.backend(backend_name):
        short = ours(q, k, v, **kw)[0]
        assert len(calls) == 1
        monkeypatch.setattr(act, "_plain_inference", lambda *a: None)
        general = ours(q, k, v, **kw)[0]
    assert len(calls) == 1 and short.shape == q.shape and short.dtype == dtype
    assert torch.equal(short, general)
    if dtype == torch.float32:
        with torch.no_grad():
            torch.testing.assert_close(short, theirs.eval()(q, k, v, **kw)[0], atol=2e-6, rtol=2e-5)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_inference_short_way_only_where_it_may(monkeypatch):
    """The short way is taken without gradient, dropout, masks, weights, extra keys, autocast or torch.func, and
    for a plain tensor of the weights' dtype; everything else keeps the general path."""
    import fastattn.nn.activation as act
    calls = []
    real = act.attention_fwd_nograd
    monkeypatch.setattr(act, "attention_fwd_nograd", lambda *a: calls.append(1) or real(*a))
    _, ours = pair(batch_first=True, dropout=0.5)
    ours.eval()
    g = torch.Generator().manual_seed(6)
    x = inputs(ours, "self", 2, 5, 5, g)[0]
    mask = make_masks("bool-2d", 2, 5, 5, g)["attn_mask"]

    def taken(fn) -> bool:
        before = len(calls)
        fn()
        return len(calls) > before
    with torch.no_grad():
        assert taken(lambda: ours(x, x, x, need_weights=False))
        assert not taken(lambda: ours(x, x, x))  # need_weights defaults to True
        assert not taken(lambda: ours(x, x, x, need_weights=False, attn_mask=mask))
        kv = x[:, :3].clone()
        assert taken(lambda: ours(x, kv, kv, need_weights=False))  # cross-attention, key is value
        assert not taken(lambda: ours(x, kv, kv.clone(), need_weights=False))  # key is not value
        assert not taken(lambda: ours(x, kv, kv, need_weights=False, attn_mask=mask[:, :3]))
        with pytest.raises(RuntimeError, match="features"):  # cross-attention's inputs checked as before
            ours(x, kv[..., :8], kv[..., :8], need_weights=False)
        sub = kv.as_subclass(TorchFunctionSubclass)  # torch ops, not kernels
        assert not taken(lambda: ours(x, sub, sub, need_weights=False))
        nested = torch.nested.nested_tensor([kv[0], kv[1, :2]], layout=torch.jagged)
        with pytest.raises(AssertionError, match="NestedTensor"):  # refused as by the general path
            ours(x, nested, nested, need_weights=False)
        with pytest.raises(RuntimeError, match="attn_mask has shape"):  # the causal hint's mask too
            ours(x, x, x, need_weights=False, attn_mask=mask[:, :3], is_causal=True)
        assert not taken(lambda: ours(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 5).bool()))
        with pytest.raises(RuntimeError, match="dtype"):  # the weights' dtype differs: F.linear's error either way
            copy.deepcopy(ours).double()(x, x, x, need_weights=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not taken(lambda: ours(x, x, x, need_weights=False))
        par = copy.deepcopy(ours)  # a parametrized projection: its weight is computed, not a parameter
        torch.nn.utils.parametrize.register_parametrization(par.out_proj, "weight", _Doubled())
        assert not taken(lambda: par(x, x, x, need_weights=False))
        vmapped = torch.vmap(lambda t: ours(t, t, t, need_weights=False)[0])
        assert not taken(lambda: vmapped(x[None]))
        ours.train()  # dropout 0.5 in training: the kernel's dropout, on the general path
        assert not taken(lambda: ours(x, x, x, need_weights=False))
    ours.eval()
    assert not taken(lambda: ours(x, x, x, need_weights=False))  # autograd on: parameters need gradients
    with pytest.raises(RuntimeError, match="is_causal"):  # the general path's checks still apply
        with torch.no_grad():
            ours(x, x, x, need_weights=False, is_causal=True)


def test_double_precision_and_gradcheck():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True).double()
    ours = MultiheadAttention(8, 2, add_bias_kv=True).double()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(4)
    q, kv = (torch.randn(n, 2, 8, generator=g, dtype=torch.float64) for n in (2, 3))
    kpm = torch.tensor([[False, True, False], [False, False, True]])
    a, wa = theirs(q, kv, kv, key_padding_mask=kpm)
    b, wb = ours(q, kv, kv, key_padding_mask=kpm)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(wb, wa)
    with fastattn.backend("reference"):
        assert torch.autograd.gradcheck(lambda q, kv: ours(q, kv, kv, key_padding_mask=kpm),
                                        (q.requires_grad_(), kv.requires_grad_()))


# ---- is_causal: torch's hint ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("mask_kind", ["causal-float", "causal-bool", "not-causal"])
@pytest.mark.parametrize("kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_hint_as_torch(mask_kind, kpm, need_weights):
    """torch runs causal (ignoring attn_mask) when is_causal=True without key_padding_mask and weights; otherwise
    it uses attn_mask. A wrong hint (a mask that is not causal) shows which one ran: ours runs the same."""
    g = torch.Generator().manual_seed(6)
    theirs, ours = pair()
    L, B = 6, 2
    x = torch.randn(L, B, E, generator=g)
    if mask_kind == "causal-float":
        m = torch.nn.Transformer.generate_square_subsequent_mask(L)
    elif mask_kind == "causal-bool":
        m = torch.ones(L, L, dtype=torch.bool).triu(1)
    else:
        m = torch.rand(L, L, generator=g) < 0.3
        m[:, 0] = False
    kw = dict(attn_mask=m, need_weights=need_weights, is_causal=True)
    if kpm:
        kw["key_padding_mask"] = torch.tensor([[False] * (L - 1) + [True], [False] * L])
    a, wa = theirs(x, x, x, **kw)
    b, wb = ours(x, x, x, **kw)
    torch.testing.assert_close(b, a, atol=2e-6, rtol=2e-5)
    if need_weights:
        torch.testing.assert_close(wb, wa, atol=2e-6, rtol=2e-5)


def test_is_causal_needs_attn_mask():
    theirs, ours = pair()
    x = torch.randn(3, 2, E)
    for m in (theirs, ours):
        with pytest.raises(RuntimeError, match="is_causal"):
            m(x, x, x, is_causal=True, need_weights=False)


# ---- dropout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
def test_dropout_seeded_unbiased_and_weights_match_output(backend_name):
    """Dropout runs in training only; torch.manual_seed reproduces it; averaged over draws the output is the
    no-dropout output (dropout is unbiased); with need_weights the weights carry the very dropout mask the output
    had (out = out_proj(weights @ V))."""
    g = torch.Generator().manual_seed(7)
    p = 0.3
    theirs, ours = pair(dropout=p)
    L, B = 5, 2
    x = torch.randn(L, B, E, generator=g)
    with fastattn.backend(backend_name):
        ours.eval()
        clean = ours(x, x, x, need_weights=False)[0]
        ours.train()
        torch.manual_seed(1)
        a = ours(x, x, x, need_weights=False)[0]
        torch.manual_seed(1)
        b = ours(x, x, x, need_weights=False)[0]
        c = ours(x, x, x, need_weights=False)[0]
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, clean)
        n = 150
        mean = sum(ours(x, x, x, need_weights=False)[0] for _ in range(n)) / n
        spread = (a - clean).abs().mean().item()
        assert (mean - clean).abs().mean().item() < 0.25 * spread, "dropout is biased"

        out, w = ours(x, x, x, average_attn_weights=False)  # (B, H, L, L)
    dropped = (w == 0).float().mean().item()
    assert abs(dropped - p) < 0.12, f"{dropped:.2f} of the weights dropped, expected ~{p}"
    v = F.linear(x, ours.in_proj_weight[2 * E:], ours.in_proj_bias[2 * E:]).view(L, B, H, E // H).permute(1, 2, 0, 3)
    rebuilt = ours.out_proj((w @ v).permute(2, 0, 1, 3).reshape(L, B, E))
    torch.testing.assert_close(out, rebuilt, atol=1e-5, rtol=1e-5)
    # torch's dropout differs draw for draw (its own generator use), not in its statistics
    theirs.train()
    spread_torch = (theirs(x, x, x, need_weights=False)[0] - clean).abs().mean().item()
    assert 0.3 < spread / spread_torch < 3.0


def test_dropout_gradients_use_the_forward_mask():
    """Backward through the weights and the output under dropout: finite, and reproducible under a seed."""
    _, ours = pair(dropout=0.5)
    x = torch.randn(4, 2, E, requires_grad=True)

    def grads():
        torch.manual_seed(9)
        out, w = ours(x, x, x)
        return torch.autograd.grad(out.sum() + (w ** 2).sum(), [x, ours.in_proj_weight])

    a, b = grads(), grads()
    for u, v in zip(a, b):
        assert torch.isfinite(u).all() and torch.equal(u, v)


def _weights_match_output(m, x, out, w):
    """out == out_proj(weights @ V) for self-attention on sequence-first x: the weights carry the output's mask."""
    L, B, _ = x.shape
    v = F.linear(x, m.in_proj_weight[2 * E:], m.in_proj_bias[2 * E:]).view(L, B, H, E // H).permute(1, 2, 0, 3)
    torch.testing.assert_close(out, m.out_proj((w @ v).permute(2, 0, 1, 3).reshape(L, B, E)), atol=1e-5, rtol=1e-5)


def test_dropout_weights_from_one_draw_in_threads(monkeypatch):
    """The weights' dropout mask comes from the seed the output used, drawn once: the generator used to be rewound
    and drawn again, so a draw in another thread in between gave weights of another mask (off by 0.16)."""
    import threading
    _, ours = pair(dropout=0.3)
    ours.train()
    x = torch.randn(6, 2, E)
    errors = []

    def work():
        try:
            for _ in range(20):
                with torch.no_grad():
                    _weights_match_output(ours, x, *ours(x, x, x, average_attn_weights=False))
        except AssertionError as e:
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]

    def rewind(state):
        raise AssertionError("torch.set_rng_state: MultiheadAttention rewound the global generator")
    monkeypatch.setattr(torch, "set_rng_state", rewind)
    ours(x, x, x)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_training_dropout_with_weights(backend):
    """torch.compile(fullgraph=True) of a training call with dropout and the default need_weights=True (the weights'
    mask used to be drawn by a call dynamo cannot trace)."""
    torch._dynamo.reset()
    _, ours = pair(dropout=0.3)
    ours.train()
    x = torch.randn(6, 2, E, requires_grad=True)
    out, w = torch.compile(ours, fullgraph=True, backend=backend)(x, x, x, average_attn_weights=False)
    _weights_match_output(ours, x.detach(), out.detach(), w.detach())
    (out.sum() + w.sum()).backward()
    assert torch.isfinite(x.grad).all()


# ---- what the kernel is handed --------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, want", [
    ("kpm-bool", (2, 1, 1, 7)), ("kpm-float", (2, 1, 1, 7)), ("bool-2d", (1, 1, 5, 7)),
    ("bool-2d+kpm-bool", (2, 1, 5, 7)), ("bool-2d+kpm-float", (2, 1, 5, 7)), ("float-3d+kpm-bool", (2, H, 5, 7)),
])
def test_masks_reach_the_kernel_unexpanded(monkeypatch, mask, want):
    """torch's masks are translated once (bool True = masked out -> True = takes part) and a key padding mask stays
    (B, 1, 1, S), or (B, 1, L, S) merged with a 2-D attn_mask: never (B, H, L, S) in memory. Self-attention
    projects Q, K, V in one matmul."""
    import fastattn.nn.activation as act
    seen, linears = [], []
    real_attention, real_linear = act.attention, F.linear

    def spy(q, k, v, **kw):
        seen.append(kw.get("attn_mask"))
        return real_attention(q, k, v, **kw)

    def count(*a, **kw):
        linears.append(a[1].shape)
        return real_linear(*a, **kw)

    monkeypatch.setattr(act, "attention", spy)
    monkeypatch.setattr(F, "linear", count)
    g = torch.Generator().manual_seed(8)
    theirs, ours = pair()
    B, L, S = 2, 5, 7
    q, kv, _ = inputs(ours, "cross", B, L, S, g)
    kw = make_masks(mask, B, L, S, g)
    ours(q, kv, kv, need_weights=False, **kw)
    m = seen[-1]
    assert tuple(m.shape) == want and m.numel() == torch.Size(want).numel()
    if m.dtype == torch.bool and "float" not in mask:
        expect = torch.ones(want, dtype=torch.bool)
        if "attn_mask" in kw:
            expect &= ~kw["attn_mask"]
        if "key_padding_mask" in kw:
            expect &= ~kw["key_padding_mask"][:, None, None, :]
        assert torch.equal(m, expect)
    linears.clear()
    x = q
    ours(x, x, x, need_weights=False)
    assert linears == [(3 * E, E), (E, E)], "self-attention: one projection for Q, K and V, one for the output"


def test_fully_masked_rows_give_zero():
    """The one documented difference: a query whose keys are all masked attends to nothing (attention output,
    weights and gradients 0) where torch's weights path gives NaN (its need_weights=False path gives 0 too)."""
    theirs, ours = pair()
    L, B = 3, 2
    x = torch.randn(L, B, E, requires_grad=True)
    m = torch.zeros(L, L, dtype=torch.bool)
    m[1] = True  # query 1 sees no key
    a, wa = theirs(x, x, x, attn_mask=m)
    assert torch.isnan(wa[:, 1]).all()
    torch.testing.assert_close(theirs(x, x, x, attn_mask=m, need_weights=False)[0][1],
                               theirs.out_proj.bias.expand(B, E))
    b, wb = ours(x, x, x, attn_mask=m)
    assert torch.isfinite(b).all() and torch.equal(wb[:, 1], torch.zeros_like(wb[:, 1]))
    torch.testing.assert_close(b[1], ours.out_proj.bias.expand(B, E))
    torch.testing.assert_close(b[[0, 2]], a[[0, 2]], atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(wb[:, [0, 2]], wa[:, [0, 2]], atol=2e-6, rtol=2e-5)
    (b.sum() + wb.sum()).backward()
    assert torch.isfinite(x.grad).all()


# ---- bad input: torch's exception type, a message naming the problem -----------------------------------------
def _bad_cases():
    x = torch.randn(5, 2, E)
    kv = torch.randn(7, 2, E)
    return {
        "embed-dim": (dict(), (torch.randn(5, 2, E + 1),) * 3, {}),
        "embed-dim-batch-first": (dict(batch_first=True), (torch.randn(2, 5, E + 1),) * 3, {}),  # torch's fast path
        "query-4d": (dict(), (torch.randn(1, 5, 2, E),) * 3, {}),
        "key-2d": (dict(), (x, kv[:, 0], kv[:, 0]), {}),
        "kdim": (dict(kdim=6, vdim=6), (x, torch.randn(7, 2, 5), torch.randn(7, 2, 6)), {}),
        "kdim-packed": (dict(), (x, torch.randn(7, 2, E + 1), torch.randn(7, 2, E + 1)), {}),
        "batch": (dict(), (x, torch.randn(7, 3, E), torch.randn(7, 3, E)), {}),
        "key-value-length": (dict(), (x, kv, kv[:6]), {}),
        "mask-2d-shape": (dict(), (x, kv, kv), dict(attn_mask=torch.zeros(5, 6, dtype=torch.bool))),
        "mask-3d-shape": (dict(), (x, kv, kv), dict(attn_mask=torch.zeros(2, 5, 7, dtype=torch.bool))),
        "mask-4d": (dict(), (x, kv, kv), dict(attn_mask=torch.zeros(2, H, 5, 7, dtype=torch.bool))),
        "mask-dtype": (dict(), (x, kv, kv), dict(attn_mask=torch.zeros(5, 7, dtype=torch.int64))),
        "kpm-shape": (dict(), (x, kv, kv), dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))),
        "kpm-shape-batch-first": (dict(batch_first=True), (x.transpose(0, 1),) * 3,
                                  dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))),
        "kpm-dims": (dict(), (x, kv, kv), dict(key_padding_mask=torch.zeros(2, 1, 7, dtype=torch.bool))),
        "kpm-dtype": (dict(), (x, kv, kv), dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.int32))),
    }


@pytest.mark.parametrize("mode", ["grad", "inference"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_torchs_exception_type(case, mode):
    """What torch raises is caught by the same except clause on ours. torch's type may depend on the mode (its fused
    inference path raises RuntimeError where its general path asserts): ours is then both."""
    ctor, args, kw = _bad_cases()[case]
    theirs, ours = pair(**ctor)
    ctx = torch.inference_mode if mode == "inference" else contextlib.nullcontext
    for m in (theirs, ours):
        m.train(mode == "grad")
    with pytest.raises(Exception) as t, ctx():
        theirs(*args, **kw)
    with pytest.raises(Exception) as o, ctx():
        ours(*args, **kw)
    assert isinstance(o.value, type(t.value)), f"torch raised {t.value!r}, we raised {o.value!r}"
    assert "MultiheadAttention" in str(o.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("need_weights", [False, True])
def test_trace_records_fastattn_ops_and_script_refuses(need_weights):
    """torch.jit.trace keeps the kernels' custom ops (a direct kernel call is invisible to it: the trace returned
    uninitialized memory), so the trace gives our outputs on new input; torch.jit.script raises a clear error (it
    failed on a line inside fastattn)."""
    class Wrap(torch.nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, q, kpm):
            out, w = self.mha(q, q, q, key_padding_mask=kpm, need_weights=need_weights)
            return (out, w) if need_weights else out

    m = Wrap(MultiheadAttention(E, H, batch_first=True)).eval()
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    with torch.no_grad():
        traced = torch.jit.trace(m, (torch.randn(2, 5, E), kpm), check_trace=False)
        q = torch.randn(2, 5, E) * 2
        torch.testing.assert_close(traced(q, kpm), m(q, kpm))
    assert any(n.kind() == "fastattn::attention_fwd" for n in traced.inlined_graph.nodes())
    with pytest.raises(RuntimeError, match="fastattn.nn.MultiheadAttention cannot be scripted"):
        torch.jit.script(m)


def test_two_float_masks_add_in_their_promoted_dtype():
    """A float16 attn_mask beside a float32 key_padding_mask: torch adds them in float32 (before, the padding mask
    was rounded to float16: ~1e-3 off)."""
    theirs, ours = pair(batch_first=True)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 5, E) * 3
    am, kpm = torch.randn(5, 5).half(), torch.randn(2, 5) * 4
    for need_weights in (False, True):
        a, wa = theirs(x, x, x, attn_mask=am, key_padding_mask=kpm, need_weights=need_weights)
        b, wb = ours(x, x, x, attn_mask=am, key_padding_mask=kpm, need_weights=need_weights)
        assert (a - b).abs().max() <= 1e-5
        if need_weights:
            assert (wa - wb).abs().max() <= 1e-6
