"""fastattn.ops.dropout: F.dropout's meaning on Philox keep flags (cpu and Triton keep the same elements; the
reference uses torch's generator), the mask regenerated in the backward, in place, and its edge cases against torch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import _ext
from fastattn.ops.dropout import DropoutFunction, dispatcher, dropout
from conftest import backend_device

HAS_CPU_KERNEL = hasattr(_ext._C, "dropout_cpu") if _ext.has_cpp() else False
needs_cpu = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="fastattn._C has no CPU dropout kernel in this build")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(backend, x, p, seed, offset):
    out = torch.empty_like(x)
    dispatcher.impls[backend].fwd(x, out, p, seed, offset)
    return out


def _assert_same_values(out, want, backend):
    """Bit-equal; except Triton's interpreter rounding float32 -> bfloat16 by truncation (numpy has no bfloat16):
    there within one bfloat16 step (on a GPU, Triton rounds to nearest even like the others)."""
    if backend == "triton" and out.dtype == torch.bfloat16 and out.device.type == "cpu":
        assert torch.equal(out != 0, want != 0)
        torch.testing.assert_close(out, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, want)


def _scale(p, dtype):
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(1.0 / (1.0 - p), dtype=cdt)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_values_and_keep_rate(backend, dtype):
    """out = x * keep / (1 - p), rounded once from the compute type; the kept fraction is 1 - p within 5 sigma."""
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("no CPU dropout kernel")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton: no float64")
    n, p = (300_001 if backend != "triton" else 40_003), 0.3
    x = (torch.rand(n, dtype=torch.float64) + 0.5).to(dtype).to(backend_device(backend))  # no zeros
    out = _run(backend, x, p, seed=1234, offset=99)
    keep = out != 0
    cdt = _scale(p, dtype).dtype
    want = (x.to(cdt) * keep.to(cdt) * _scale(p, dtype)).to(dtype)
    _assert_same_values(out, want, backend)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, offset", [(1, 0), (4097, 5), (12_345, 2**32 - 7), (33, 2**40 + 3), (5000, 2**32 - 8)])
def test_cpu_and_triton_keep_the_same_elements(dtype, n, offset):
    """Chunk boundaries, tails shorter than a vector, and a 2**32 carry of the counter; offsets that are multiples of
    4 (Triton's four elements per Philox evaluation: the API's) and others (one each)."""
    x = torch.randn(n).to(dtype)
    a, b = _run("cpu", x, 0.25, 777, offset), _run("triton", x.to(backend_device("triton")), 0.25, 777, offset)
    _assert_same_values(b, a.to(b.device), "triton")


@needs_cpu
def test_cpu_dropout_equals_the_attention_kernels_mask():
    """One Philox stream in fastattn: the dropout's keep flags are the attention dropout mask's at the same counters;
    the mask's rows are S rounded up to a multiple of 4 counters apart (dispatch.py's contract)."""
    keep = _run("cpu", torch.ones(5000), 0.2, 42, 1000) != 0
    mask = _ext._C.attention_dropout_mask_cpu(1, 1, 1, 5000, 0.2, 42, 1000).view(-1)
    assert torch.equal(keep, mask)
    flat = (_run("cpu", torch.ones(2 * 3 * 40), 0.2, 42, 1000) != 0).view(2, 3, 40)[..., :37]
    assert torch.equal(_ext._C.attention_dropout_mask_cpu(2, 1, 3, 37, 0.2, 42, 1000).view(2, 3, 37), flat)


@needs_cpu
@pytest.mark.parametrize("S, offset", [(37, 2**40 + 1), (130, 2**32 - 301), (37, 2**40 + 4), (130, 2**32 - 300)])
def test_attention_masks_agree_across_backends(S, offset):
    """The CPU and Triton attention kernels drop the same (b, h, i, j): rows starting inside a Philox counter's four
    words (an offset that is no multiple of 4: Triton draws one key per evaluation) or at their first (four keys per
    evaluation, the API's offsets), a 2**32 carry crossed."""
    from fastattn.ops.attention import dispatch as A
    p = A.AttnParams(scale=1.0, dropout_p=0.3, seed=2**40 + 17, offset=offset)
    cpu, tri = (A.dropout_mask(b, p, 2, 3, 5, S, backend_device(b)).cpu() for b in ("cpu", "triton"))
    assert torch.equal(cpu, tri) and abs(cpu.float().mean().item() - 0.7) < 0.05
    # (batch, head) pairs past a CUDA grid's axis z go in several launches: the same mask (here 4 pairs a launch)
    from fastattn.kernels import attention as K
    assert torch.equal(K.dropout_mask(p, 2, 3, 5, S, backend_device("triton"), grid_z=4).cpu(), tri)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_backward_regenerates_the_mask(backend):
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("no CPU dropout kernel")
    with fastattn.backend(backend):
        x = torch.randn(64, 33, requires_grad=True)
        torch.manual_seed(5)
        y = dropout(x * 1.0, 0.4)
        g = torch.randn_like(y)
        y.backward(g)
        keep = y != 0
        assert torch.equal(x.grad, g * keep * _scale(0.4, torch.float32))
        torch.manual_seed(5)  # torch.manual_seed reproduces the mask; another draw gives another one
        assert torch.equal(dropout(x, 0.4), y) and not torch.equal(dropout(x, 0.4), y)
        xd = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
        fn = lambda t: DropoutFunction.apply(t, 0.3, 11, 22, False)  # noqa: E731 - a fixed mask for gradcheck
        assert torch.autograd.gradcheck(fn, (xd,)) and torch.autograd.gradgradcheck(fn, (xd,))


@needs_cpu
def test_in_place_and_strided_inputs():
    base = torch.randn(40, 50, requires_grad=True)
    h = base * 2.0
    torch.manual_seed(0)
    out = dropout(h, 0.5, inplace=True)
    assert out is h and h._version > 0
    torch.manual_seed(0)
    assert torch.equal(dropout(base.detach() * 2.0, 0.5), out)
    out.sum().backward()
    assert torch.equal(base.grad, 2.0 * (out != 0) * 2.0)
    t = torch.randn(30, 20).t()  # non-contiguous: computed on a contiguous copy
    torch.manual_seed(1)
    y = dropout(t, 0.5)
    torch.manual_seed(1)
    assert torch.equal(y, dropout(t.contiguous(), 0.5))
    torch.manual_seed(1)
    assert dropout(t, 0.5, inplace=True) is t and torch.equal(t, y)
    leaf = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        dropout(leaf, 0.5, inplace=True)  # torch's own error


def test_edge_cases_as_torch():
    x = torch.randn(8, 9, requires_grad=True)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    z = dropout(x, 1.0)
    assert torch.equal(z, F.dropout(x, 1.0)) and not z.any()
    z.sum().backward()
    assert not x.grad.any()
    nan = torch.full((1000,), float("nan"))
    assert torch.isnan(dropout(nan, 0.5)).all()  # NaN * 0 = NaN, as torch's multiply gives
    ints = torch.arange(10)
    with pytest.raises(RuntimeError):
        F.dropout(ints, 0.5)
    with pytest.raises(RuntimeError):
        dropout(ints, 0.5)  # torch's refusal, from torch
    for bad in (-0.1, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match="p: dropout probability has to be between 0 and 1"):
            dropout(x, bad)
    with pytest.raises(TypeError, match="x: expected a tensor"):
        dropout([1.0, 2.0], 0.5)


def test_under_torch_func_and_compile_it_is_torchs():
    x = torch.ones(3, 1000)
    y = torch.func.vmap(lambda t: dropout(t, 0.5), randomness="different")(x)
    assert y.shape == x.shape and not torch.equal(y[0], y[1])
    assert set(y.unique().tolist()) <= {0.0, 2.0}


@needs_cpu
def test_binding_bad_input():
    C = _ext._C
    x = torch.randn(10)
    for args, needle in [((x, torch.empty(10, dtype=torch.float64), 0.1, 1, 2), "out must have x's dtype"),
                         ((x, torch.empty(9), 0.1, 1, 2), "out must have x's 10 elements"),
                         ((x, torch.empty(10), 1.0, 1, 2), "p must be in [0, 1)"),
                         ((torch.randn(4, 4).t(), torch.empty(16), 0.1, 1, 2), "x must be contiguous"),
                         ((torch.arange(10), torch.empty(10, dtype=torch.long), 0.1, 1, 2), "unsupported dtype")]:
        with pytest.raises(RuntimeError, match="dropout_cpu: " + needle.replace("[", r"\[").replace(")", r"\)")):
            C.dropout_cpu(*args)


@needs_cpu
@pytest.mark.parametrize("env", [{"FASTATTN_CPU_NO_AVX512": "1"}, {"FASTATTN_CPU_NO_AVX2": "1"}],
                         ids=["avx2", "portable"])
def test_cpu_code_paths(env):
    """The kernel chooses AVX-512, AVX2 or portable Philox at run time (once per process): fresh processes with the
    faster paths off keep the same elements as Triton."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "same_elements or agree or values_and_keep_rate and cpu"],
                       env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@needs_cpu
def test_transformer_layers_and_models_use_it():
    """fastattn.nn's Transformer layers and fastattn.models drop with this kernel (no torch bernoulli_ in a training
    step); the models' backend="torch" keeps torch's dropout for A/B runs."""
    from fastattn.models import GPT, GPTConfig

    def events(fn):
        with torch.autograd.profiler.profile() as prof:
            fn()
        return {e.name for e in prof.function_events}

    layer = fastattn.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.2, batch_first=True)
    x = torch.randn(2, 10, 32)
    names = events(lambda: layer(x).sum().backward())
    assert "aten::bernoulli_" not in names and "DropoutFunctionEager" in names
    ids = torch.randint(0, 50, (2, 12))
    for backend, ours in (("fastattn", True), ("torch", False)):
        gpt = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=1, n_head=4, max_seq_len=16, dropout=0.1,
                            backend=backend))
        names = events(lambda: gpt(ids, labels=ids).loss.backward())
        assert ("DropoutFunctionEager" in names) == ours and ("aten::bernoulli_" in names) != ours
