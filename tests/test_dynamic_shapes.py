"""Dynamic shapes under torch.compile(dynamic=True) and torch.export with symbolic dims: the attention entry points
trace without specialising (math.isfinite on a symbolic softcap / scale was untraceable) and without guarding
the sequence length (the decode route's "L <= 16" bound an exported sequence dim): as torch's own modules do."""
import copy

import pytest
import torch
from torch import nn
from torch.export import Dim, export

import fastattn
from conftest import HAS_GPU, assert_bounded

E, H = 16, 4
# cpu always; cuda (the compiled / exported programs run the GPU's kernels) marked gpu, skipped without one
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")])]


def _pair(cls, *args, device="cpu", **kw):
    torch.manual_seed(0)
    theirs = getattr(nn, cls)(*args, **kw)
    ours = getattr(fastattn.nn, cls)(*args, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours.to(device), theirs.to(device)


def _randn(*shape, device="cpu", requires_grad=False):
    """torch.randn(*shape) drawn on the CPU (the CPU tests' numbers), moved to device."""
    return torch.randn(*shape).to(device).requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_compiles_with_dynamic_shapes(device):
    f = torch.compile(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, scale=0.3), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    for L, S in ((5, 7), (9, 3), (2, 40)):
        q, k, v = (_randn(2, H, n, 8, device=device) for n in (L, S, S))
        got = f(q, k, v)
        torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
        if device != "cpu":  # and the eager call's result (the same kernel)
            torch.testing.assert_close(got, fastattn.scaled_dot_product_attention(q, k, v, scale=0.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True])
def test_modules_compile_with_dynamic_shapes(training, device):
    for cls, args, call in (("MultiheadAttention", (E, H), lambda m, x: m(x, x, x, need_weights=False)[0]),
                            ("TransformerEncoderLayer", (E, H, 32), lambda m, x: m(x))):
        ours, theirs = _pair(cls, *args, dropout=0.0, batch_first=True, device=device)
        ours.train(training), theirs.train(training)
        c = torch.compile(lambda x: call(ours, x), fullgraph=True, dynamic=True, backend="aot_eager")
        for L in (5, 11):
            x = _randn(2, L, E, device=device, requires_grad=training)
            y = c(x)
            assert_bounded(f"{cls} L={L}", y, call(_double(theirs), x.double()), call(theirs, x), torch.float32)
            if device != "cpu":  # and the eager module's result
                torch.testing.assert_close(y, call(ours, x))
            if training:
                (g,) = torch.autograd.grad(y.square().sum(), x)
                (want,) = torch.autograd.grad(call(theirs, x).square().sum(), x)
                torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)


def _double(m):
    return copy.deepcopy(m).double()


@pytest.mark.parametrize("device", DEVICES)
def test_strict_export_with_a_dynamic_sequence_dim(device):
    class M(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    ours, theirs = _pair("MultiheadAttention", E, H, batch_first=True, device=device)
    ours.eval(), theirs.eval()
    ep = export(M(ours), (_randn(2, 5, E, device=device),), dynamic_shapes=({1: Dim("s", min=3, max=32)},),
                strict=True)
    for L in (3, 17, 32):
        x = _randn(2, L, E, device=device)
        got = ep.module()(x)
        assert_bounded(f"L={L}", got, _double(theirs)(*(x.double(),) * 3, need_weights=False)[0],
                       theirs(x, x, x, need_weights=False)[0], torch.float32)
        if device != "cpu":  # and the eager module's result
            torch.testing.assert_close(got, M(ours)(x))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_keeps_the_split_kv_kernel_as_the_cache_grows(device):
    """Under torch.compile (default: the growing cache length turns dynamic after a recompile) one query against a
    long cache still runs the decode kernel; only torch.export decides without guarding on the sizes. The export
    fix routed every dynamic call to the flash kernel. (On the GPU from its own MIN_KEYS: the Triton decode kernel.)"""
    from torch.profiler import ProfilerActivity, profile

    from fastattn.ops.attention.decode import MIN_KEYS
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: fastattn.attention(q, k, v) * 2, backend="eager")
    ran = []
    first = max(64, MIN_KEYS[device])
    with torch.no_grad():
        for S in range(first, first + 4):
            q, k, v = (_randn(1, 2, n, 8, device=device) for n in (1, S, S))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                torch.testing.assert_close(f(q, k, v), 2 * torch.nn.functional.scaled_dot_product_attention(q, k, v))
            ran.append({e.name for e in prof.events() if e.name.startswith("fastattn::")})
    assert all(names == {"fastattn::decode_attention"} for names in ran), ran
