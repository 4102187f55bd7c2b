"""Property tests: any leading shape and width, with and without each optional input, on the default backend."""
import torch
from hypothesis import given, settings, strategies as st

import fastattn
from fastattn.reference import add_norm_ref


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=3), width=st.integers(1, 300),
       residual=st.booleans(), weight=st.booleans(), bias=st.booleans(), is_rms=st.booleans(),
       prenorm=st.booleans(), seed=st.integers(0, 2**16))
def test_default_backend_matches_reference(lead, width, residual, weight, bias, is_rms, prenorm, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, width)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    w = torch.randn(width, generator=g, dtype=torch.float64) if weight else None
    b = torch.randn(width, generator=g, dtype=torch.float64) if bias and not is_rms else None
    args = [t.float() if t is not None else None for t in (x, r, w, b)]
    if is_rms:
        out = fastattn.add_rms_norm(args[0], args[1], args[2], 1e-6, prenorm=prenorm)
    else:
        out = fastattn.add_layer_norm(*args, 1e-5, prenorm=prenorm)
    ref = add_norm_ref(x, r, w, b, 1e-6 if is_rms else 1e-5, is_rms=is_rms, prenorm=prenorm)
    outs, refs = (out, ref) if prenorm else ((out,), (ref,))
    for o, e in zip(outs, refs):
        assert o.shape == e.shape and o.dtype == torch.float32
        torch.testing.assert_close(o.double(), e, atol=1e-4, rtol=1e-4)
