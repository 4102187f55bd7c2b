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
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.LayerNorm(16)(torch.randn(3, 8))
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.AddLayerNorm((4, 4))
