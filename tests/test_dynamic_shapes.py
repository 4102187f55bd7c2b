"""Dynamic shapes under torch.compile(dynamic=True) and torch.export with symbolic dims: the attention entry points
trace without specialising (math.isfinite on a symbolic softcap / scale was untraceable) and without guarding
the sequence length (the decode route's "L <= 16" bound an exported sequence dim): as torch's own modules do."""
import copy

import pytest
import torch
from torch import nn
from torch.export import Dim, export

import fastattn
from conftest import assert_bounded

E, H = 16, 4


def _pair(cls, *args, **kw):
    torch.manual_seed(0)
    theirs = getattr(nn, cls)(*args, **kw)
    ours = getattr(fastattn.nn, cls)(*args, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_sdpa_compiles_with_dynamic_shapes():
    f = torch.compile(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, scale=0.3), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    for L, S in ((5, 7), (9, 3), (2, 40)):
        q, k, v = torch.randn(2, H, L, 8), torch.randn(2, H, S, 8), torch.randn(2, H, S, 8)
        torch.testing.assert_close(f(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))


@pytest.mark.parametrize("training", [False, True])
def test_modules_compile_with_dynamic_shapes(training):
    for cls, args, call in (("MultiheadAttention", (E, H), lambda m, x: m(x, x, x, need_weights=False)[0]),
                            ("TransformerEncoderLayer", (E, H, 32), lambda m, x: m(x))):
        ours, theirs = _pair(cls, *args, dropout=0.0, batch_first=True)
        ours.train(training), theirs.train(training)
        c = torch.compile(lambda x: call(ours, x), fullgraph=True, dynamic=True, backend="aot_eager")
        for L in (5, 11):
            x = torch.randn(2, L, E, requires_grad=training)
            y = c(x)
            assert_bounded(f"{cls} L={L}", y, call(_double(theirs), x.double()), call(theirs, x), torch.float32)
            if training:
                (g,) = torch.autograd.grad(y.square().sum(), x)
                (want,) = torch.autograd.grad(call(theirs, x).square().sum(), x)
                torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)


def _double(m):
    return copy.deepcopy(m).double()


def test_strict_export_with_a_dynamic_sequence_dim():
    class M(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    ours, theirs = _pair("MultiheadAttention", E, H, batch_first=True)
    ours.eval(), theirs.eval()
    ep = export(M(ours), (torch.randn(2, 5, E),), dynamic_shapes=({1: Dim("s", min=3, max=32)},), strict=True)
    for L in (3, 17, 32):
        x = torch.randn(2, L, E)
        assert_bounded(f"L={L}", ep.module()(x), _double(theirs)(*(x.double(),) * 3, need_weights=False)[0],
                       theirs(x, x, x, need_weights=False)[0], torch.float32)


def test_compiled_decode_keeps_the_split_kv_kernel_as_the_cache_grows():
    """Under torch.compile (default: the growing cache length turns dynamic after a recompile) one query against a
    long cache still runs the decode kernel; only torch.export decides without guarding on the sizes. The export
    fix routed every dynamic call to the flash kernel."""
    from torch.profiler import ProfilerActivity, profile
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: fastattn.attention(q, k, v) * 2, backend="eager")
    ran = []
    with torch.no_grad():
        for S in range(64, 68):
            q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                torch.testing.assert_close(f(q, k, v), 2 * torch.nn.functional.scaled_dot_product_attention(q, k, v))
            ran.append({e.name for e in prof.events() if e.name.startswith("fastattn::")})
    assert all(names == {"fastattn::decode_attention"} for names in ran), ran
