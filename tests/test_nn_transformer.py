"""fastattn.nn's Transformer family against torch.nn's: constructors, parameters, state_dicts both ways and the same
initialization under a seed; outputs and the gradients of inputs and parameters (bounded by torch's own float32
error against a float64 torch run) in train and eval mode, under inference_mode (torch's fused fast path and its
nested-tensor path), on every backend; dropout's statistics; masks never expanded; bad input."""
import contextlib
import zlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import nn as fnn
from conftest import TorchFunctionSubclass, assert_bounded, backend_device

D, NHEAD, FF = 16, 4, 24

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True",
                                        "ignore:Support for mismatched")


def randomize(m: torch.nn.Module, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == D else 0.0))


def twins(name, *args, **kw):
    """(torch's module, ours) built with the same arguments, ours carrying torch's (randomized) state_dict."""
    theirs = getattr(torch.nn, name)(*args, **kw)
    randomize(theirs)
    ours = getattr(fnn, name)(*args, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def layer_twins(kind, **kw):
    kw = dict(dict(dim_feedforward=FF, dropout=0.0), **kw)
    return twins("TransformerEncoderLayer" if kind == "encoder" else "TransformerDecoderLayer", D, NHEAD, **kw)


def run(m, args, kw, grad_out, dtype=None):
    """Output and the gradients of the tensor inputs and of every parameter."""
    if dtype is not None:
        m = copy.deepcopy(m).to(dtype)
        kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    leaves = [a.detach().to(dtype or a.dtype).requires_grad_() for a in args]
    m.zero_grad()
    out = m(*leaves, **kw)
    (out * grad_out.to(out)).sum().backward()
    return [out] + [t.grad for t in leaves] + [p.grad for p in m.parameters()]


def compare(ours, theirs, args, kw, seed=0):
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad_out = torch.randn(theirs(*args, **kw).shape, generator=g)
        ref = run(theirs, args, kw, grad_out, torch.float64)
        base = run(theirs, args, kw, grad_out)
    got = run(ours, args, kw, grad_out)
    names = ["out"] + [f"input{i}.grad" for i in range(len(args))] + [f"{n}.grad" for n, _ in ours.named_parameters()]
    assert len(got) == len(names)
    for name, a, b, e in zip(names, got, base, ref):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_bounded(name, a, e, b, torch.float32)


def seq(batch_first, B, L, g, batched=True):
    shape = ((B, L, D) if batch_first else (L, B, D)) if batched else (L, D)
    return torch.randn(shape, generator=g)


def masks(kind, B, L, S, g, prefix=""):
    """Mask arguments in torch's convention (bool True = masked out); every query keeps a key."""
    kw = {}
    if kind in ("causal", "causal-hint"):
        kw[f"{prefix}mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L)
    elif kind == "bool":
        m = torch.rand(L, S, generator=g) < 0.3
        kw[f"{prefix}mask"] = m.index_fill_(1, torch.tensor([0]), False)
    elif kind == "float":
        kw[f"{prefix}mask"] = torch.randn(L, S, generator=g)
    if kind in ("kpm", "bool+kpm"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, S - 2:] = True
        kw[f"{prefix}key_padding_mask"] = kpm
    if kind == "bool+kpm":
        kw[f"{prefix}mask"] = (torch.rand(L, S, generator=g) < 0.3).index_fill_(1, torch.tensor([0]), False)
    if kind == "kpm-float":
        kw[f"{prefix}key_padding_mask"] = torch.randn(B, S, generator=g)
    return kw


# ---- constructors, parameters, state_dicts -----------------------------------------------------------------
CLASSES = [
    ("TransformerEncoderLayer", (D, NHEAD), dict(dim_feedforward=FF, activation="gelu", norm_first=True)),
    ("TransformerDecoderLayer", (D, NHEAD), dict(dim_feedforward=FF, bias=False, batch_first=True)),
    ("Transformer", (), dict(d_model=D, nhead=NHEAD, num_encoder_layers=2, num_decoder_layers=1,
                             dim_feedforward=FF, layer_norm_eps=1e-3)),
]


@pytest.mark.parametrize("name, args, kw", CLASSES, ids=[c[0] for c in CLASSES])
def test_same_keys_same_init_both_ways(name, args, kw):
    torch.manual_seed(5)
    theirs = getattr(torch.nn, name)(*args, **kw)
    torch.manual_seed(5)
    ours = getattr(fnn, name)(*args, **kw)
    assert isinstance(ours, getattr(torch.nn, name))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), f"{k}: the same seed initialized it differently"
    randomize(theirs, 1)
    ours.load_state_dict(theirs.state_dict())
    back = getattr(torch.nn, name)(*args, **kw)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
                                  "TransformerEncoder", "TransformerDecoder", "Transformer"])
def test_signatures_are_torchs(name):
    """Constructor and forward signatures equal torch's (names, order, defaults), so a torch module's constructor
    arguments build ours (fastattn.convert relies on it)."""
    import inspect
    ours, theirs = getattr(fnn, name), getattr(torch.nn, name)
    for method in ("__init__", "forward"):
        a, b = inspect.signature(getattr(ours, method)), inspect.signature(getattr(theirs, method))
        assert [(p.name, p.default, p.kind) for p in a.parameters.values()] == \
            [(p.name, p.default, p.kind) for p in b.parameters.values()], f"{name}.{method}: {a} != {b}"


def test_stacks_build_fastattn_layers():
    layer = fnn.TransformerEncoderLayer(D, NHEAD, FF, batch_first=True)
    enc = fnn.TransformerEncoder(layer, 3, norm=fnn.LayerNorm(D), enable_nested_tensor=False)
    assert all(type(m) is fnn.TransformerEncoderLayer for m in enc.layers)
    assert all(type(m.self_attn) is fnn.MultiheadAttention for m in enc.layers)
    assert len({id(m) for m in enc.layers}) == 3  # deep copies, as torch makes
    dec = fnn.TransformerDecoder(fnn.TransformerDecoderLayer(D, NHEAD, FF), 2)
    assert all(type(m) is fnn.TransformerDecoderLayer for m in dec.layers)
    t = fnn.Transformer(D, NHEAD, 1, 1, FF)
    assert type(t.encoder) is fnn.TransformerEncoder and type(t.decoder) is fnn.TransformerDecoder
    assert type(t.encoder.layers[0]) is fnn.TransformerEncoderLayer
    assert type(t.decoder.layers[0].multihead_attn) is fnn.MultiheadAttention
    assert type(t.encoder.norm) is fnn.LayerNorm and type(t.decoder.norm) is fnn.LayerNorm
    custom = fnn.Transformer(D, NHEAD, custom_encoder=enc, custom_decoder=dec)
    assert custom.encoder is enc and custom.decoder is dec
    torch.testing.assert_close(fnn.Transformer.generate_square_subsequent_mask(5),
                               torch.nn.Transformer.generate_square_subsequent_mask(5))


# ---- layers ---------------------------------------------------------------------------------------------
def _layer_cases():
    """Each layer kind with each mask kind; norm_first, activation, batch_first, bias and train / eval rotate."""
    acts = ["relu", "gelu", torch.tanh, torch.nn.GELU(approximate="tanh")]
    cases = []
    for i, kind in enumerate(["encoder", "decoder"]):
        for j, mask in enumerate(["none", "causal", "causal-hint", "bool", "float", "kpm", "bool+kpm", "kpm-float"]):
            for norm_first in (False, True):
                n = i + j + norm_first
                act = acts[n % len(acts)]
                cases.append(pytest.param(kind, mask, norm_first, act, n % 2 == 0, n % 3 != 2, ["train", "eval"][j % 2],
                                          id=f"{kind}-{mask}-{'pre' if norm_first else 'post'}-"
                                             f"{getattr(act, '__name__', act)}-{'bf' if n % 2 == 0 else 'sf'}-"
                                             f"{'bias' if n % 3 != 2 else 'nobias'}-{['train', 'eval'][j % 2]}"))
    return cases


@pytest.mark.parametrize("kind, mask, norm_first, activation, batch_first, bias, mode", _layer_cases())
def test_layer_matches_torch(kind, mask, norm_first, activation, batch_first, bias, mode):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{mask}-{norm_first}".encode()))
    theirs, ours = layer_twins(kind, activation=activation, batch_first=batch_first, norm_first=norm_first,
                               bias=bias)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    B, L, S = 3, 5, 7
    x = seq(batch_first, B, L, g)
    if kind == "encoder":
        args = (x,)
        kw = masks(mask, B, L, L, g, "src_")
        if mask == "causal-hint":
            kw["is_causal"] = True
    else:
        args = (x, seq(batch_first, B, S, g))
        kw = masks(mask, B, L, L, g, "tgt_")
        kw.update({k.replace("tgt_", "memory_"): v for k, v in masks(mask if mask != "causal" else "kpm", B, L, S, g,
                                                                      "tgt_").items() if "causal" not in mask})
        if mask == "causal-hint":
            kw["tgt_is_causal"] = True
    compare(ours, theirs, args, kw)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_unbatched_layer_matches_torch(kind, norm_first):
    g = torch.Generator().manual_seed(3)
    theirs, ours = layer_twins(kind, norm_first=norm_first)
    x = seq(False, 1, 6, g, batched=False)
    args = (x,) if kind == "encoder" else (x, seq(False, 1, 4, g, batched=False))
    kpm = torch.tensor([False, False, False, False, True, False])
    kw = dict(src_key_padding_mask=kpm) if kind == "encoder" else dict(tgt_key_padding_mask=kpm)
    compare(ours, theirs, args, kw)


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layer_every_backend(backend_name, kind):
    """Triton runs through its interpreter here: one small case per layer kind."""
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(4)
    theirs, ours = layer_twins(kind, batch_first=True, norm_first=kind == "decoder")
    theirs, ours = theirs.to(dev), ours.to(dev)
    B, L = 2, 3
    x = seq(True, B, L, g).to(dev)
    args = (x,) if kind == "encoder" else (x, seq(True, B, 4, g).to(dev))
    kw = {k: v.to(dev) for k, v in masks("bool+kpm", B, L, L, g, "src_" if kind == "encoder" else "tgt_").items()}
    with fastattn.backend(backend_name):
        compare(ours, theirs, args, kw)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("mask", ["none", "bool", "kpm", "bool+kpm", "causal-hint"])
def test_encoder_layer_inference_matches_torch_fast_path(norm_first, activation, mask):
    """In eval mode under inference_mode torch runs torch._transformer_encoder_layer_fwd (its fused native path);
    ours matches it (and ReLU / GELU run in place there)."""
    g = torch.Generator().manual_seed(6)
    theirs, ours = layer_twins("encoder", activation=activation, norm_first=norm_first, batch_first=True)
    theirs.eval()
    ours.eval()
    B, L = 2, 6
    x = seq(True, B, L, g)
    kw = masks(mask, B, L, L, g, "src_")
    if mask == "causal-hint":
        kw["is_causal"] = True
    with torch.inference_mode():
        a, b = theirs(x, **kw), ours(x, **kw)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu-tanh", "callable"])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_ffn_in_row_chunks(monkeypatch, kind, activation, bias):
    """CPU inference runs the FFN in row chunks (FFN_CHUNK_BYTES; here 5 rows a chunk, the last one short): the
    output is torch's, in eval mode with and without autograd; a training-mode layer or one whose parameters need
    gradients under autograd never chunks. (Against torch's standard path: its fused encoder path computes the exact
    GELU for an nn.GELU(approximate="tanh"), ours the module's tanh form, as torch's standard path does.)"""
    import fastattn.nn.transformer as tr
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    act = {"relu": "relu", "gelu": "gelu", "gelu-tanh": torch.nn.GELU(approximate="tanh"),
           "callable": lambda t: torch.sigmoid(t) * t}[activation]
    theirs, ours = layer_twins(kind, activation=act, batch_first=True, bias=bias)
    theirs.eval()
    ours.eval()
    monkeypatch.setattr(tr, "FFN_CHUNK_BYTES", 5 * FF * 4)
    calls = []
    real = tr._ffn_chunked
    monkeypatch.setattr(tr, "_ffn_chunked", lambda *a: calls.append(a[2]) or real(*a))
    g = torch.Generator().manual_seed(8)
    args = (seq(True, 3, 7, g),) if kind == "encoder" else (seq(True, 3, 7, g), seq(True, 3, 4, g))
    with torch.inference_mode():
        torch.testing.assert_close(ours(*args), theirs(*args), atol=1e-5, rtol=1e-5)
    assert calls == [5]  # 21 rows: chunks of 5, 5, 5, 5 and 1
    with torch.no_grad():
        torch.testing.assert_close(ours(*args), theirs(*args), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2
    ours(*args).sum().backward()  # parameters need gradients: the whole FFN, under autograd
    ours.train()
    with torch.no_grad():
        ours(*args)
    assert len(calls) == 2 and ours.linear1.weight.grad is not None

@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_add_norm_short_way(monkeypatch, kind, norm_first, dtype):
    """Without autograd the layers' add + LayerNorm calls go straight to the kernel (add_norm_rows_nograd): the
    output is bit-equal to add_layer_norm's general path; with autograd or under autocast they take the general
    path."""
    import fastattn.nn.transformer as tr
    _, ours = layer_twins(kind, batch_first=True, norm_first=norm_first)
    ours = ours.to(dtype).eval()
    g = torch.Generator().manual_seed(9)
    args = tuple(a.to(dtype) for a in ((seq(True, 2, 5, g),) if kind == "encoder" else
                                       (seq(True, 2, 5, g), seq(True, 2, 4, g))))
    calls = []
    real = tr.add_norm_rows_nograd
    monkeypatch.setattr(tr, "add_norm_rows_nograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        short = ours(*args)
        n = len(calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(*args)
    assert n == {("encoder", False): 2, ("encoder", True): 2, ("decoder", False): 3, ("decoder", True): 3}[
        (kind, norm_first)] and len(calls) == n
    ours(*args)  # autograd: the parameters need gradients
    assert len(calls) == n
    monkeypatch.setattr(tr, "plain_rows", lambda *a: False)
    with torch.no_grad():
        assert torch.equal(short, ours(*args))
    assert len(calls) == n


def test_plain_rows_refuses_what_add_layer_norm_must_check():
    """The short way's guard: rows, residual and parameters of one dtype and device, contiguous 2-D rows, a valid
    float eps, no autograd; anything else goes to add_layer_norm (which converts, checks or raises)."""
    from fastattn.ops.add_norm import plain_rows
    x, r, w, b = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with torch.no_grad():
        assert plain_rows(x, r, w, b, 1e-5) and plain_rows(x, None, None, None, 1e-5)
        assert not plain_rows(x, r.double(), w, b, 1e-5)  # a float64 residual beside float32 rows
        assert not plain_rows(x, r, w.double(), b, 1e-5)
        assert not plain_rows(x, r[:, :4], w, b, 1e-5)
        assert not plain_rows(x.t().contiguous().t(), r, w, b, 1e-5)  # not contiguous
        assert not plain_rows(x.view(2, 2, 8), r.view(2, 2, 8), w, b, 1e-5)  # not 2-D rows
        assert not plain_rows(x[:, :0], r[:, :0], None, None, 1e-5)  # no columns: add_layer_norm's error
        assert not plain_rows(x, r, w, b, -1.0) and not plain_rows(x, r, w, b, 1)
        assert not plain_rows(x, r, w.as_subclass(TorchFunctionSubclass), b, 1e-5)
    assert not plain_rows(x, r, w, b, 1e-5)  # autograd enabled


# ---- stacks and the whole Transformer ---------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_matches_torch(norm_first, mode):
    g = torch.Generator().manual_seed(7)
    theirs, ours = twins("Transformer", D, NHEAD, 2, 2, FF, 0.0, batch_first=True, norm_first=norm_first)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    B, S, T = 2, 7, 5
    src, tgt = seq(True, B, S, g), seq(True, B, T, g)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 5:] = True
    kw = dict(tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T), src_key_padding_mask=kpm,
              memory_key_padding_mask=kpm, src_mask=torch.randn(S, S, generator=g) * 0.1, tgt_is_causal=True)
    compare(ours, theirs, (src, tgt), kw)


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("left_aligned", [True, False])
@pytest.mark.parametrize("kpm_dtype", [torch.bool, torch.float32])
def test_encoder_inference_nested_tensor_path(left_aligned, kpm_dtype, hooked, monkeypatch):
    """torch's TransformerEncoder in inference with a left-aligned src_key_padding_mask (and no mask) runs on a
    NestedTensor and returns zeros at padded positions (then the final norm); ours returns the same, computing the
    real tokens only (packed sequences through attention_varlen; a hooked layer: the padded keys masked instead)."""
    g = torch.Generator().manual_seed(8)
    layer_t, layer_o = layer_twins("encoder", batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer_t, 2, norm=torch.nn.LayerNorm(D))
    ours = fnn.TransformerEncoder(layer_o, 2, norm=fnn.LayerNorm(D))
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    if hooked:
        ours.layers[1].register_forward_hook(lambda m, args, out: None)
    packed = []
    real_varlen = fnn.packed.attention_varlen
    monkeypatch.setattr(fnn.packed, "attention_varlen", lambda *a, **kw: packed.append(a[3].tolist()) or
                        real_varlen(*a, **kw))
    B, L = 3, 6
    x = seq(True, B, L, g)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 1:] = True
    if not left_aligned:
        kpm[1, 2] = True
    if kpm_dtype != torch.bool:
        kpm = torch.zeros(B, L).masked_fill(kpm, float("-inf"))
    with torch.inference_mode():
        a, b = theirs(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert packed == ([[0, 4, 10, 11]] * 2 if left_aligned and not hooked else [])  # rows of 4, 6 and 1 tokens
    with torch.no_grad():  # and out of inference mode (train mode has no nested path)
        theirs.train()
        ours.train()
        torch.testing.assert_close(ours(x, src_key_padding_mask=kpm), theirs(x, src_key_padding_mask=kpm),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_decoder_detects_causal_tgt_mask(monkeypatch, mask_kind):
    """tgt_is_causal=None: a tgt_mask equal to the square causal mask runs the causal kernel (torch's detection),
    with the same result as the mask."""
    import fastattn.nn.activation as act
    causal_calls = []

    def spy(real):  # self-attention comes through attention_packed, cross-attention through attention
        def call(*args, **kw):
            causal_calls.append(kw.get("causal"))
            return real(*args, **kw)
        return call

    monkeypatch.setattr(act, "attention", spy(act.attention))
    monkeypatch.setattr(act, "attention_packed", spy(act.attention_packed))
    g = torch.Generator().manual_seed(9)
    lt, lo = layer_twins("decoder")
    theirs, ours = torch.nn.TransformerDecoder(lt, 2), fnn.TransformerDecoder(lo, 2)
    ours.load_state_dict(theirs.state_dict())
    T, B = 5, 2
    tgt, mem = seq(False, B, T, g), seq(False, B, 4, g)
    m = torch.nn.Transformer.generate_square_subsequent_mask(T)
    m = m if mask_kind == "float" else m.isinf()
    torch.testing.assert_close(ours(tgt, mem, tgt_mask=m), theirs(tgt, mem, tgt_mask=m), atol=1e-5, rtol=1e-5)
    assert causal_calls[::2] == ["top_left", "top_left"] and causal_calls[1::2] == [None, None]


# ---- dropout --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_dropout_statistics_and_seed(kind, norm_first):
    """Dropout draws differ from torch's (the attention's runs inside the kernel), so: a seed reproduces ours,
    gradients flow and are reproducible, and the spread of train-mode outputs around the eval-mode output matches
    torch's."""
    g = torch.Generator().manual_seed(10)
    theirs, ours = layer_twins(kind, dropout=0.2, norm_first=norm_first, batch_first=True)
    B, L = 4, 12
    x = seq(True, B, L, g).requires_grad_()
    args = (x,) if kind == "encoder" else (x, seq(True, B, 9, g))
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        clean = theirs(*args)
        torch.testing.assert_close(ours(*args), clean, atol=1e-5, rtol=1e-5)
    theirs.train()
    ours.train()

    def draw(m, seed):
        torch.manual_seed(seed)
        y = m(*args)
        gx, = torch.autograd.grad(y.square().sum(), x)
        return y.detach(), gx

    y1, g1 = draw(ours, 1)
    y2, g2 = draw(ours, 1)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert torch.isfinite(g1).all()
    spread = {n: torch.stack([draw(m, s)[0] - clean for s in range(8)]).std().item()
              for n, m in (("ours", ours), ("torch", theirs))}
    assert 0.8 < spread["ours"] / spread["torch"] < 1.25, spread


# ---- what reaches the kernel ------------------------------------------------------------------------------
def test_key_padding_mask_never_expanded(monkeypatch):
    import fastattn.nn.activation as act
    shapes = []

    def spy(real):  # self-attention comes through attention_packed, cross-attention through attention
        def call(*args, **kw):
            m = kw.get("attn_mask")
            shapes.append(None if m is None else (tuple(m.shape), m.numel()))
            return real(*args, **kw)
        return call

    monkeypatch.setattr(act, "attention", spy(act.attention))
    monkeypatch.setattr(act, "attention_packed", spy(act.attention_packed))
    g = torch.Generator().manual_seed(11)
    _, ours = layer_twins("decoder", batch_first=True)
    B, T, S = 2, 5, 7
    kw = dict(tgt_key_padding_mask=torch.zeros(B, T, dtype=torch.bool),
              memory_key_padding_mask=torch.zeros(B, S, dtype=torch.bool))
    ours(seq(True, B, T, g), seq(True, B, S, g), **kw)
    assert shapes == [((B, 1, 1, T), B * T), ((B, 1, 1, S), B * S)]


# ---- bad input --------------------------------------------------------------------------------------------
def _bad():
    x = torch.randn(2, 5, D)
    return {
        "src_mask-dtype": ("encoder", (x,), dict(src_mask=torch.zeros(5, 5, dtype=torch.int64))),
        "kpm-dtype": ("encoder", (x,), dict(src_key_padding_mask=torch.zeros(2, 5, dtype=torch.int32))),
        "src_mask-shape": ("encoder", (x,), dict(src_mask=torch.zeros(4, 5, dtype=torch.bool))),
        "d_model": ("encoder", (torch.randn(2, 5, D + 2),), {}),
        "memory-d_model": ("decoder", (x, torch.randn(2, 3, D + 1)), {}),
        "memory_mask-shape": ("decoder", (x, torch.randn(2, 3, D)), dict(memory_mask=torch.zeros(5, 4))),
        "nested-in-training": ("encoder", (torch.nested.nested_tensor([torch.randn(5, D), torch.randn(3, D)]),), {}),
    }


@pytest.mark.parametrize("mode", ["grad", "inference"])
@pytest.mark.parametrize("case", list(_bad()))
def test_bad_input_raises_torchs_exception_type(case, mode):
    """Caught by the except clause that catches torch's, in training and under torch's inference fast path."""
    kind, args, kw = _bad()[case]
    theirs, ours = layer_twins(kind, batch_first=True)
    ctx = torch.inference_mode if mode == "inference" and case != "nested-in-training" else contextlib.nullcontext
    for m in (theirs, ours):
        m.train(mode == "grad" or case == "nested-in-training")
    with pytest.raises(Exception) as t, ctx():
        theirs(*args, **kw)
    with pytest.raises(Exception) as o, ctx():
        ours(*args, **kw)
    assert isinstance(o.value, type(t.value)), f"torch raised {t.value!r}, we raised {o.value!r}"


def test_transformer_bad_input():
    theirs, ours = twins("Transformer", D, NHEAD, 1, 1, FF, batch_first=True)
    for args in [(torch.randn(2, 5, D), torch.randn(3, 4, D)), (torch.randn(2, 5, D), torch.randn(2, 4, D + 1))]:
        for m in (theirs, ours):
            with pytest.raises(RuntimeError):
                m(*args)
    with pytest.raises(RuntimeError, match="relu/gelu"):
        fnn.TransformerEncoderLayer(D, NHEAD, activation="swish")


@pytest.mark.parametrize("norm_first", [False, True])
def test_hooks_and_swapped_submodules_still_run(norm_first):
    """A submodule someone intercepts (forward hooks, a torch MultiheadAttention or a custom dropout swapped in)
    runs through its own forward, in torch's order, and the layer still matches torch's."""
    g = torch.Generator().manual_seed(12)
    theirs, ours = layer_twins("decoder", norm_first=norm_first)
    torch_attn = torch.nn.MultiheadAttention(D, NHEAD)
    torch_attn.load_state_dict(ours.multihead_attn.state_dict())
    ours.multihead_attn = torch_attn
    fired, shapes = [], {}
    for name in ("self_attn", "linear1", "linear2", "norm1", "norm3", "dropout", "activation"):
        if name == "activation":
            ours.activation = torch.nn.ReLU()
        getattr(ours, name).register_forward_hook(lambda m, i, o, name=name: fired.append(name))
    for m in (theirs, ours):  # the shapes a part's hook sees: torch's (L, B, E), not fastattn's (T, E) rows
        for name in ("norm1", "linear1", "dropout2"):
            getattr(m, name).register_forward_hook(
                lambda mod, i, o, name=name, m=m: shapes.setdefault(id(m), {}).update({name: tuple(o.shape)}))
    x, mem = seq(False, 2, 5, g), seq(False, 2, 4, g)
    compare(ours, theirs, (x, mem), {})
    assert set(fired) == {"self_attn", "linear1", "linear2", "norm1", "norm3", "dropout", "activation"}
    assert shapes[id(ours)] == shapes[id(theirs)] == {"norm1": (5, 2, D), "linear1": (5, 2, FF),
                                                      "dropout2": (5, 2, D)}


def test_in_place_activation_keeps_autograd_and_inputs():
    """ReLU / dropout run in place on fresh activations only: the input is untouched and double use works."""
    _, ours = layer_twins("encoder", dropout=0.1)
    ours.train()
    x = torch.randn(5, 2, D, requires_grad=True)
    before = x.detach().clone()
    y = ours(x)
    y.sum().backward()
    assert torch.equal(x.detach(), before) and torch.isfinite(x.grad).all()
    with torch.inference_mode():
        ours.eval()
        xi = before.clone()
        ours(xi)
        assert torch.equal(xi, before)
    z = ours(x) * 2
    z.mul_(3)  # the output is the caller's to modify
    F.relu(z).sum().backward()


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
def test_cpu_autocast_output_dtype_and_values_as_torch(kind, norm_first, mode):
    """Under autocast a sublayer's bfloat16 output meets the float32 residual stream: torch adds them in float32
    (its output float32), except on its fused inference path (encoder, no grad: bfloat16). Ours returned bfloat16
    everywhere. Values bounded by torch's autocast error against float64."""
    g = torch.Generator().manual_seed(21)
    theirs, ours = layer_twins(kind, norm_first=norm_first, batch_first=True)
    for m in (theirs, ours):
        m.train(mode == "train")
    args = (seq(True, 2, 5, g),) + ((seq(True, 2, 4, g),) if kind == "decoder" else ())
    ctx = torch.inference_mode if mode == "inference" else torch.enable_grad
    with ctx(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(*args), theirs(*args)
    with torch.no_grad():
        ref = copy.deepcopy(theirs).double()(*(a.double() for a in args))
    assert got.dtype == want.dtype == (torch.bfloat16 if mode == "inference" and kind == "encoder" else torch.float32)
    assert_bounded(f"{kind} autocast", got, ref, want, torch.bfloat16)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
                                  "TransformerDecoder", "Transformer"])
def test_trace_records_fastattn_ops_and_script_refuses(name):
    """torch.jit.trace keeps the kernels' custom ops (a direct kernel call is invisible to it: a traced layer returned
    uninitialized memory), so the trace computes our outputs on new input; scripting raises a clear error."""
    layer = dict(d_model=D, nhead=NHEAD, dim_feedforward=FF, dropout=0.0, batch_first=True)
    if name == "Transformer":
        m = fnn.Transformer(num_encoder_layers=1, num_decoder_layers=1, **layer)
    elif name.endswith("Layer"):
        m = getattr(fnn, name)(**layer)
    else:
        m = getattr(fnn, name)(getattr(fnn, name + "Layer")(**layer), 2)
    m.eval()
    g = torch.Generator().manual_seed(22)
    args = (seq(True, 2, 5, g),) + ((seq(True, 2, 4, g),) if "Decoder" in name or name == "Transformer" else ())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, args, check_trace=False)
        new = tuple(a * 2 + 1 for a in args)
        torch.testing.assert_close(traced(*new), m(*new), atol=1e-5, rtol=1e-5)
    assert any(n.kind() == "fastattn::add_norm_fwd" for n in traced.inlined_graph.nodes())
    with pytest.raises(RuntimeError, match=f"fastattn.nn.{name} cannot be scripted"):
        torch.jit.script(m)


# ---- NestedTensor inputs (torch's inference fast path takes them) ----------------------------------------------
def _nested(g, lens=(3, 5, 1)):
    return torch.nested.nested_tensor([torch.randn(n, D, generator=g) for n in lens])


def _equal_nested(a, b):
    assert a.is_nested and b.is_nested
    for u, v in zip(a.unbind(), b.unbind(), strict=True):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)


def test_mha_nested_tensor_input():
    """torch's MultiheadAttention takes a (strided) NestedTensor on its inference fast path (self-attention,
    batch_first, no mask, need_weights=False) and returns one; ours runs each sequence on attention_varlen and
    returns the same. Where torch's fast path would not take it, both raise AssertionError."""
    g = torch.Generator().manual_seed(12)
    theirs, ours = twins("MultiheadAttention", D, NHEAD, batch_first=True)
    theirs.eval()
    ours.eval()
    x, y = _nested(g), _nested(g)
    with torch.inference_mode():
        _equal_nested(theirs(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0])
        for average in (True, False):  # weights as torch pads them: (N, [H,] L, L), zeros outside each sequence
            (a, wa), (b, wb) = (m(x, x, x, average_attn_weights=average) for m in (theirs, ours))
            _equal_nested(a, b)
            torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-5)
        for m in (theirs, ours):  # cross-attention: not on torch's fast path
            with pytest.raises(AssertionError, match="NestedTensor"):
                m(x, y, y, need_weights=False)
    ours.train()
    with torch.no_grad(), pytest.raises(AssertionError, match="training is enabled"):
        ours(x, x, x, need_weights=False)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_and_encoder_nested_tensor_input(norm_first):
    g = torch.Generator().manual_seed(13)
    theirs, ours = layer_twins("encoder", batch_first=True, norm_first=norm_first)
    enc_t = torch.nn.TransformerEncoder(theirs, 2, norm=torch.nn.LayerNorm(D), enable_nested_tensor=False)
    enc_o = fnn.TransformerEncoder(ours, 2, norm=fnn.LayerNorm(D), enable_nested_tensor=False)
    enc_o.load_state_dict(enc_t.state_dict())
    for m in (theirs, ours, enc_t, enc_o):
        m.eval()
    x = _nested(g)
    with torch.inference_mode():
        _equal_nested(theirs(x), ours(x))
        _equal_nested(enc_t(x), enc_o(x))
    ours.train()
    with torch.no_grad(), pytest.raises(AssertionError, match="training is enabled"):
        ours(x)


def test_layer_norm_inside_torchs_nested_path():
    """fastattn.nn.LayerNorm in a torch encoder layer (what convert leaves when a part of the layer is hooked): torch's
    encoder hands its layers a strided NestedTensor in inference with a padding mask, and the norm takes it as
    torch's does (before: "NestedTensorImpl doesn't support sizes"). add_layer_norm refuses one by name."""
    g = torch.Generator().manual_seed(14)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(D, NHEAD, FF, 0.0, batch_first=True), 2).eval()
    ours = copy.deepcopy(enc)
    calls = []
    for layer in ours.layers:
        layer.norm1, layer.norm2 = (fnn.LayerNorm(D) for _ in range(2))
        layer.norm1.register_forward_pre_hook(lambda m, args: calls.append(args[0].is_nested))
        layer.linear1.register_forward_hook(lambda m, args, out: None)  # (the layers' own fast path would skip norms)
    ours.load_state_dict(enc.state_dict())
    x, kpm = torch.randn(2, 5, D, generator=g), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm),
                                   atol=1e-5, rtol=1e-5)
    assert calls == [True, True]  # each layer's norm1 took the encoder's NestedTensor
    nt = _nested(g)
    _equal_nested(torch.nn.LayerNorm(D)(nt), fnn.LayerNorm(D)(nt))
    with pytest.raises(TypeError, match="x: a NestedTensor of torch.strided layout"):
        fastattn.add_layer_norm(nt, None, torch.ones(D), torch.zeros(D))


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_padding_mask_of_a_wrong_shape(batch_first):
    """A src_key_padding_mask that is not (batch, sequence): torch's RuntimeError on its nested inference path (and
    the layers' AssertionError elsewhere), naming the argument (before: an IndexError from a boolean index)."""
    layer = fnn.TransformerEncoderLayer(D, NHEAD, FF, 0.0, batch_first=batch_first)
    enc = fnn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 6, D) if batch_first else torch.randn(6, 3, D)
    for shape in ((3, 5), (3, 7), (1, 6), (2, 6)):
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"key_padding_mask has shape .*, expected \(3, 6\)"):
            enc(x, src_key_padding_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["Encoder", "Decoder"])
def test_autocast_training_step(kind):
    """A training step under CPU autocast (bfloat16): the projections' backward met a bfloat16 gradient and a float32
    weight in one matmul and raised. Outputs and gradients against the float32 step, bounded by torch's own bfloat16
    error there (4 times it, plus 2% of the tensor's scale). Default init and GELU: with randomized weights and ReLU
    the bfloat16 step is ill-conditioned (a flipped ReLU), for torch's run as for ours."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, f"Transformer{kind}Layer")(D, NHEAD, FF, 0.0, "gelu", batch_first=True)
    ours = getattr(fnn, f"Transformer{kind}Layer")(D, NHEAD, FF, 0.0, "gelu", batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x, mem, g = torch.randn(2, 5, D), torch.randn(2, 4, D), torch.randn(2, 5, D)
    args = (x,) if kind == "Encoder" else (x, mem)
    res = []
    for m, on in ((theirs, False), (theirs, True), (ours, True)):
        leaves = [a.clone().requires_grad_() for a in args]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            out = m(*leaves)
        (out.float() * g).sum().backward()
        res.append([out.float()] + [t.grad for t in leaves] + [p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    for ref, t, o in zip(*res):
        assert (o - ref).abs().max() <= 4 * (t - ref).abs().max() + 0.02 * ref.abs().max()


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_forward_replaced_on_a_part_runs_as_in_torch(kind, norm_first):
    """A part whose forward is replaced on the instance (accelerate's add_hook_to_module, cpu_offload, adapters) is
    called, as torch's layer calls it: the layer used to read its weights and fuse past it."""
    g = torch.Generator().manual_seed(5)
    args = (seq(True, 2, 5, g),) if kind == "encoder" else (seq(True, 2, 5, g), seq(True, 2, 4, g))
    for part in ("linear1", "linear2", "norm1", "norm2", "self_attn", "dropout"):
        outs = []
        for m in layer_twins(kind, norm_first=norm_first, batch_first=True):
            sub, forward = getattr(m, part), getattr(m, part).forward

            def scaled(*a, forward=forward, **kw):
                out = forward(*a, **kw)
                return (out[0] * 3, *out[1:]) if isinstance(out, tuple) else out * 3
            sub.forward = scaled
            m.train()
            outs.append(m(*args))
        torch.testing.assert_close(outs[1], outs[0], msg=part)


def test_submodule_hooks_fire_as_in_torch():
    """A backward hook on a layer's part (gradient monitoring, Grad-CAM) fires as in torch: the layer calls a hooked
    part instead of fusing past it (only forward hooks were checked). Global module hooks too."""
    fired = {}
    for name, m in zip(("torch", "ours"), layer_twins("encoder", batch_first=True)):
        fired[name] = []
        for part in ("linear1", "linear2", "norm1", "norm2", "self_attn"):
            getattr(m, part).register_full_backward_hook(lambda mod, gi, go, part=part, n=name: fired[n].append(part))
        m.train()
        m(torch.randn(2, 5, D, requires_grad=True)).sum().backward()
    assert sorted(fired["ours"]) == sorted(fired["torch"]) == ["linear1", "linear2", "norm1", "norm2", "self_attn"]
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__))
    try:
        theirs, ours = layer_twins("encoder", batch_first=True)
        theirs(torch.randn(2, 5, D))
        n = len(calls)
        ours(torch.randn(2, 5, D))
    finally:
        handle.remove()
    assert sorted(calls[n:]) == sorted(calls[:n])
