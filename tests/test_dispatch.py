"""Backend selection, refusal messages, bad input, build info, torch.compile."""
import math
import os
import shutil

import pytest
import torch

import fastattn
from fastattn.backends import BackendNotSupported
from fastattn.ops import add_norm as op
from conftest import HAS_GPU


def test_available_backends_and_build_info():
    avail = fastattn.available_backends()
    assert "reference" in avail
    info = fastattn.build_info()
    assert set(info["backends"]) == {"cuda", "triton", "cpu", "reference"}
    from fastattn import _ext
    ops = ("add_norm_fwd", "add_norm_bwd", "attention_fwd", "attention_bwd", "int8_mm", "quantize_rows")
    if os.environ.get("FASTATTN_EXPECT_CPP") == "1":
        assert info["cpp_ops"] and "cpu" in avail, info
        assert info["openmp"], "the CPU ops were built without OpenMP"
        assert all(hasattr(_ext._C, f"{op}_cpu") for op in ops), dir(_ext._C)
    if os.environ.get("FASTATTN_EXPECT_CUDA_OPS") == "1":
        assert info["cuda_ops"], f"nvcc is here ({shutil.which('nvcc')}) but the CUDA ops were not built"
        assert info["cuda_archs"]
        assert all(hasattr(_ext._C, f"{op}_cuda") for op in ops), dir(_ext._C)


def test_auto_prefers_compiled_backend_on_cpu():
    x = torch.randn(4, 8)
    expected = "cpu" if "cpu" in fastattn.available_backends() else "reference"
    assert op.select_backend(x) == expected


def test_add_norm_forward_on_gpu_by_size():
    """On a GPU the add+norm forward runs CUDA C++ below TRITON_FWD_MIN elements (a pybind launch: less host time)
    and Triton from there (the faster kernel); each falls back on the other where it refuses."""
    order = op._dispatch.priority["cuda"]
    assert order(op.NormRequest("cuda", torch.float16, 1024, big=False))[0] == "cuda"
    assert order(op.NormRequest("cuda", torch.float16, 1024, big=True))[0] == "triton"
    assert op._request(torch.empty(op.TRITON_FWD_MIN // 1024, 1024, device="meta")).big
    assert not op._request(torch.empty(op.TRITON_FWD_MIN // 1024 - 1, 1024, device="meta")).big
    if HAS_GPU and {"cuda", "triton"} <= set(fastattn.available_backends()):
        assert op.select_backend(torch.empty(8, 1024, device="cuda", dtype=torch.float16)) == "cuda"
        assert op.select_backend(torch.empty(op.TRITON_FWD_MIN // 1024, 1024, device="cuda",
                                             dtype=torch.float16)) == "triton"


def test_attention_on_gpu_by_size():
    """On a GPU, attention calls of at most SMALL_FLOP forward FLOPs go to CUDA C++ first (a pybind launch: less host
    time), larger ones to Triton (the faster kernel); each falls back on the other where it refuses."""
    from types import SimpleNamespace

    from fastattn.ops.attention import dispatch as D
    from fastattn.ops.attention.params import SMALL_FLOP, AttnParams, request

    def on_cuda(*shape):  # request() reads only these of a tensor
        return SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16, shape=shape,
                               numel=lambda: math.prod(shape))

    def req(B, H, L, S, E=64):
        q, k = on_cuda(B, H, L, E), on_cuda(B, H, S, E)
        return request(q, k, k, None, None, AttnParams(1.0))

    n = math.isqrt(SMALL_FLOP // (4 * 8 * 16 * 64))  # the longest n x n attention of 8 x 16 heads that is small
    assert req(8, 16, n, n).small and not req(8, 16, n + 1, n + 1).small and not req(8, 16, 2 * n, n).small
    order = D.dispatcher.priority["cuda"]
    assert order(req(8, 16, n, n))[0] == "cuda" and order(req(8, 16, 2 * n, 2 * n))[0] == "triton"
    q = torch.empty(8, 16, 4, 64, device="meta")
    assert not request(q, q, q, None, None, AttnParams(1.0)).small  # CPU and other devices: never
    if HAS_GPU and {"cuda", "triton"} <= set(fastattn.available_backends()):
        small, big = (torch.empty(8, 16, m, 64, device="cuda", dtype=torch.float16) for m in (n, 2 * n))
        assert D.select_backend(small, small, small) == "cuda" and D.select_backend(big, big, big) == "triton"
        assert D.select_backend(small, small, small, p=AttnParams(1.0, window_left=4)) == "triton"  # cuda refuses


def test_forced_backend_context_and_env(monkeypatch):
    x = torch.randn(4, 8)
    with fastattn.backend("reference"):
        assert op.select_backend(x) == "reference"
        with fastattn.backend("auto"):
            assert op.select_backend(x) != "reference" or "cpu" not in fastattn.available_backends()
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert op.select_backend(x) == "reference"
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        fastattn.add_layer_norm(x)


def test_forced_backend_that_cannot_run_lists_reasons():
    x = torch.randn(4, 8, dtype=torch.float64)
    with fastattn.backend("triton"), pytest.raises(BackendNotSupported) as e:
        fastattn.add_layer_norm(x)
    assert "triton" in str(e.value) and "float64" in str(e.value)
    if not HAS_GPU:
        with fastattn.backend("cuda"), pytest.raises(BackendNotSupported, match="cuda"):
            fastattn.add_layer_norm(torch.randn(4, 8))


def test_wide_rows_fall_back_with_reason():
    x = torch.randn(2, 65537)
    reasons = op.why_not(x)
    assert any("65537" in r for r in reasons["triton"] + reasons["cpu"])
    assert op.select_backend(x) == "reference"  # auto falls back
    with fastattn.backend("reference"):
        y = fastattn.add_layer_norm(x)
    assert torch.isfinite(y).all()


def test_forced_backend_applies_to_backward():
    x = torch.randn(4, 8, requires_grad=True)
    with fastattn.backend("reference"):
        y = fastattn.add_layer_norm(x)
    with fastattn.backend("triton"):  # a backward under another forced backend still runs on it
        y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("bad, match, exc", [
    (dict(residual=torch.randn(4, 7)), "residual", ValueError),
    (dict(weight=torch.randn(7)), "weight", ValueError),
    (dict(weight=torch.randn(8, dtype=torch.float64)), "weight", TypeError),
    (dict(bias=torch.randn(8).to(torch.int32)), "bias", TypeError),
    (dict(residual=torch.randn(4, 8, dtype=torch.float64)), "residual", TypeError),
    (dict(weight=torch.randn(8, device="meta")), "weight.*device", ValueError),
    (dict(weight=[1.0] * 8), "weight", TypeError),
    (dict(eps=-1.0), "eps", ValueError),
    (dict(eps=float("nan")), "eps", ValueError),
])
def test_bad_input_names_the_argument(bad, match, exc):
    kw = dict(residual=None, weight=None, bias=None, eps=1e-5)
    kw.update(bad)
    x = torch.randn(4, 8, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        fastattn.add_layer_norm(x, kw["residual"], kw["weight"], kw["bias"], kw["eps"])


@pytest.mark.parametrize("x, match", [(torch.randint(0, 5, (4, 8)), "x: dtype"), (torch.randn(4, 0), "x: shape"),
                                      (torch.tensor(1.0), "x: shape"), ([1.0, 2.0], "x:")])
def test_bad_x(x, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastattn.add_layer_norm(x)


_BINDING_CHECKS = """
import torch, fastattn
C = fastattn._ext._C
x = torch.randn(4, 8)
cases = [
    ("x", lambda: C.add_norm_fwd_cpu(x.t(), None, None, None, 1e-5, False, False, False)),  # non-contiguous
    ("weight", lambda: C.add_norm_fwd_cpu(x, None, torch.randn(5), None, 1e-5, False, False, False)),
    ("residual", lambda: C.add_norm_fwd_cpu(x, torch.randn(4, 8).half(), None, None, 1e-5, False, False, False)),
    ("K", lambda: C.int8_mm_cpu(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8), None,
                                None, None, torch.float32)),
]
if C.with_cuda:
    cases.append(("x", lambda: C.add_norm_fwd_cuda(x, None, None, None, 1e-5, False, False, False)))  # CPU tensor
for name, call in cases:
    try:
        call()
    except RuntimeError as e:
        assert name in str(e), (name, str(e))
    else:
        raise AssertionError(f"no error for bad {name}")
print("OK")
"""


def test_cpp_binding_checks_its_arguments():
    """The C++ bindings refuse bad arguments with a RuntimeError naming them. Run in a child process: a crash in an
    error path (one happened on the GPU image) must fail this test, not kill the test runner."""
    import subprocess
    import sys
    from fastattn import _ext
    if _ext._C is None or not hasattr(_ext._C, "int8_mm_cpu"):
        pytest.skip("fastattn._C is not built")
    r = subprocess.run([sys.executable, "-c", _BINDING_CHECKS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit code {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"


def test_torch_compile_traces_the_op():
    x = torch.randn(3, 5, 16, requires_grad=True)
    r = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)

    def f(x, r, w):
        y, s = fastattn.add_rms_norm(x, r, w, prenorm=True)
        return (y * 2).sum() + s.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, r, w)
    grads = torch.autograd.grad(loss, (x, r, w))
    expected = torch.autograd.grad(f(x, r, w), (x, r, w))
    assert torch.allclose(loss, f(x, r, w))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_custom_ops_pass_opcheck():
    M, N = 5, 24
    x, r = torch.randn(M, N), torch.randn(M, N)
    w, b = torch.randn(N), torch.randn(N)
    torch.library.opcheck(op.add_norm_fwd_op, (x, r, w, b, 1e-5, False, True, False, ""))
    y, s, mean, rstd = op._fwd(x, r, w, b, 1e-5, False, True, False, "")
    torch.library.opcheck(op.add_norm_bwd_op, (torch.randn(M, N), s, mean, rstd, w, None, True, False, False, ""))


def test_cpu_shape_rules_apply_alike_eager_and_compiled():
    """The CPU shape rules that hand small float32 problems to torch's ops (add_norm.NATIVE_MAX_COLS,
    cross_entropy.TORCH_MAX_LOGITS) decide the same under torch.compile: aot_eager computes eager's bits, losses and
    gradients."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    w, b, head = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.randn(11, 7, generator=g)
    t = torch.randint(0, 11, (6,), generator=g)

    def f(x, r, w, b, head):
        y = fastattn.add_layer_norm(x, r, w, b)
        return fastattn.linear_cross_entropy(y, head, t) + y.square().mean()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [u.clone().requires_grad_() for u in (x, r, w, b, head)]
        loss = fn(*leaves)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for a, c in zip(*results):
        assert torch.equal(a, c)
