"""Forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad's dual tensors): the ops run their
reference's torch ops while a forward AD level is open, so tangents come out as torch's own ops give them. Before,
the kernels dropped an input's tangent in silence (a frozen LayerNorm's output had none) or the Functions raised
"You must implement the jvp function". torch's own SDPA refuses forward AD on its fused CPU path; the expected
tangents here come from torch.func.jvp of the same math written in torch ops, in float64."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import hessian, jacfwd, jacrev, jvp

import fastattn
from conftest import HAS_GPU

# cpu always; cuda (the ops' forward-AD route with CUDA tensors: their dispatch, then the reference's torch ops on the
# GPU) marked gpu, skipped without one. The expected tangents stay the CPU float64 ones.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")])]
# On the GPU: float64 (to the CPU's rounding) and float32, the dtype its kernels take (the tolerance: a few float32
# rounding steps of these O(1) outputs and tangents, as torch.testing's float32 default but for the longer sums).
GPU_DTYPES = {torch.float64: {}, torch.float32: dict(atol=1e-5, rtol=1e-5)}


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _attention_math(q, k, v, causal=False, mask=None):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _dual_tangent(f, primals, tangents):
    """f's output tangent through torch.autograd.forward_ad's dual tensors."""
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        return fwAD.unpack_dual(out).tangent


def _check(f, ref, *primals, atol=None, rtol=None, device="cpu", dtype=None):
    """f's jvp (torch.func's, and the dual tensors') against ref's on the CPU primals; f runs on the primals and
    tangents moved to ``device`` (and ``dtype``), its results compared back on the CPU in ref's dtype."""
    tangents = tuple(randn(*p.shape, seed=10 + i, dtype=p.dtype) for i, p in enumerate(primals))
    out, want = jvp(ref, primals, tangents)
    primals, tangents = ([t.to(device, dtype or t.dtype) for t in ts] for ts in (primals, tangents))
    got_out, got = jvp(f, tuple(primals), tuple(tangents))
    dual = _dual_tangent(f, primals, tangents)
    assert dual is not None  # (was None: the tangent dropped)
    assert got_out.device == got.device == dual.device == primals[0].device
    for a, b in ((got_out, out), (got, want), (dual, want)):
        torch.testing.assert_close(a.to("cpu", b.dtype), b, atol=atol, rtol=rtol)


MASK = torch.rand(6, 6, generator=torch.Generator().manual_seed(3)) > 0.4
MASK.fill_diagonal_(True)
ATTENTION = {
    "plain": (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v), _attention_math),
    "causal": (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda q, k, v: _attention_math(q, k, v, causal=True)),
    "mask": (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=MASK.to(q.device)),
             lambda q, k, v: _attention_math(q, k, v, mask=MASK)),
    "gqa": (lambda q, k, v: fastattn.attention(q, k[:, :1], v[:, :1]),
            lambda q, k, v: _attention_math(q, k[:, :1], v[:, :1])),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention(case):
    f, ref = ATTENTION[case]
    _check(f, ref, randn(2, 3, 6, 8), randn(2, 3, 6, 8, seed=1), randn(2, 3, 6, 8, seed=2))


def _on_gpu(check):
    """check(device="cuda", dtype=..., tolerances) for each of GPU_DTYPES."""
    for dtype, tol in GPU_DTYPES.items():
        check(device="cuda", dtype=dtype, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_cuda(case):
    """test_attention with CUDA tensors (float64 and float32): the CPU float64 tangents."""
    f, ref = ATTENTION[case]
    primals = randn(2, 3, 6, 8), randn(2, 3, 6, 8, seed=1), randn(2, 3, 6, 8, seed=2)
    _on_gpu(lambda **kw: _check(f, ref, *primals, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prenorm", [False, True])
def test_add_norms(prenorm, device):
    x, r, w, b = randn(4, 16), randn(4, 16, seed=1), randn(16, seed=2), randn(16, seed=3)

    def ln_ref(x, r, w, b):
        y = F.layer_norm(x + r, (16,), w, b)
        return torch.cat([y, x + r]) if prenorm else y

    def ln(x, r, w, b):
        out = fastattn.add_layer_norm(x, r, w, b, prenorm=prenorm)
        return torch.cat(out) if prenorm else out

    def check(**kw):
        _check(ln, ln_ref, x, r, w, b, **kw)
        _check(lambda x, w: fastattn.add_rms_norm(x, None, w),
               lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, x, w, **kw)

    check() if device == "cpu" else _on_gpu(check)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_float32_layer_norm_keeps_the_tangent(device):
    """fastattn.nn.LayerNorm with no parameter requiring grad, on a dual input: the kernel path used to drop it (on
    the GPU: against torch's LayerNorm on the CPU, both float32)."""
    torch.manual_seed(0)
    ours, theirs = fastattn.nn.LayerNorm(16).requires_grad_(False), torch.nn.LayerNorm(16)
    _check(ours.to(device), theirs, randn(5, 16, dtype=torch.float32), device=device)


def test_linear_cross_entropy():
    target = torch.randint(0, 12, (5,), generator=torch.Generator().manual_seed(0))
    _check(lambda x, w: fastattn.linear_cross_entropy(x, w, target),
           lambda x, w: F.cross_entropy(x @ w.t(), target), randn(5, 16), randn(12, 16, seed=1))


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_int8_linear_tangent_through_the_dequantized_weight(mode):
    """Int8Linear's input tangent is x's through the dequantized weight, as its gradient is (w8a8's rounding of x
    passed straight through); its output value stays the int8 kernel's (w8a16: the reference's, the same formula)."""
    torch.manual_seed(0)
    lin = fastattn.nn.Int8Linear.from_float(torch.nn.Linear(16, 12), mode=mode)
    wd = lin.weight.float() * lin.weight_scale[:, None]
    x, t = randn(5, 16, dtype=torch.float32), randn(5, 16, seed=1, dtype=torch.float32)
    out, tangent = jvp(lin, (x,), (t,))
    with torch.no_grad():
        torch.testing.assert_close(out, lin(x), **(dict(rtol=0, atol=0) if mode == "w8a8" else {}))
    torch.testing.assert_close(tangent, t @ wd.t())
    torch.testing.assert_close(_dual_tangent(lin, (x,), (t,)), t @ wd.t())


def test_multihead_attention_against_finite_differences():
    """torch's MultiheadAttention itself refuses forward AD (its fused SDPA): ours against a central difference."""
    torch.manual_seed(0)
    mha = fastattn.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64).eval()
    x, t = randn(2, 5, 16), randn(2, 5, 16, seed=1)

    def f(x):
        return mha(x, x, x, need_weights=False)[0]

    _, tangent = jvp(f, (x,), (t,))
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * t) - f(x - eps * t)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_jacfwd_and_hessian_of_attention_and_layer_norm(device):
    """jacfwd (vmap over jvp) and hessian (jacfwd over jacrev) of a block: attention, then add + LayerNorm (on the
    GPU, float64: against the CPU's)."""
    w, b = randn(8, seed=5), randn(8, seed=6)

    def block(x, attend, add_norm):
        q = x.view(1, 1, 4, 8)
        return add_norm(attend(q, q, q).view(4, 8), x, w.to(x.device), b.to(x.device)).sum(-1).square().sum()

    def ours(x):
        return block(x, lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                     fastattn.add_layer_norm)

    def ref(x):
        return block(x, lambda q, k, v: _attention_math(q, k, v, causal=True),
                     lambda x, r, w, b: F.layer_norm(x + r, (8,), w, b))

    x = randn(4, 8)
    torch.testing.assert_close(jacfwd(ours)(x.to(device)).cpu(), jacrev(ref)(x))
    torch.testing.assert_close(hessian(ours)(x.to(device)).cpu(), hessian(ref)(x))
