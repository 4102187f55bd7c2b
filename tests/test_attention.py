"""Attention on every backend against the float64 reference (outputs and dQ/dK/dV), bounded by torch's own error
in the same dtype; conformance with F.scaled_dot_product_attention; dropout; bad input."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops import attention as A
from fastattn.ops.dropout import dropout_rng
from fastattn.reference import attention_ref
from conftest import HAS_GPU, assert_bounded, backend_device, backend_params, skip_if_not_built

LOW = [torch.float16, torch.bfloat16]


def rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def check(backend_name, B=2, H=4, Hk=None, L=33, S=47, E=32, Ev=None, dtype=torch.float16, mask=None,
          causal=None, window=(-1, -1), alibi=False, softcap=0.0, scale=None, seed=0, key_padding=False):
    """Run fastattn.attention on backend_name and compare out, dq, dk, dv with the float64 reference."""
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    Hk, Ev = Hk or H, Ev or E
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand((B, H, L, E), dtype, dev, g), rand((B, Hk, S, E), dtype, dev, g), rand((B, Hk, S, Ev), dtype, dev, g)
    dout = rand((B, H, L, Ev), dtype, dev, g)
    attn_mask = None
    if mask == "bool":
        attn_mask = (torch.rand((B, H, L, S), generator=g) > 0.3).to(dev)
    elif mask == "bool-broadcast":
        attn_mask = (torch.rand((L, S), generator=g) > 0.3).to(dev)
    elif mask == "float":
        attn_mask = rand((1, H, L, S), dtype, dev, g)
    elif mask == "float-inf":
        attn_mask = rand((B, 1, L, S), dtype, dev, g).masked_fill(torch.rand((B, 1, L, S), generator=g).to(dev) > 0.7,
                                                                   float("-inf"))
    kpm = (torch.rand((B, S), generator=g) < 0.2).to(dev) if key_padding else None  # torch's meaning: True = pad
    slopes = torch.rand(H, generator=g).to(dev) if alibi else None
    kw = dict(causal=causal, window=window, alibi_slopes=slopes, softcap=softcap, scale=scale)

    def grads(q, k, v, fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out] + [t.grad for t in leaves]

    full_mask = attn_mask
    if kpm is not None:  # the reference takes one mask: fold the key padding into it
        pad = ~kpm[:, None, None, :]  # True = take part
        full_mask = pad if attn_mask is None else (attn_mask & pad if attn_mask.dtype == torch.bool else
                                                   attn_mask.masked_fill(~pad, float("-inf")))

    def ours(q, k, v):
        with fastattn.backend(backend_name):
            return fastattn.attention(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, **kw)

    try:
        got = grads(q, k, v, ours)
    except fastattn.BackendNotSupported as e:
        if backend_name != "cuda":  # every other backend runs every input; test_cuda_declared_support pins cuda's
            raise
        pytest.skip(f"the CUDA C++ kernel declares this input unsupported: {e}")
    base = grads(q, k, v, lambda *t: attention_ref(*t, full_mask, upcast=False, **kw))
    up = None if full_mask is None else (full_mask if full_mask.dtype == torch.bool else full_mask.double())
    exact = grads(q.double(), k.double(), v.double(), lambda *t: attention_ref(*t, up, **kw))
    # one rounding step at the problem's scale: a gradient that is exactly 0 (one key: dk = 0) is computed as a
    # difference of terms of that size
    scale = max([1.0] + [e.abs().max().item() for e in exact if e.numel()])
    for name, a, t, e in zip(["out", "dq", "dk", "dv"], got, base, exact):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_bounded(name, a, e, t, dtype, scale)


BK = pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
DT = pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)


@BK
@pytest.mark.parametrize("E", [16, 32, 64, 80, 96, 128, 256])
def test_head_dims(backend_name, E):
    check(backend_name, B=1, H=2, L=40, S=70, E=E, dtype=torch.float16)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"], indirect=True)
def test_output_follows_the_query_layout(backend_name):
    """q as the (B, H, L, E) view of a (B, L, H, E) projection: out comes laid out (B, L, H, Ev) in memory, so the
    way back to (B, L, H * Ev) is a view, not a copy; the values are those of contiguous inputs."""
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    B, L, H, E = 2, 9, 3, 16
    x = rand((B, L, 3 * H * E), torch.float32, dev, torch.Generator().manual_seed(0))
    q, k, v = (t.view(B, L, H, E).transpose(1, 2) for t in x.split(H * E, -1))
    with fastattn.backend(backend_name), torch.no_grad():
        out = fastattn.attention(q, k, v)
        want = fastattn.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_strided_rows_equal_contiguous(backend_name, causal):
    """Heads of packed (B, L, H * E) / (B, S, 2 * H * E) float32 projections, and an upstream gradient laid out
    (B, L, H, E): rows far apart. The CPU kernels copy them into packed rows before use (read in place, they share a
    few L1 sets), the Triton ones read them through their strides (no contiguous copies). Output and gradients equal
    those of contiguous copies bit for bit: the same products in the same order. Several query and key blocks."""
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    B, L, S, H, E = 2, 150, 140, 3, 32
    g = torch.Generator().manual_seed(0)
    qx = rand((B, L, H * E), torch.float32, dev, g).requires_grad_()
    kvx = rand((B, S, 2 * H * E), torch.float32, dev, g).requires_grad_()
    dout = rand((B, L, H, E), torch.float32, dev, g).transpose(1, 2)

    def heads(x, n):
        return x.view(B, n, H, E).transpose(1, 2)

    with fastattn.backend(backend_name):
        k, v = (heads(t, S) for t in kvx.split(H * E, -1))
        assert k.stride(2) == 2 * H * E and dout.stride(2) == H * E
        out = fastattn.attention(heads(qx, L), k, v, causal=causal)
        out.backward(dout)
        leaves = [heads(t, n).detach().contiguous().requires_grad_() for t, n in
                  ((qx, L), *((t, S) for t in kvx.split(H * E, -1)))]
        want = fastattn.attention(*leaves, causal=causal)
        want.backward(dout.contiguous())
    got = [out, heads(qx.grad, L)] + [heads(t, S) for t in kvx.grad.split(H * E, -1)]
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, [want] + [t.grad for t in leaves]):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())


@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"], indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_packed_one_gradient(backend_name, dropout_p):
    """attention_packed on the heads of a (B, L, 3 * H * E) projection: out and the projection's gradient equal those
    of attention on the same views (autograd stacking three gradients) bit for bit, with the backward writing into
    one tensor (PackedQKVAttention; the reference backend's results copied in); without a gradient and under
    torch.func it is plain attention; an unknown keyword is a TypeError."""
    from fastattn.ops.attention.api import attention_packed
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    B, L, H, E = 2, 70, 3, 16
    g = torch.Generator().manual_seed(0)
    x = rand((B, L, 3 * H * E), torch.float32, dev, g)
    dout = rand((B, H, L, E), torch.float32, dev, g)

    def split(t):
        return tuple(h.transpose(1, 2) for h in t.view(B, L, 3, H, E).unbind(2))

    def run(packed):
        proj = x.clone().requires_grad_()
        torch.manual_seed(5)  # the dropout mask's seed
        with fastattn.backend(backend_name):
            out = attention_packed(proj, split, causal="top_left", dropout_p=dropout_p) if packed else \
                fastattn.attention(*split(proj), causal="top_left", dropout_p=dropout_p)
        name = type(out.grad_fn).__name__
        out.backward(dout)
        return out, proj.grad, name

    (out, grad, name), (want, want_grad, _) = run(True), run(False)
    assert name == "PackedQKVAttentionBackward", name
    assert torch.equal(out, want) and torch.equal(grad, want_grad)
    with torch.no_grad(), fastattn.backend(backend_name):
        torch.testing.assert_close(attention_packed(x, split, causal="top_left"),
                                   fastattn.attention(*split(x), causal="top_left"))
    with fastattn.backend(backend_name):  # torch.func: the views' own path
        got = torch.func.grad(lambda t: (attention_packed(t, split, causal="top_left") * dout).sum())(x)
        proj = x.clone().requires_grad_()
        (fastattn.attention(*split(proj), causal="top_left") * dout).sum().backward()
    torch.testing.assert_close(got, proj.grad)
    with pytest.raises(TypeError, match="is_causal"):
        attention_packed(x, split, is_causal=True)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"], indirect=True)
def test_attention_qkvpacked(backend_name):
    """fastattn.attention_qkvpacked on flash-attn's (B, L, 3, H, E) layout: out (B, L, H, E) and lse equal attention's
    on the three views, qkv's gradient equals the views' path bit for bit (one tensor: the packed path), a key
    padding mask keeps torch's meaning; a wrong shape or type is refused naming qkv."""
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    B, L, H, E = 2, 40, 3, 16
    g = torch.Generator().manual_seed(3)
    qkv = rand((B, L, 3, H, E), torch.float32, dev, g)
    dout = rand((B, L, H, E), torch.float32, dev, g)
    pad = torch.zeros(B, L, dtype=torch.bool, device=dev)
    pad[1, 30:] = True
    kw = dict(causal="top_left", key_padding_mask=pad)
    with fastattn.backend(backend_name):
        packed = qkv.clone().requires_grad_()
        out, lse = fastattn.attention_qkvpacked(packed, return_lse=True, **kw)
        assert type(out.grad_fn.next_functions[0][0]).__name__ == "PackedQKVAttentionBackward"
        assert out.shape == (B, L, H, E)
        out.backward(dout)
        views = qkv.clone().requires_grad_()
        want, want_lse = fastattn.attention(*(t.transpose(1, 2) for t in views.unbind(2)), return_lse=True, **kw)
        want.transpose(1, 2).backward(dout)
    assert torch.equal(out, want.transpose(1, 2)) and torch.equal(lse, want_lse)
    assert torch.equal(packed.grad, views.grad)
    with pytest.raises(fastattn.ArgumentError, match="qkv"):
        fastattn.attention_qkvpacked(qkv[:, :, :2])
    with pytest.raises(TypeError, match="qkv"):
        fastattn.attention_qkvpacked(None)


@BK
@DT
@pytest.mark.parametrize("L, S", [(1, 1), (17, 17), (97, 129), (129, 97), (1, 97), (97, 1)])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_seqlens_and_causal(backend_name, dtype, L, S, causal):
    check(backend_name, B=1, H=2, L=L, S=S, E=32, dtype=dtype, causal=causal)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("causal", [None, "top_left"])
def test_long_sequence(backend_name, causal):
    check(backend_name, B=1, H=2, L=1025, S=1025, E=32, dtype=torch.float32, causal=causal)


@BK
@pytest.mark.parametrize("mask", ["bool", "bool-broadcast", "float", "float-inf"])
@pytest.mark.parametrize("causal", [None, "top_left"])
def test_masks(backend_name, mask, causal):
    check(backend_name, L=45, S=67, mask=mask, causal=causal)


@BK
def test_key_padding_mask(backend_name):
    check(backend_name, key_padding=True, mask="bool-broadcast")


@BK
@pytest.mark.parametrize("causal", [None, "top_left"])
@pytest.mark.parametrize("S", [5, 150])
def test_nan_input_gives_nan_output(backend_name, causal, S):
    """A NaN in a query row makes every score of the row NaN: its output, lse and dq row are NaN (as torch's), not
    the 0 of a row with no key (the CPU kernel took an all-NaN row for one); the other rows, and heads, are as
    without the NaN."""
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(0)
    dt = torch.float16 if backend_name == "cuda" else torch.float32  # (the CUDA C++ kernel's dtypes)
    q, k, v, dout = (rand((1, 2, S, 32), dt, dev, g) for _ in range(4))
    qn = q.clone()
    qn[0, 0, 2, 7] = float("nan")
    res = []
    for qq in (q, qn):
        t = [x.clone().requires_grad_() for x in (qq, k, v)]
        with fastattn.backend(backend_name):
            out, lse = fastattn.attention(*t, causal=causal, return_lse=True)
        out.backward(dout)
        res.append((out.detach(), lse, t[0].grad, t[1].grad, t[2].grad))
    (out, lse, dq, dk, dv), (out_n, lse_n, dq_n, dk_n, dv_n) = res
    row = torch.zeros(1, 2, S, dtype=torch.bool, device=dev)
    row[0, 0, 2] = True
    assert out_n[row].isnan().all() and lse_n[row].isnan().all() and dq_n[row].isnan().all()
    torch.testing.assert_close(out_n[~row], out[~row])
    torch.testing.assert_close(lse_n[~row], lse[~row])
    torch.testing.assert_close(dq_n[~row], dq[~row])
    assert dk_n[0, 0, :3].isnan().all() and dv_n[0, 0, :3].isnan().all()  # the keys the row sees
    torch.testing.assert_close(dk_n[0, 1], dk[0, 1])
    torch.testing.assert_close(dv_n[0, 1], dv[0, 1])


@BK
@pytest.mark.parametrize("H, Hk", [(8, 2), (8, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_gqa(backend_name, H, Hk, causal):
    check(backend_name, B=1, H=H, Hk=Hk, L=29, S=61, causal=causal)


@BK
def test_value_head_dim_differs(backend_name):
    check(backend_name, E=32, Ev=48, L=21, S=37)


@BK
@pytest.mark.parametrize("kw", [dict(scale=0.3), dict(alibi=True), dict(alibi=True, causal="bottom_right"),
                                dict(window=(8, 0)), dict(window=(5, 9)), dict(window=(-1, 4)),
                                dict(window=(6, 0), causal="top_left"), dict(softcap=5.0),
                                dict(softcap=3.0, alibi=True, mask="float", window=(20, 20))],
                         ids=["scale", "alibi", "alibi-causal", "window-8-0", "window-5-9", "window-inf-4",
                              "window-causal", "softcap", "everything"])
def test_extended_features(backend_name, kw):
    check(backend_name, B=1, H=2, L=50, S=66, **kw)


@pytest.mark.parametrize("backend_name", ["triton"], indirect=True)
def test_triton_forward_rows_past_2_31_elements(backend_name):
    """Heads that start past 2^31 elements of q's storage (a 300k-token (B, H, L, D) input, a packed projection): the
    forward computes its offsets in int64, as the backward does (int32 products read 4 GiB before q: a crash in the
    interpreter). Here 3 heads 2^30 + 64 elements apart in a 4.3 GB allocation that is never touched but for them;
    then keys past 2^31 elements (a window reads only the cache's tail) and mask rows 2^28 apart."""
    dev = backend_device(backend_name)
    hs = 2**30 + 64
    q = torch.empty(2 * hs + 8 * 16, dtype=torch.float16, device=dev).as_strided((1, 3, 8, 16), (0, hs, 16, 1))
    g = torch.Generator().manual_seed(0)
    vals, k, v = (torch.randn(1, 3, 8, 16, generator=g).half().to(dev) for _ in range(3))
    q.copy_(vals)
    with torch.no_grad(), fastattn.backend(backend_name):
        out = fastattn.attention(q, k, v)
    torch.testing.assert_close(out.double(), attention_ref(vals.double(), k.double(), v.double()), atol=2e-3, rtol=0)
    S = 2**25 + 40  # x E 64: the last keys start past 2^31 elements
    k, v = (torch.empty(1, 1, S, 64, dtype=torch.float16, device=dev) for _ in range(2))
    q = torch.randn(1, 1, 8, 64, generator=g).half().to(dev)
    tail_k, tail_v = (torch.randn(1, 1, 16, 64, generator=g).half().to(dev) for _ in range(2))
    k[:, :, -16:], v[:, :, -16:] = tail_k, tail_v
    win = dict(causal="bottom_right", window=(7, 0))  # 8 queries against the last 15 keys
    with torch.no_grad(), fastattn.backend(backend_name):
        out = fastattn.attention(q, k, v, **win)
    torch.testing.assert_close(out.double(), attention_ref(q.double(), tail_k.double(), tail_v.double(), **win),
                               atol=2e-3, rtol=0)
    rows = 2**28
    keep = torch.rand(1, 1, 9, 9, generator=g) > 0.3
    keep[..., 0] = True
    mask = torch.empty(8 * rows + 9, dtype=torch.bool, device=dev).as_strided((1, 1, 9, 9), (0, 0, rows, 1))
    mask.copy_(keep)
    q = torch.randn(1, 1, 9, 16, generator=g).half().to(dev)
    with torch.no_grad(), fastattn.backend(backend_name):
        out = fastattn.attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(out.double(), attention_ref(*(q.double(),) * 3, keep.to(dev)), atol=2e-3, rtol=0)


@BK
@pytest.mark.parametrize("softcap", [50.0, 200.0])
def test_large_softcap_float32(backend_name, softcap):
    """Gemma-2's softcap (50) and past it, float32: within torch's own error, forward and backward (Triton's tanh,
    2 / (1 + exp(-2x)) - 1, was ~1e-7 off everywhere: x 200, 20 times torch's error)."""
    check(backend_name, B=1, H=2, L=64, S=64, E=64, dtype=torch.float32, softcap=softcap)


@BK
@pytest.mark.parametrize("B, L, S, window, causal", [
    (1, 300, 1, (3, -1), "top_left"),     # a left window past the last key: queries >= 4 see no key
    (2, 260, 7, (2, -1), "bottom_right"),
    (1, 10, 300, (-1, 5), None),           # a right window before the first query: keys >= 16 have no query
    (2, 12, 290, (-1, 0), None)],
    ids=["left-past-keys", "left-past-keys-b2", "right-before-queries", "right-before-queries-b2"])
def test_windows_past_the_sequence_ends(backend_name, B, L, S, window, causal):
    """Windows that leave whole blocks of queries without keys (or keys without queries). The CPU kernels' key /
    query ranges ran past S / L there: they packed blocks past the end of their buffers (heap corruption that
    crashed a later free()), with B 1 on the split backward schedule and B 2 on the fused one."""
    for seed in range(3):
        check(backend_name, B=B, H=2, L=L, S=S, E=16, dtype=torch.float32, window=window, causal=causal, seed=seed)


def test_windows_wider_than_int64_are_unbounded():
    """A window past the kernels' int64 (2**64) is wider than any sequence: no window (it raised pybind's
    TypeError, naming no argument)."""
    q = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(fastattn.attention(q, q, q, window=(2 ** 64, 0)),
                               fastattn.attention(q, q, q, window=(-1, 0)))
    for bad in (np.array([2, 0]), (torch.tensor([1, 2]), 0), (2, -2), (True, 0)):  # (a fast path read them first)
        with pytest.raises(fastattn.ArgumentError, match="window: expected"):
            fastattn.attention(q, q, q, window=bad)


@BK
@pytest.mark.parametrize("causal", [None, "top_left"])
def test_fully_masked_rows_give_zero(backend_name, causal):
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    dtype, E = (torch.float16, 32) if backend_name == "cuda" else (torch.float32, 16)  # what each kernel takes
    q, k, v = (torch.randn(1, 2, 20, E, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 2, 20, 20, device=dev) > 0.5
    mask[:, :, 3] = False  # row 3 sees no key
    with fastattn.backend(backend_name):
        out, lse = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, return_lse=True)
        out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))
    assert (lse[:, :, 3] == float("inf")).all()  # exp(score - lse) = 0 there


@BK
def test_no_out_of_bounds_reads(backend_name):
    """q, k, v, mask are views at the start of NaN-filled buffers: reading past their ends poisons the results."""
    dev = backend_device(backend_name)

    def nan_tail(shape, dtype=torch.float16, fill=float("nan")):
        n = math.prod(shape)
        buf = torch.full((n + 8192,), fill, dtype=dtype, device=dev)
        buf[:n] = torch.randn(n, device=dev).to(dtype) if dtype != torch.bool else torch.rand(n, device=dev) > 0.3
        return buf[:n].view(shape)

    q, dout = nan_tail((1, 2, 37, 40)), nan_tail((1, 2, 37, 40))
    k, v = nan_tail((1, 2, 53, 40)), nan_tail((1, 2, 53, 40))
    mask = nan_tail((1, 2, 37, 53))
    p = A.AttnParams(scale=40 ** -0.5)
    impl = A.dispatcher.impls[backend_name]
    if impl.not_supported_reasons(A.request(q, k, v, mask, None, p)):
        pytest.skip("backend does not take this input")
    out, lse = impl.fwd(q, k, v, mask, None, p)
    grads = impl.bwd(dout, q, k, v, out, lse, mask, None, p)
    for name, t in zip(["out", "dq", "dk", "dv"], [out, *grads]):
        assert torch.isfinite(t).all(), f"{name}: NaN read from past the end of an input"


def _triton_candidates():
    """(kernel, head dim of its class, config) for every config the GPU may autotune a Triton kernel to; in the
    interpreter, where only the tile shape matters, one per tile shape other than its own 32 x 32."""
    try:
        from fastattn.kernels.attention import _CONFIGS
    except ImportError:  # no triton: the backend_name fixture skips
        return [("fwd", 64, (32, 32, 4, 1))]
    seen, out = {(w, 32, 32) for w in _CONFIGS}, []
    for which, classes in _CONFIGS.items():
        for dim, group in classes.items():
            for cfg in group:
                if not HAS_GPU and (which, *cfg[:2]) in seen:
                    continue
                seen.add((which, *cfg[:2]))
                out.append(pytest.param(which, dim, cfg, id=f"{which}-d{dim}-{'-'.join(map(str, cfg))}"))
    return out


@pytest.mark.parametrize("backend_name", ["triton"], indirect=True)
@pytest.mark.parametrize("which, E, config", _triton_candidates())
def test_every_triton_config(backend_name, monkeypatch, which, E, config):
    """Each config the autotuner may pick, forced (on GPU with its warps and stages; in the interpreter its tile
    shape), where its tiles split into masked and mask-free blocks: causal both alignments (with GQA, with empty
    rows), a window, key tails."""
    from fastattn.kernels import attention as K
    monkeypatch.setitem(K.FORCED_CONFIG, which, config)
    E = E if HAS_GPU else 16  # the head dim only matters for the GPU's registers and shared memory
    check(backend_name, B=1, H=1, L=200, S=200, E=E, causal="top_left")
    check(backend_name, B=1, H=4, Hk=2, L=70, S=200, E=E, causal="bottom_right", mask="bool")
    check(backend_name, B=1, H=1, L=270, S=140, E=E, causal="bottom_right")
    check(backend_name, B=1, H=1, L=200, S=200, E=E, window=(70, 10), alibi=True)


def test_triton_grids_keep_batch_and_heads_on_axes_of_their_own(monkeypatch):
    """CUDA caps a grid's axes 1 and 2 at 65535 programs: batch x heads on one axis could not launch from 65536 on
    (batch 4096 x 16 heads of short sequences). The forward and both backward kernels take (blocks, heads, batch)."""
    pytest.importorskip("triton")
    from fastattn.kernels import attention as K
    grids = {}

    def launch(which, grid, *args, key, **kwargs):
        grids[which] = grid({"BLOCK_M": 64, "BLOCK_N": 64})
    monkeypatch.setattr(K, "_launch", launch)
    monkeypatch.setattr(K, "_attn_bwd_preprocess", {(1, 16, 4096): lambda *a, **kw: None})  # its one launch
    q, k = torch.randn(4096, 16, 3, 8), torch.randn(4096, 4, 5, 8)
    p = A.AttnParams(scale=0.5)
    out, lse = K.attention_fwd(q, k, k, None, None, p)
    K.attention_bwd(out, q, k, k, out, lse, None, None, p)
    assert grids == {"fwd": (1, 16, 4096), "dq": (1, 16, 4096), "dkdv": (1, 4, 4096)}


def test_launch_reuses_the_autotuners_pick(monkeypatch):
    """Once the autotuner has picked a config for a key, the kernel is launched with it directly (the autotuner's own
    dispatch skipped); another key (head dims, causality, a dtype) asks the autotuner again."""
    triton = pytest.importorskip("triton")
    from fastattn.kernels import attention as K
    calls = []

    class Kernel:
        def __init__(self, name):
            self.name = name
            self.best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.name, kw.get("BLOCK_M"), kw.get("num_warps")))

    monkeypatch.setitem(K._KERNELS, "fwd", (Kernel("raw"), Kernel("tuned")))
    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.setattr(K, "PICKED", {})
    x = torch.zeros(2)
    for dims, causal, t in [((64, 64), True, x), ((64, 64), True, x), ((64, 32), True, x), ((64, 64), False, x),
                            ((64, 64), True, x.half()), ((64, 64), False, x)]:
        K._launch("fwd", None, t, 3, key=(*dims, t.dtype), CAUSAL=causal)
    assert calls == [("tuned", None, None), ("raw", 64, 8), ("tuned", None, None), ("tuned", None, None),
                     ("tuned", None, None), ("raw", 64, 8)]


@BK
@pytest.mark.parametrize("p_drop", [0.17, 0.5])
def test_dropout(backend_name, p_drop):
    """Output and gradients equal the reference given the backend's own keep mask: forward and backward draw the
    same mask; a seed reproduces it; the kept fraction is 1 - p."""
    dev = backend_device(backend_name)
    B, H, L, S, E = 2, 2, 40, 56, 32
    q, k, v, dout = (torch.randn(*s, device=dev) for s in ((B, H, L, E), (B, H, S, E), (B, H, S, E), (B, H, L, E)))
    if A.dispatcher.impls[backend_name].not_supported_reasons(A.request(q, k, v, None, None, A.AttnParams(
            scale=1.0, dropout_p=p_drop))):
        pytest.skip(f"{backend_name} declares no dropout for this input")

    def run():
        torch.manual_seed(1234)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with fastattn.backend(backend_name):
            out = fastattn.attention(*leaves, dropout_p=p_drop)
        out.backward(dout)
        return [out] + [t.grad for t in leaves]

    got, again = run(), run()
    for a, b in zip(got, again):
        assert torch.equal(a, b), "same seed, different result"
    torch.manual_seed(1234)
    seed, offset = dropout_rng()  # attention()'s draw
    p = A.AttnParams(scale=E ** -0.5, diag_offset=S - L, dropout_p=p_drop, seed=seed, offset=offset)
    keep = A.dropout_mask(backend_name, p, B, H, L, S, dev)
    assert abs(keep.float().mean().item() - (1 - p_drop)) < 0.03
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*leaves, dropout_p=p_drop, dropout_mask=keep)
    ref.backward(dout.double())
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, [ref] + [t.grad for t in leaves]):
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("kw", [dict(), dict(causal="top_left", mask="float"), dict(alibi=True, window=(3, 2)),
                                dict(softcap=2.0, causal="bottom_right")], ids=["plain", "causal-float", "alibi-window",
                                                                                 "softcap"])
def test_gradcheck_float64(backend_name, kw):
    skip_if_not_built(backend_name, "attention_fwd")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    mask = torch.randn(1, 2, 5, 7, generator=g, dtype=torch.float64) if kw.get("mask") == "float" else None
    slopes = torch.rand(2, generator=g, dtype=torch.float64) if kw.get("alibi") else None
    opts = {k_: v_ for k_, v_ in kw.items() if k_ not in ("mask", "alibi")}

    def f(q, k, v):
        with fastattn.backend(backend_name):
            return fastattn.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, **opts)

    assert torch.autograd.gradcheck(f, (q, k, v))


# ---- conformance with torch's SDPA (default backend) --------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 17, 16), (17, 16), (2, 17, 16), (2, 2, 3, 17, 16)], ids=str)
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_conformance(shape, mask, is_causal):
    g = torch.Generator().manual_seed(3)
    dev = "cuda" if HAS_GPU else "cpu"
    q = torch.randn(shape, generator=g).to(dev)
    k = torch.randn(*shape[:-2], 23, shape[-1], generator=g).to(dev)
    v = torch.randn(*shape[:-2], 23, 24, generator=g).to(dev)
    m = None
    if mask == "bool":
        m = (torch.rand(shape[-2], 23, generator=g) > 0.2).to(dev)
        m[:, 0] = True  # torch gives NaN for an all-masked row; we give 0 (documented)
    elif mask == "float":
        m = torch.randn(shape[-2], 23, generator=g).to(dev)
    if is_causal and m is not None:  # torch refuses the pair; so do we, with its exception type, naming attn_mask
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, m, is_causal=True)
        with pytest.raises(RuntimeError, match="attn_mask: must be None when is_causal"):
            fastattn.scaled_dot_product_attention(q, k, v, m, is_causal=True)
        return
    for scale in (None, 0.5):
        ours = fastattn.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal, scale=scale)
        theirs = F.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal, scale=scale)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


def test_sdpa_gqa_conformance():
    q, k, v = torch.randn(2, 8, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    ours = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k, v)


def test_mask_gradient_falls_back_to_reference():
    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 6, 6, requires_grad=True)
    out = fastattn.scaled_dot_product_attention(q, k, v, bias)
    out.sum().backward()
    q2, k2, v2, b2 = (t.detach().clone().requires_grad_() for t in (q, k, v, bias))
    F.scaled_dot_product_attention(q2, k2, v2, b2).sum().backward()
    torch.testing.assert_close(bias.grad, b2.grad)
    with fastattn.backend("triton"), pytest.raises(fastattn.BackendNotSupported, match="requires grad"):
        fastattn.scaled_dot_product_attention(q, k, v, bias)


@pytest.mark.parametrize("args, match", [
    (dict(q=(2, 4, 8, 16), k=(2, 4, 8, 12)), "key: head dim"),
    (dict(q=(2, 4, 8, 16), k=(2, 3, 8, 16), v=(2, 3, 8, 16), gqa=True), "divide"),
    (dict(q=(2, 4, 8, 16), v=(2, 4, 9, 16)), "value"),
    (dict(q=(2, 4, 8, 16), k=(3, 4, 8, 16), v=(3, 4, 8, 16)), "batch"),
    (dict(mask=(3, 8)), "attn_mask"),
    (dict(q=(8,)), "query"),
])
def test_bad_shapes(args, match):
    q = torch.randn(args.get("q", (2, 4, 8, 16)))
    k = torch.randn(args.get("k", q.shape))
    v = torch.randn(args.get("v", k.shape))
    m = torch.ones(args["mask"], dtype=torch.bool) if "mask" in args else None
    with pytest.raises(fastattn.ArgumentError, match=match):
        fastattn.scaled_dot_product_attention(q, k, v, m, enable_gqa=args.get("gqa", False))


@pytest.mark.parametrize("q_shape, kpm_shape", [((2, 5, 8), (1, 7)), ((1, 2, 5, 8), (2, 7)), ((3, 2, 5, 8), (2, 7))])
def test_key_padding_mask_that_does_not_broadcast_to_batch_s(q_shape, kpm_shape):
    """A key_padding_mask must broadcast to (batch, S), not only with it: the error names it and (batch, S) (a
    (1, S) mask on unbatched inputs blamed an attn_mask never given, at an internal 4-D shape)."""
    q = torch.randn(q_shape)
    k = torch.randn(*q_shape[:-2], 7, 8)
    want = f"key_padding_mask: shape {kpm_shape} does not broadcast to (batch, S) = {(*q_shape[:-3], 7)}"
    with pytest.raises(fastattn.ArgumentError, match=re.escape(want)):
        fastattn.attention(q, k, k, key_padding_mask=torch.zeros(kpm_shape, dtype=torch.bool))
    fastattn.attention(q, k, k, key_padding_mask=torch.zeros(7, dtype=torch.bool))  # (S,) broadcasts to any batch


def test_bad_dtypes_and_arguments():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="dtypes must match"):
        fastattn.scaled_dot_product_attention(q, q.half(), q)
    with pytest.raises(RuntimeError, match="query: dtype"):
        fastattn.scaled_dot_product_attention(q.int(), q.int(), q.int())
    with pytest.raises(RuntimeError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, q, q, torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="causal"):
        fastattn.attention(q, q, q, causal="diagonal")
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.attention(q, q, q, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        fastattn.attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="device"):
        fastattn.scaled_dot_product_attention(q, q.to("meta"), q.to("meta"))
    with pytest.raises(TypeError, match="scale"):
        fastattn.scaled_dot_product_attention(q, q, q, scale="0.5")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(fastattn.ArgumentError, match="scale: expected a finite number"):
            fastattn.attention(q, q, q, scale=bad)
        with pytest.raises(fastattn.ArgumentError, match="softcap: expected a finite number"):  # (ran on the reference)
            fastattn.attention(q, q, q, softcap=bad)
        with pytest.raises(fastattn.ArgumentError, match="softcap: expected a finite number"):
            fastattn.decode_attention(q[:, :, :1], q, q, softcap=bad)
    with pytest.raises(fastattn.ArgumentError, match="window: expected"):  # (was truncated to (1, 0))
        fastattn.attention(q, q, q, causal="top_left", window=(1.7, 0))
    with pytest.raises(fastattn.ArgumentError, match="alibi_slopes: expected a tensor"):  # (was an AttributeError)
        fastattn.attention(q, q, q, alibi_slopes=[0.5, 0.25])


def test_triton_refuses_a_zero_head_dim():
    """An empty output (Ev = 0) still has the scores' logsumexp: the Triton kernel returned +inf for it."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 0)
    from fastattn.ops.attention.dispatch import request, dispatcher
    from fastattn.ops.attention.params import AttnParams
    assert "head dim 0" in dispatcher.impls["triton"].check(request(q, k, v, None, None, AttnParams(scale=0.5)))
    out, lse = fastattn.attention(q, k, v, return_lse=True)  # auto: a backend that computes it
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.5, -1))


def test_head_dim_zero_weighs_every_key_alike():
    """head_dim 0: every score is 0 (torch's SDPA averages the values, scale 1 / sqrt(0) or not)."""
    q, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 4, requires_grad=True)
    k = torch.randn(2, 3, 7, 0)
    out = fastattn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand(2, 3, 5, 4))
    out.sum().backward()
    torch.testing.assert_close(v.grad, torch.full_like(v, 5 / 7))


@BK
@pytest.mark.parametrize("Hk", [4, 2])
def test_no_keys_gives_zeros_and_zero_gradients(backend_name, Hk):
    """S = 0 (no key at all; with GQA too): out 0 and zero gradients, as torch's SDPA gives (the reference's
    backward took the max over an empty dim, and could not sum an empty GQA group)."""
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    dt, E = (torch.float16, 32) if backend_name == "cuda" else (torch.float32, 16)  # (the CUDA C++ kernel's)
    q = torch.randn(2, 4, 3, E, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(2, Hk, 0, E, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    with fastattn.backend(backend_name):
        out = fastattn.attention(q, k, v)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all() and k.grad.shape == k.shape and v.grad.shape == v.shape


@BK
def test_no_query_heads_gives_zero_key_gradients(backend_name):
    """H = 0 query heads against Hk = 2 (a GQA group of any size divides 0): an empty output, and k and v get zero
    gradients (the CUDA C++ backward returned them uninitialised)."""
    skip_if_not_built(backend_name, "attention_fwd")
    dev = backend_device(backend_name)
    dt, E = (torch.float16, 32) if backend_name == "cuda" else (torch.float32, 16)
    q = torch.randn(2, 0, 5, E, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.full((2, 2, 7, E), float("nan"), device=dev, dtype=dt).requires_grad_() for _ in range(2))
    with fastattn.backend(backend_name):
        out = fastattn.attention(q, k, v, enable_gqa=True)
    assert out.shape == (2, 0, 5, E)
    k.grad = v.grad = None
    torch.autograd.backward(out, torch.ones_like(out), inputs=[q, k, v])
    assert (k.grad == 0).all() and (v.grad == 0).all() and q.grad.shape == q.shape


@pytest.mark.parametrize("backend_name", ["reference", "triton"], indirect=True)
def test_torch_compile_traces_attention(backend_name):
    q, k, v = (torch.randn(1, 2, 9, 16, device=backend_device(backend_name), requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return fastattn.attention(q, k, v, causal="top_left").square().sum()

    with fastattn.backend(backend_name):  # a backend is forced outside the compiled region
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
        expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("what", ["mask", "alibi"])
def test_torch_compile_fullgraph_with_bias_gradient(what):
    """A float mask or ALiBi slopes that require grad (the reference route) compile into one graph: the route's debug
    log line is skipped while dynamo traces (a logger call breaks the graph)."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 7, 8, requires_grad=True)
    bias = (torch.randn(7, 7) if what == "mask" else torch.rand(2)).requires_grad_()

    def f(q, bias):
        kw = dict(attn_mask=bias) if what == "mask" else dict(alibi_slopes=bias)
        return fastattn.attention(q, q, q, **kw).square().sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, bias)
    grads = torch.autograd.grad(loss, (q, bias))
    for a, b in zip(grads, torch.autograd.grad(f(q, bias), (q, bias))):
        torch.testing.assert_close(a, b)


def test_cuda_declared_support():
    """The CUDA C++ kernel's declared support, pinned: check() skips what it declares unsupported on that backend, so
    a declaration that silently narrowed would skip tests instead of failing them."""
    from fastattn import _ext
    if not hasattr(_ext._C, "attention_fwd_cuda"):
        pytest.skip("fastattn._C has no CUDA attention kernels in this build")

    def reasons(**kw):
        fields = dict(device="cuda", dtype=torch.float16, head_dim=64, head_dim_v=64, mask=None, mask_grad=False,
                      gqa=False, causal=False, window=False, alibi=False, softcap=False, dropout=False)
        return A.dispatcher.impls["cuda"].declared_reasons(A.AttnRequest(**dict(fields, **kw)))

    for kw in [{}, dict(dtype=torch.bfloat16), dict(head_dim=32, head_dim_v=32), dict(head_dim=128, head_dim_v=128),
               dict(causal=True, mask="bool", gqa=True)]:
        assert reasons(**kw) == [], kw
    for kw, word in [(dict(dtype=torch.float32), "dtype"), (dict(head_dim=80, head_dim_v=80), "head dims"),
                     (dict(head_dim_v=32), "head dims"), (dict(mask="float"), "float attn_mask"),
                     (dict(window=True), "window"), (dict(alibi=True), "alibi"), (dict(softcap=True), "softcap"),
                     (dict(dropout=True), "dropout"), (dict(device="cpu"), "device")]:
        assert any(word in r for r in reasons(**kw)), (kw, reasons(**kw))


class _OnCuda:
    """Shape, dtype and device of a CUDA tensor, for building dispatch requests on a machine without a GPU."""
    def __init__(self, *shape):
        self.shape, self.dtype, self.device = torch.Size(shape), torch.float16, torch.device("cuda")

    def numel(self):
        return self.shape.numel()


@pytest.mark.parametrize("B, H", [(65536, 1), (1, 65536), (65535, 65535)])
def test_gpu_grid_limits_are_declared(B, H):
    """A CUDA grid holds 65535 blocks on axes y and z, where the GPU kernels put heads and batch: the CUDA C++ kernel
    declines either past it (its binding's check raised), Triton declines heads past it and launches a batch past it
    in chunks (test below); auto mode then runs what remains (the reference for heads)."""
    from fastattn.ops.attention.params import GRID_YZ, request
    from fastattn.ops.attention import varlen as V
    q = _OnCuda(B, H, 4, 64)
    req = request(q, q, q, None, None, A.AttnParams(scale=1.0))
    vreq = V._request(_OnCuda(4, H, 64), _OnCuda(4, H, 64))
    assert (req.big_batch, req.big_heads, vreq.big_heads) == (B > GRID_YZ, H > GRID_YZ, H > GRID_YZ)

    def declines(impl, r):
        return [why for why in impl.declared_reasons(r) if "65535" in why]
    assert bool(declines(A.dispatcher.impls["triton"], req)) == (H > GRID_YZ)
    assert bool(declines(V.dispatcher.impls["triton"], vreq)) == (H > GRID_YZ)
    if hasattr(fastattn._ext._C, "attention_fwd_cuda"):
        assert bool(declines(A.dispatcher.impls["cuda"], req)) == (max(B, H) > GRID_YZ)
    cpu = torch.empty(65536, 1, 1, 8)  # (the CPU kernels have no such limit)
    r = request(cpu, cpu, cpu, None, None, A.AttnParams(scale=1.0))
    assert not r.big_batch and not r.big_heads


@pytest.mark.parametrize("backend_name", ["triton"], indirect=True)
def test_triton_launches_batches_past_the_grid_in_chunks(backend_name, monkeypatch):
    """A batch past the grid's axis z (65535; 2 here) in several launches: outputs, lse and gradients bit-equal to one
    launch, dropout masks included (each chunk's counters start where the batches before it end); dense with a
    per-batch mask and ALiBi slopes, and varlen with 5 sequences."""
    from fastattn.kernels import attention as K
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 7, 16, generator=g).to(dev) for _ in range(3))
    mask = (torch.rand(5, 2, 7, 7, generator=g) > 0.2).to(dev)
    slopes = torch.rand(5, 2, generator=g).to(dev)
    qv, kv, vv = (torch.randn(23, 2, 16, generator=g).to(dev) for _ in range(3))
    cu = torch.tensor([0, 3, 3, 10, 17, 23], dtype=torch.int32, device=dev)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, qv, kv, vv)]
        torch.manual_seed(1)
        with fastattn.backend(backend_name):
            out, lse = fastattn.attention(*leaves[:3], attn_mask=mask, alibi_slopes=slopes, causal="top_left",
                                          dropout_p=0.3, return_lse=True)
            out_v, lse_v = fastattn.attention_varlen(*leaves[3:], cu, cu, alibi_slopes=slopes, causal=True,
                                                     dropout_p=0.3, return_lse=True)
        (out.square().sum() + out_v.square().sum()).backward()
        return [out, lse, out_v, lse_v] + [t.grad for t in leaves]
    whole = run()
    monkeypatch.setattr(K, "GRID_Z", 2)
    for name, a, b in zip(["out", "lse", "out_v", "lse_v", "dq", "dk", "dv", "dq_v", "dk_v", "dv_v"], run(), whole):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_gpu_batch_past_the_grid_runs():
    """70000 sequences on a GPU, auto mode: an answer equal to torch's (Triton, in two launches; CUDA C++ declines),
    no launch failure."""
    q, k, v = (torch.randn(70000, 1, 8, 32, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = fastattn.attention(q, k, v, causal="top_left")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-3, rtol=2e-3)
    out.float().sum().backward()
    assert q.grad.isfinite().all() and k.grad.isfinite().all()


@pytest.mark.parametrize("causal", [None, "top_left"])
def test_cpu_forward_items_of_several_query_blocks(causal):
    """Enough heads and queries that the CPU forward's work items span several query blocks (9 blocks of 64 a head
    here: one item of 8 and one of 1, heavy ones first under causal), in the layout of a packed projection."""
    skip_if_not_built("cpu", "attention_fwd")
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 520, 3, 8, 32, generator=g)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with fastattn.backend("cpu"):
        out = fastattn.attention(q, k, v, causal=causal)
    ref = attention_ref(q.double(), k.double(), v.double(), causal=causal)
    base = F.scaled_dot_product_attention(q, k, v, is_causal=causal is not None)
    assert_bounded("out", out, ref, base, torch.float32)


@pytest.mark.parametrize("env", [{"FASTATTN_CPU_NO_AVX512": "1"}, {"FASTATTN_CPU_NO_AVX2": "1"}],
                         ids=["avx2", "portable"])
def test_cpu_code_paths(env):
    """The CPU attention kernels choose AVX-512, AVX2 or portable code at run time (once per process): run a slice
    of this file's CPU cases in fresh processes with the faster paths turned off."""
    import os
    import subprocess
    import sys
    from fastattn import _ext
    if not hasattr(_ext._C, "attention_fwd_cpu"):
        pytest.skip("fastattn._C has no CPU attention kernels in this build")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "cpu and (masks or gqa or extended or dropout or 97-129 or strided) and not code_paths"],
                       env=dict(os.environ, **env), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_attn_params_flat_is_field_order():
    """AttnParams.flat() spells its fields out (for dynamo): it must stay dataclasses.astuple's order."""
    import dataclasses

    from fastattn.ops.attention.params import AttnParams
    values = dict(scale=0.5, causal=True, diag_offset=3, window_left=4, window_right=5, softcap=6.0, dropout_p=0.7,
                  seed=8, offset=9)
    assert [f.name for f in dataclasses.fields(AttnParams)] == list(values)
    p = AttnParams(**values)
    assert p.flat() == dataclasses.astuple(p) == tuple(values.values())
    assert AttnParams(*p.flat()) == p
