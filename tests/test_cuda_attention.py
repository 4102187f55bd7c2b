"""The CUDA C++ flash attention kernels, fastattn._C.attention_fwd_cuda / attention_bwd_cuda called directly on a GPU.

out, lse, dq, dk, dv against the float64 reference over head dims 32/64/128, fp16/bf16, L != S both ways, causal
top-left and bottom-right, bool masks (stride-0 broadcasts, column-major, fully masked rows), GQA / MQA, strided and
unaligned inputs: each error at most 2 x torch's own error in the same dtype + eps (assert_bounded). Rows with no key
give out = dq = 0 and lse = +inf; the backward is deterministic; no read past the end of an input; unsupported inputs
raise; fastattn.attention forced to the cuda backend matches the reference. Timing: benchmarks/bench_attention.py.
"""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn.ops.attention import AttnParams
from fastattn.reference import attention_ref
from conftest import HAS_GPU, assert_bounded, cuda_kernels, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")]
DEV = "cuda"
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def C():
    return cuda_kernels("attention_fwd_cuda", "attention_bwd_cuda")


def flat(scale, causal, diag):
    """The binding's trailing scalar arguments."""
    return dataclasses.astuple(AttnParams(float(scale), bool(causal), int(diag)))


def bhld(B, h, n, D, dtype, layout, gen):
    """(B, h, n, D) on the GPU: 'contig', 'bshd' (a transposed view), 'padded' (row pitch D + 8),
    'unaligned' (data pointer 8 bytes off 16-byte alignment: the binding copies it)."""
    if layout == "bshd":
        return torch.randn(B, n, h, D, generator=gen, device=DEV, dtype=torch.float32).to(dtype).transpose(1, 2)
    if layout == "padded":
        return torch.randn(B, h, n, D + 8, generator=gen, device=DEV, dtype=torch.float32).to(dtype)[..., :D]
    x = torch.randn(B, h, n, D, generator=gen, device=DEV, dtype=torch.float32).to(dtype)
    if layout == "unaligned":
        buf = torch.empty(x.numel() + 4, device=DEV, dtype=dtype)
        y = buf[4:].view(B, h, n, D)
        y.copy_(x)
        return y
    return x


def make_mask(kind, B, H, L, S, gen):
    if kind is None:
        return None
    if kind == "full":
        m = torch.rand(B, H, L, S, generator=gen, device=DEV) > 0.3
        m[:, :, L // 2] = False  # a row with no key
        return m
    if kind == "bcast":  # (L, S) broadcast: strides (0, 0, S, 1)
        m = torch.rand(L, S, generator=gen, device=DEV) > 0.4
        m[0] = False
        return m.expand(B, H, L, S)
    if kind == "kpm":  # key padding (B, 1, 1, S) broadcast: strides (S, 0, 0, 1)
        m = torch.rand(B, S, generator=gen, device=DEV) > 0.3
        m[0] = False  # batch 0 sees no key at all
        return m[:, None, None, :].expand(B, H, L, S)
    if kind == "colmajor":  # stride(-1) = L
        return (torch.rand(B, H, S, L, generator=gen, device=DEV) > 0.5).transpose(-1, -2)
    raise ValueError(kind)


def _cases():
    """The grid, each case with its own seed; fp16 and bf16 alternate through it."""
    cs = []
    n = 0
    seqs = [(1, 1), (17, 17), (64, 64), (97, 129), (129, 97), (200, 17), (17, 200), (1, 300), (300, 1), (515, 1000)]
    for D in (32, 64, 128):
        for L, S in seqs:
            for causal in (None, "top_left", "bottom_right"):
                n += 1
                cs.append(dict(dtype=LOW[n % 2], B=1, H=2, Hk=2, L=L, S=S, D=D, causal=causal, seed=n))
    for D in (32, 64, 128):
        for mk in ("full", "bcast", "kpm", "colmajor"):
            for causal in (None, "top_left", "bottom_right"):
                n += 1
                cs.append(dict(dtype=LOW[n % 2], B=2, H=2, Hk=2, L=45, S=67, D=D, causal=causal, mask_kind=mk, seed=n))
    for D in (32, 64, 128):
        for H, Hk in ((8, 2), (8, 1), (3, 3)):
            for causal in (None, "bottom_right"):
                n += 1
                cs.append(dict(dtype=LOW[n % 2], B=2, H=H, Hk=Hk, L=29 if H == 8 else 130, S=61 if H == 8 else 75,
                               D=D, causal=causal, layout=("bshd", "padded", "contig", "unaligned")[n % 4], seed=n))
    for D in (64, 128):  # bigger: many blocks, the cp.async pipeline, GQA with a mask
        n += 1
        cs.append(dict(dtype=torch.bfloat16, B=2, H=8, Hk=2, L=1000, S=1100, D=D, causal="bottom_right",
                       mask_kind="kpm", layout="bshd", seed=n))
        n += 1
        cs.append(dict(dtype=torch.float16, B=1, H=4, Hk=4, L=2048, S=2048, D=D, causal="top_left", seed=n))
    n += 1
    cs.append(dict(dtype=torch.float16, B=1, H=2, Hk=1, L=33, S=70, D=64, causal=None, scale=0.3, seed=n))
    n += 1
    cs.append(dict(dtype=torch.bfloat16, B=1, H=1, Hk=1, L=33, S=70, D=32, causal="top_left", scale=-0.2, seed=n))
    return cs


def _case_id(c):
    return "-".join(str(v).replace("torch.", "") for k, v in c.items() if k != "seed")


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_kernels_against_reference(C, case):
    check(C, **case)


def check(C, dtype, B, H, Hk, L, S, D, causal, mask_kind=None, layout="contig", scale=None, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (bhld(B, h, n, D, dtype, layout, gen) for h, n in ((H, L), (Hk, S), (Hk, S)))
    dout = torch.randn(B, H, L, D, generator=gen, device=DEV, dtype=torch.float32).to(dtype)
    mask = make_mask(mask_kind, B, H, L, S, gen)
    scale = D ** -0.5 if scale is None else scale
    args = flat(scale, causal is not None, 0 if causal == "top_left" else S - L)

    out, lse = C.attention_fwd_cuda(q, k, v, mask, None, *args)
    dq, dk, dv = C.attention_bwd_cuda(dout, q, k, v, out, lse, mask, None, *args)
    again = C.attention_bwd_cuda(dout, q, k, v, out, lse, mask, None, *args)

    def grads(qq, kk, vv, upcast):
        leaves = [t.detach().clone().requires_grad_() for t in (qq, kk, vv)]
        o, row_lse = attention_ref(*leaves, mask, causal=causal, scale=scale, upcast=upcast, return_lse=True)
        o.backward(dout.to(o.dtype))
        return [o, row_lse] + [t.grad for t in leaves]

    exact = grads(q.double(), k.double(), v.double(), True)
    base = grads(q, k, v, False)
    mag = max([1.0] + [e.abs().max().item() for i, e in enumerate(exact) if i != 1 and e.numel()])
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), [base[0]] + base[2:],
                             [exact[0]] + exact[2:]):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_bounded(name, a, e, t, dtype, mag)

    assert lse.dtype == torch.float32 and lse.shape == (B, H, L), f"lse: {lse.dtype} {tuple(lse.shape)}"
    empty = ~torch.isfinite(exact[1])  # rows with no key (the reference's lse is infinite there)
    assert bool((lse[empty] == float("inf")).all()), "lse: rows with no key are not +inf"
    if (~empty).any():
        err = max_err(lse[~empty], exact[1][~empty])
        assert math.isfinite(err) and err <= 2e-3 * max(1.0, exact[1][~empty].abs().max().item()), \
            f"lse: max error {err:.3g}"
    assert bool((out[empty] == 0).all()), "out: rows with no key are not 0"
    assert bool((dq[empty] == 0).all()), "dq: rows with no key are not 0"
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), again)), "the backward is not deterministic"


@pytest.mark.parametrize("causal", [False, True])
def test_no_read_past_the_end(C, causal):
    """q, k, v, dout and the mask as views at the start of NaN-filled buffers (the mask's tail True): a read past
    any of their ends poisons the results."""
    def tail(shape, dtype=torch.float16):
        nel = math.prod(shape)
        if dtype == torch.bool:
            buf = torch.ones(nel + 8192, dtype=torch.bool, device=DEV)
            buf[:nel] = torch.rand(nel, device=DEV) > 0.3
        else:
            buf = torch.full((nel + 8192,), float("nan"), dtype=dtype, device=DEV)
            buf[:nel] = torch.randn(nel, device=DEV).to(dtype)
        return buf[:nel].view(shape)

    q, k, v, dout = tail((1, 2, 37, 64)), tail((1, 2, 53, 64)), tail((1, 2, 53, 64)), tail((1, 2, 37, 64))
    mask = tail((1, 2, 37, 53), torch.bool)
    args = flat(0.125, causal, 53 - 37)
    out, lse = C.attention_fwd_cuda(q, k, v, mask, None, *args)
    grads = C.attention_bwd_cuda(dout, q, k, v, out, lse, mask, None, *args)
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert torch.isfinite(t).all(), f"{name}: NaN read from past the end of an input"


# Each call passes the binding one input it does not support; each must raise a RuntimeError (TORCH_CHECK).
_REFUSALS = """
import dataclasses
import torch
from fastattn import _ext
from fastattn.ops.attention import AttnParams

C, dev = _ext._C, "cuda"
g = torch.Generator(device=dev).manual_seed(0)


def t(*shape, dtype=torch.float16):
    return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)


def p(**kw):
    return dataclasses.astuple(AttnParams(0.125, **kw))


q, k, v = t(1, 2, 16, 64), t(1, 2, 24, 64), t(1, 2, 24, 64)
fwd = C.attention_fwd_cuda
bad = {
    "alibi": lambda: fwd(q, k, v, None, torch.ones(1, 2, device=dev), *p()),
    "window": lambda: fwd(q, k, v, None, None, *p(window_left=4)),
    "softcap": lambda: fwd(q, k, v, None, None, *p(softcap=5.0)),
    "dropout": lambda: fwd(q, k, v, None, None, *p(dropout_p=0.1, seed=1)),
    "float mask": lambda: fwd(q, k, v, torch.zeros(1, 2, 16, 24, device=dev), None, *p()),
    "mask shape": lambda: fwd(q, k, v, torch.ones(1, 2, 16, 23, dtype=torch.bool, device=dev), None, *p()),
    "head dim 96": lambda: fwd(t(1, 2, 16, 96), t(1, 2, 24, 96), t(1, 2, 24, 96), None, None, *p()),
    "Ev != E": lambda: fwd(q, k, t(1, 2, 24, 32), None, None, *p()),
    "float32": lambda: fwd(q.float(), k.float(), v.float(), None, None, *p()),
    "dtype mix": lambda: fwd(q, k.bfloat16(), v, None, None, *p()),
    "H % Hk": lambda: fwd(t(1, 3, 16, 64), k, v, None, None, *p()),
    "stride(-1)": lambda: fwd(t(1, 2, 64, 16).transpose(-1, -2), k, v, None, None, *p()),
    "cpu": lambda: fwd(q.cpu(), k.cpu(), v.cpu(), None, None, *p()),
}
for name, call in bad.items():
    try:
        call()
        torch.cuda.synchronize()
        print(f"FAIL {name}: accepted")
    except RuntimeError:
        print(f"refused {name}")
    except Exception as e:
        print(f"FAIL {name}: raised {type(e).__name__} (expected RuntimeError)")
print(f"done: {len(bad)} inputs")
"""


def test_unsupported_inputs_raise(C):
    """Run in a child process: a crash in an error path must fail this test, not kill the test runner."""
    r = subprocess.run([sys.executable, "-c", _REFUSALS], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "done:" in r.stdout, f"exit code {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    assert "FAIL" not in r.stdout, r.stdout


def test_public_api_on_cuda_backend(C):
    """fastattn.attention forced to the cuda backend (dispatch + autograd) against the float64 reference."""
    g = torch.Generator(device=DEV).manual_seed(1)
    B, H, Hk, L, S, D = 2, 4, 2, 77, 130, 64
    q, k, v = (torch.randn(B, h, n, D, generator=g, device=DEV).half() for h, n in ((H, L), (Hk, S), (Hk, S)))
    kpm = torch.rand(B, S, generator=g, device=DEV) < 0.2  # torch's meaning: True = padding
    dout = torch.randn(B, H, L, D, generator=g, device=DEV).half()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastattn.backend("cuda"):
        out = fastattn.attention(*leaves, causal="bottom_right", key_padding_mask=kpm, enable_gqa=True)
        out.backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_leaves, ~kpm[:, None, None, :], causal="bottom_right")
    ref.backward(dout.double())
    for name, a, e in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                          [ref] + [t.grad for t in ref_leaves]):
        err = max_err(a, e)
        assert err <= 2e-2 * max(1.0, e.abs().max().item()), f"fastattn.attention {name}: max error {err:.3g}"
