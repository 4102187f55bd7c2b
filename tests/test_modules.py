"""fastattn.nn modules are drop-ins for their torch.nn twins: constructor, forward, state_dict both ways."""
import pytest
import torch

from fastattn import nn as fnn


@pytest.mark.parametrize("shape, kw", [(16, {}), ((4, 6), {}), (16, dict(elementwise_affine=False)),
                                       (16, dict(bias=False)), (16, dict(eps=1e-3))])
def test_layernorm_matches_torch_both_ways(shape, kw):
    theirs = torch.nn.LayerNorm(shape, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = fnn.LayerNorm(shape, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, *((shape,) if isinstance(shape, int) else shape))
    torch.testing.assert_close(ours(x), theirs(x))
    back = torch.nn.LayerNorm(shape, **kw)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ours(x))


@pytest.mark.parametrize("kw", [{}, dict(eps=1e-5), dict(elementwise_affine=False)])
def test_rmsnorm_matches_torch_both_ways(kw):
    theirs = torch.nn.RMSNorm((4, 6), **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.normal_()
    ours = fnn.RMSNorm((4, 6), **kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 4, 6, requires_grad=True)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    y.sum().backward()
    back = torch.nn.RMSNorm((4, 6), **kw)
    back.load_state_dict(ours.state_dict())


def test_module_gradients_match_torch():
    theirs, ours = torch.nn.LayerNorm(32), fnn.LayerNorm(32)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 32)
    dy = torch.randn(7, 32)
    theirs(x).backward(dy)
    ours(x).backward(dy)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-5, rtol=1e-5)


def test_module_dtype_device_kwargs():
    m = fnn.LayerNorm(8, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    y = m(torch.randn(2, 8, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_add_layer_norm_module_prenorm():
    m = fnn.AddLayerNorm(16, prenorm=True)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    y, s = m(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (16,), m.weight, m.bias))
    assert list(m.state_dict()) == ["weight", "bias"]
    m2 = fnn.AddRMSNorm(16, eps=1e-6)
    torch.testing.assert_close(m2(x, r), torch.nn.functional.rms_norm(x + r, (16,), m2.weight, 1e-6))


def test_module_rejects_wrong_trailing_shape():
    for m in (fnn.LayerNorm(16), fnn.RMSNorm(16)):  # torch raises RuntimeError (ArgumentError is both)
        with pytest.raises(RuntimeError, match="normalized_shape"):
            m(torch.randn(3, 8))
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.LayerNorm(16)(torch.randn(3, 8))
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.AddLayerNorm((4, 4))


def test_layer_norm_parameters_of_another_dtype_refused_as_torch():
    """torch's layer_norm takes parameters of the input's dtype, or float32 beside a half input."""
    for pdt, xdt in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        with pytest.raises(RuntimeError, match="weight: dtype"):
            fnn.LayerNorm(16, dtype=pdt)(torch.randn(3, 16, dtype=xdt))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    m = fnn.LayerNorm(16)
    torch.testing.assert_close(m(x), torch.nn.functional.layer_norm(x, (16,), m.weight, m.bias))


def test_rmsnorm_weight_of_another_dtype_as_torch():
    """torch.nn.RMSNorm takes a weight of any dtype and returns the input's; so does ours (a bfloat16 weight beside
    a float32 input used to raise a TypeError)."""
    theirs = torch.nn.RMSNorm(16).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = fnn.RMSNorm(16).to(torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16)
    y = ours(x)
    assert y.dtype == theirs(x).dtype == torch.float32
    torch.testing.assert_close(y, theirs(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("cls, args", [("LayerNorm", ((4, 4),)), ("RMSNorm", (16,)), ("AddLayerNorm", (16,)),
                                       ("AddRMSNorm", (16,)), ("Dropout", (0.5,))])
def test_trace_records_fastattn_ops_and_script_refuses(cls, args):
    """torch.jit.trace recorded only the allocation of the kernels' outputs (a direct call is invisible to it), and
    the traced module returned uninitialized memory: while tracing, the kernels run through their custom ops, which
    the trace keeps. Scripting raises a clear error."""
    m = getattr(fnn, cls)(*args).eval()
    x = torch.randn(2, 3, 16).view(2, 3, 4, 4) if cls == "LayerNorm" else torch.randn(2, 3, 16)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,))
        x2 = torch.randn_like(x) * 3 + 1
        torch.testing.assert_close(traced(x2), m(x2))
    assert cls == "Dropout" or any(n.kind().startswith("fastattn::") for n in traced.inlined_graph.nodes())
    with pytest.raises(RuntimeError, match=f"fastattn.nn.{cls} cannot be scripted"):
        torch.jit.script(torch.nn.Sequential(m))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_cuda_autocast_norms_run_in_float32_as_torch(cls):
    """CUDA autocast runs layer_norm and rms_norm in float32: torch's LayerNorm returns float32 for a float16 input;
    its RMSNorm float32 or, in some versions (2.11), the input's dtype: ours returns what the installed torch's does."""
    theirs = getattr(torch.nn, cls)(16).cuda()
    ours = getattr(fnn, cls)(16).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        y, want = ours(x), theirs(x)
    assert y.dtype == want.dtype and (cls == "RMSNorm" or y.dtype == torch.float32)
    torch.testing.assert_close(y, want)


def test_rmsnorm_default_eps_for_half_inputs_is_float32s():
    """eps=None is the computation dtype's machine epsilon, as torch's rms_norm takes it (float32 for bfloat16 and
    float16): the input dtype's (7.8e-3 for bfloat16) shrank small inputs' outputs (rms 0.11 for |x| ~ 0.01)."""
    for dt in (torch.bfloat16, torch.float16):
        x = (torch.randn(4, 64) * 0.01).to(dt)
        ours, theirs = fnn.RMSNorm(64, dtype=dt), torch.nn.RMSNorm(64, dtype=dt)
        torch.testing.assert_close(ours(x), theirs(x))


def test_fx_symbolic_trace_keeps_the_norms_as_calls():
    """torch.fx.symbolic_trace of a model holding fastattn's norms (after fastattn.convert, say) works as with
    torch's (whose modules fx keeps as leaves): their shape checks made it raise 'Proxy object cannot be iterated'.
    The graph calls fastattn's functions, and the traced model gives the module's outputs and gradients."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), fnn.LayerNorm(8), torch.nn.GELU(), fnn.RMSNorm(8),
                            fnn.LayerNorm(8, elementwise_affine=False))
    g = torch.fx.symbolic_trace(m)
    called = [n.target.__name__ for n in g.graph.nodes if n.op == "call_function"]
    assert called.count("layer_norm") == 2 and called.count("rms_norm") == 1
    assert all(n.target.__module__ == "fastattn.nn.normalization" for n in g.graph.nodes
               if n.op == "call_function" and n.target.__name__.endswith("_norm"))
    x = torch.randn(3, 8, requires_grad=True)
    y, yg = m(x), g(x)
    assert torch.equal(y, yg)
    ga = torch.autograd.grad(y.sin().sum(), [x, m[1].weight])
    gb = torch.autograd.grad(yg.sin().sum(), [x, g.get_submodule("1").weight])
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    with pytest.raises(RuntimeError, match="trailing shape"):  # the module's checks run in the traced model
        torch.fx.symbolic_trace(fnn.LayerNorm(8))(torch.randn(3, 7))


@pytest.mark.parametrize("eps", [-1.0, float("nan")])
def test_layer_norm_bad_eps_is_refused_in_training_too(eps):
    """A negative or NaN eps: ValueError naming it, with a gradient as without (the small-row path runs torch's
    layer_norm, which returned NaN)."""
    norm = fnn.LayerNorm(16, eps=eps)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="eps"):
            norm(torch.randn(4, 16, requires_grad=grad))
