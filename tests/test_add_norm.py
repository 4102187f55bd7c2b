"""add_layer_norm / add_rms_norm on every backend against the float64 reference, bounded by torch's own error."""
import pytest
import torch

import fastattn
from fastattn.ops import add_norm as op
from fastattn.reference import add_norm_ref
from conftest import assert_bounded, backend_device, backend_params

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [1, 7, 123, 1024, 4099]
# residual: None, "same" (x's dtype) or "fp32"; weight/bias: False, True (x's dtype) or "fp32"
CASES = {
    "res-w-b": dict(residual="same", weight=True, bias=True),
    "plain": dict(residual=None, weight=False, bias=False),
    "res-w-prenorm": dict(residual="same", weight=True, bias=False, prenorm=True),
    "fp32res-fp32w-prenorm": dict(residual="fp32", weight="fp32", bias=True, prenorm=True),
    "res-in-fp32-prenorm": dict(residual="same", weight=True, bias=True, prenorm=True, residual_in_fp32=True),
    "noweight-bias": dict(residual="same", weight=False, bias=True),
}


def make_inputs(shape, dtype, device, residual=None, weight=False, bias=False, is_rms=False, **_):
    g = torch.Generator().manual_seed(sum(shape) * 7 + len(shape))
    n = shape[-1]

    def rnd(*s, dt=dtype, loc=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) + loc).to(dt).to(device)

    x = rnd(*shape, loc=0.5)
    r = None if residual is None else rnd(*shape, dt=torch.float32 if residual == "fp32" else dtype)
    w = None if not weight else rnd(n, dt=torch.float32 if weight == "fp32" else dtype, loc=1.0)
    b = None if (not bias or is_rms) else rnd(n, dt=torch.float32 if bias == "fp32" else dtype)
    return x, r, w, b


def run(fn, tensors, grads, prenorm):
    """Forward fn on leaf copies of tensors, backward with the given output gradients; returns outputs, grads."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs = list(out) if prenorm else [out]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return outs, [None if t is None else t.grad for t in leaves]


def check_against_reference(backend_name, shape, dtype, case, is_rms, device):
    kw = dict(case, is_rms=is_rms)
    x, r, w, b = make_inputs(shape, dtype, device, **kw)
    prenorm, rif = kw.get("prenorm", False), kw.get("residual_in_fp32", False)
    eps = 1e-5
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for _ in range(2 if prenorm else 1)]

    def ours(x, r, w, b):
        with fastattn.backend(backend_name):
            if is_rms:
                return fastattn.add_rms_norm(x, r, w, eps, prenorm=prenorm, residual_in_fp32=rif)
            return fastattn.add_layer_norm(x, r, w, b, eps, prenorm=prenorm, residual_in_fp32=rif)

    def ref(x, r, w, b, upcast):
        return add_norm_ref(x, r, w, b, eps, is_rms=is_rms, prenorm=prenorm, residual_in_fp32=rif, upcast=upcast)

    outs, gr = run(ours, (x, r, w, b), grads, prenorm)
    t_outs, t_gr = run(lambda *a: ref(*a, upcast=False), (x, r, w, b), grads, prenorm)
    f64 = [None if t is None else t.double() for t in (x, r, w, b)]
    r_outs, r_gr = run(lambda *a: ref(*a, upcast=True), f64, grads, prenorm)

    for i, name in enumerate(["y", "s"][:len(outs)]):
        assert outs[i].dtype == t_outs[i].dtype, f"{name}: dtype {outs[i].dtype}, torch gives {t_outs[i].dtype}"
        assert_bounded(name, outs[i], r_outs[i], t_outs[i], dtype)
    for name, g, tg, rg, t in zip(["dx", "dresidual", "dweight", "dbias"], gr, t_gr, r_gr, (x, r, w, b)):
        if t is None:
            continue
        assert g.dtype == t.dtype, f"{name}: dtype {g.dtype} != input dtype {t.dtype}"
        assert_bounded(name, g, rg, tg, dtype)


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_matches_reference(backend_name, case, width, dtype, is_rms):
    check_against_reference(backend_name, (3, 5, width), dtype, CASES[case], is_rms, backend_device(backend_name))


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_widest_rows(backend_name, dtype):
    check_against_reference(backend_name, (2, 65536), dtype, CASES["res-w-b"], False, backend_device(backend_name))


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
def test_many_rows_dweight(backend_name):
    # enough rows that the backward splits them over several programs / blocks / threads
    check_against_reference(backend_name, (1537, 96), torch.float32, CASES["res-w-b"], False,
                            backend_device(backend_name))


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
@pytest.mark.parametrize("leaves", ["both", "x", "residual", "neither", "shared"])
def test_residual_gradient_routes(backend_name, leaves):
    """float32 x and residual as leaves or activations (the backward writes dresidual itself beside a leaf, else
    hands dx to both edges), or both computed from one tensor: every upstream gradient matches torch's."""
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(3)
    a, c, w, b, dy = (torch.randn(*s, generator=g).to(dev) for s in ((5, 40), (5, 40), (40,), (40,), (5, 40)))

    def grads(fn):
        a_, c_, w_, b_ = (t.clone().requires_grad_() for t in (a, c, w, b))
        x = a_ if leaves in ("both", "x") else a_ * 1.5
        r = c_ if leaves in ("both", "residual") else (x.exp() if leaves == "shared" else c_ - 0.25)
        y = fn(x, r, w_, b_)
        (y * dy).sum().backward()
        return [t.grad for t in (a_, c_, w_, b_)]

    def ours(x, r, w, b):
        with fastattn.backend(backend_name):
            return fastattn.add_layer_norm(x, r, w, b)

    expected = grads(lambda x, r, w, b: torch.nn.functional.layer_norm(x + r, (40,), w, b))
    for name, got, want in zip(["a", "c", "weight", "bias"], grads(ours), expected):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")

    # torch.autograd.grad on the leaves accumulates nothing: like torch's x + r, one tensor serves both.
    x, r = a.clone().requires_grad_(), c.clone().requires_grad_()
    y = ours(x, r, w, b)
    gx, gr = torch.autograd.grad(y, [x, r], dy)
    gx_t, gr_t = torch.autograd.grad(torch.nn.functional.layer_norm(x + r, (40,), w, b), [x, r], dy)
    torch.testing.assert_close(gx, gx_t, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gr, gr_t, atol=2e-5, rtol=2e-5)
    assert gx.data_ptr() == gr.data_ptr()


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_empty_rows(backend_name, is_rms):
    dev = backend_device(backend_name)
    x = torch.randn(0, 4, 16, device=dev, requires_grad=True)
    w = torch.randn(16, device=dev, requires_grad=True)
    with fastattn.backend(backend_name):
        y = fastattn.add_rms_norm(x, None, w) if is_rms else fastattn.add_layer_norm(x, None, w)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_no_out_of_bounds_reads(backend_name, is_rms):
    """Inputs are views at the start of NaN-filled buffers: reading past the last row poisons the results."""
    dev = backend_device(backend_name)
    M, N = 9, 131
    impl = op._dispatch.impls[backend_name]

    def nan_tail(t):
        buf = torch.full((t.numel() + 4096,), float("nan"), dtype=t.dtype, device=dev)
        buf[:t.numel()] = t.flatten()
        return buf[:t.numel()].view(t.shape)

    x, r, dy, ds = (nan_tail(torch.randn(M, N, device=dev)) for _ in range(4))
    w, b = nan_tail(torch.randn(N, device=dev)), nan_tail(torch.randn(N, device=dev))
    y, s, mean, rstd = impl.fwd(x, r, w, None if is_rms else b, 1e-5, is_rms, True, False)
    dx, dres, dw, db = impl.bwd(dy, s, mean, rstd, w, ds, not is_rms, is_rms, False)
    for name, t in dict(y=y, s=s, rstd=rstd, dx=dx, dw=dw, db=db).items():
        assert torch.isfinite(t).all(), f"{name}: NaN read from past the end of an input"


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
def test_contract_matches_reference_backend(backend_name):
    """Every backend's (y, s, mean, rstd) and (dx, dres, dw, db) match the reference backend's, so a forward on
    one backend and a backward on another agree."""
    dev = backend_device(backend_name)
    M, N = 6, 77
    x = torch.randn(M, N, device=dev, dtype=torch.float16)
    r = torch.randn(M, N, device=dev, dtype=torch.float32)
    w, b = torch.randn(N, device=dev), torch.randn(N, device=dev)
    dy = torch.randn(M, N, device=dev, dtype=torch.float16)
    ds = torch.randn(M, N, device=dev, dtype=torch.float32)
    ref, ours = op._dispatch.impls["reference"], op._dispatch.impls[backend_name]
    f_ref = ref.fwd(x, r, w, b, 1e-5, False, True, True)
    f_our = ours.fwd(x, r, w, b, 1e-5, False, True, True)
    for name, a, e in zip(["y", "s", "mean", "rstd"], f_our, f_ref):
        assert a.dtype == e.dtype and a.shape == e.shape, \
            f"{name}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        torch.testing.assert_close(a, e, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")
    b_ref = ref.bwd(dy, f_ref[1], f_ref[2], f_ref[3], w, ds, True, False, True)
    b_our = ours.bwd(dy, f_ref[1], f_ref[2], f_ref[3], w, ds, True, False, True)
    for name, a, e in zip(["dx", "dres", "dweight", "dbias"], b_our, b_ref):
        assert a.dtype == e.dtype and a.shape == e.shape, \
            f"{name}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        torch.testing.assert_close(a, e, atol=5e-3, rtol=5e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_gradcheck_float64(backend_name, is_rms):
    x, r, w, b = make_inputs((3, 8), torch.float64, "cpu", residual="same", weight=True, bias=True, is_rms=is_rms)
    inputs = [t.requires_grad_() for t in (x, r, w, b) if t is not None]

    def f(*a):
        with fastattn.backend(backend_name):
            if is_rms:
                return fastattn.add_rms_norm(a[0], a[1], a[2], 1e-5, prenorm=True)
            return fastattn.add_layer_norm(*a, prenorm=True)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("env", [{"FASTATTN_CPU_NO_AVX2": "1"}, {"FASTATTN_CPU_STREAM_MIN_BYTES": "0"}],
                         ids=["portable", "streaming"])
def test_cpu_env_path(env):
    """The C++ paths that the environment picks (read once per process), each in a fresh process running a slice of
    this file's CPU tests: the portable (non-AVX2) loops, and the AVX2 loops with non-temporal output stores, which
    large calls take (widths that are multiples of 8 stream; the others keep plain stores)."""
    import os
    import subprocess
    import sys
    from fastattn.backends import unavailable_reason
    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))
    env = dict(os.environ, **env)
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(here, "test_add_norm.py"),
                        "-k", "cpu and (res-w-b or fp32res or plain) and not env_path"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
    if "FASTATTN_CPU_STREAM_MIN_BYTES" in env:
        code = "import fastattn; print(fastattn.build_info()['cpu_stream_min_bytes'])"
        info = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert info.stdout.strip() == "0", info.stdout + info.stderr


@pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
def test_strided_and_expanded_weight_and_bias(backend_name):
    """A weight / bias that is a strided slice or an expanded scalar: the Triton kernel read it as contiguous (off by
    up to 5.7, or past a 1-element buffer), the C++ kernels refused it."""
    dev = backend_device(backend_name)
    x, r = torch.randn(3, 16, device=dev), torch.randn(3, 16, device=dev)
    fused = torch.randn(32, device=dev)
    for w, b in ((fused[0::2], fused[1::2]), (torch.randn(1, device=dev).expand(16), None)):
        with fastattn.backend(backend_name):
            y = fastattn.add_layer_norm(x, r, w, b)
            y_rms = fastattn.add_rms_norm(x, r, w)
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (16,), w, b))
        torch.testing.assert_close(y_rms, torch.nn.functional.rms_norm(x + r, (16,), w, 1e-6))


def _layer_norm_grad_fn(y) -> str:
    return type(y.grad_fn).__name__


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("width", [7, 33, 64, 4099])
def test_cpu_small_float32_training_runs_torch_layer_norm(case, width):
    """CPU float32 add + LayerNorm with a gradient, at most NATIVE_MAX_COLS wide or NATIVE_MAX_ELEMENTS in all, runs
    torch's F.layer_norm in auto mode (host time: see op.NATIVE_MAX_COLS); outputs and gradients within the bounds of
    the kernels' tests. No timing here: the choice is checked, not its speed."""
    assert width <= op.NATIVE_MAX_COLS or 3 * 5 * width <= op.NATIVE_MAX_ELEMENTS
    check_against_reference("auto", (3, 5, width), torch.float32, CASES[case], False, "cpu")
    x, r, w, b = (None if t is None else t.requires_grad_() for t in make_inputs((3, 5, width), torch.float32, "cpu",
                                                                                  **CASES[case]))
    prenorm = CASES[case].get("prenorm", False)
    out = fastattn.add_layer_norm(x, r, w, b, prenorm=prenorm)
    assert _layer_norm_grad_fn(out[0] if prenorm else out) == "NativeLayerNormBackward0"


@pytest.mark.parametrize("backend_name", ["cpu"], indirect=True)
def test_cpu_layer_norm_stays_on_kernels_outside_the_rule(backend_name):
    """The kernels keep: rows wider than NATIVE_MAX_COLS past NATIVE_MAX_ELEMENTS, inference (no gradient: eager
    equals jit.trace programs bit for bit), other dtypes, RMSNorm, prenorm without a residual, a forced backend; the
    fastattn.nn modules follow the same rule."""
    def on_kernels(y):
        return "AddNormFunction" in _layer_norm_grad_fn(y)

    wide = torch.randn(op.NATIVE_MAX_ELEMENTS // 64 + 1, 65, requires_grad=True)
    assert on_kernels(fastattn.add_layer_norm(wide))
    small = torch.randn(4, 16, requires_grad=True)
    assert not on_kernels(fastattn.add_layer_norm(small))
    assert on_kernels(fastattn.add_layer_norm(small.double()))
    assert on_kernels(fastattn.add_layer_norm(small.bfloat16()))
    assert on_kernels(fastattn.add_rms_norm(small))
    assert on_kernels(fastattn.add_layer_norm(small, None, prenorm=True)[0])
    assert not on_kernels(fastattn.add_layer_norm(small, small.detach(), prenorm=True)[0])
    with fastattn.backend(backend_name):
        assert on_kernels(fastattn.add_layer_norm(small))
    assert not op.native_faster(small.detach(), None, None, None, False)  # no gradient wanted
    with torch.no_grad():
        assert not op.native_faster(small, None, None, None, False)
    assert not on_kernels(fastattn.nn.LayerNorm(16)(small)) and on_kernels(fastattn.nn.LayerNorm(65)(wide))


def test_cpu_layer_norm_module_small_rows_equals_torch():
    """fastattn.nn.LayerNorm on narrow float32 rows with a gradient: torch's own LayerNorm, so the same values and
    gradients (input and parameters) as torch.nn.LayerNorm."""
    theirs, ours = torch.nn.LayerNorm(7), fastattn.nn.LayerNorm(7)
    with torch.no_grad():
        theirs.weight.normal_(), theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 7)
    outs = []
    for m in (theirs, ours):
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.backward(torch.ones_like(y).cumsum(-1))
        outs.append((y, xg.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_weight_trains_on_inference_tensors_and_prenorm_s_follows_its_inputs():
    """An input made under torch.inference_mode beside a weight that trains (cached features): the weight's gradient,
    as torch's rms_norm gives it (before: "Inference tensors cannot be saved for backward"). With prenorm, s = x +
    residual needs a gradient only when x or residual does, as torch's x + residual (it required one for a weight
    alone, and torch.autograd.grad(s, weight) gave zeros where torch raises)."""
    with torch.inference_mode():
        x = torch.randn(3, 96)
    w = torch.rand(96) + 0.5
    grads = []
    for f in (lambda x, w: torch.nn.functional.rms_norm(x, (96,), w, 1e-6),
              lambda x, w: fastattn.add_rms_norm(x, None, w, 1e-6)):
        wl = w.clone().requires_grad_()
        f(x, wl).pow(2).sum().backward()
        grads.append(wl.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    r = torch.randn(3, 96)
    xs = x.clone()
    for fn in (fastattn.add_rms_norm, fastattn.add_layer_norm):
        wl = w.clone().requires_grad_()
        y, s = fn(xs, r, wl, prenorm=True)
        assert y.requires_grad and not s.requires_grad
        xl = xs.clone().requires_grad_()
        y, s = fn(xl, r, wl, prenorm=True)
        assert s.requires_grad
        torch.testing.assert_close(torch.autograd.grad(s.sum(), xl)[0], torch.ones_like(xl))
