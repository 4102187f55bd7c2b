"""Double backward (a backward with create_graph=True: gradient penalties, MAML, Hessian-vector products). The
kernels' gradients have no graph of their own, so these ops recompute the reference's forward there and let autograd
differentiate it (attention, add+norm without a kept residual sum) or refuse with a RuntimeError naming the case;
before, a second derivative came back silently wrong or None."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck

import fastattn
import fastattn.nn as fnn
from conftest import backend_device


def randn(*shape, seed=0, dtype=torch.float64, dev="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(dev)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(mask=True), dict(gqa=True)],
                         ids=["plain", "causal", "mask", "gqa"])
def test_attention_gradgradcheck(backend_name, kw):
    q, k = randn(1, 2, 3, 4, seed=1), randn(1, 1 if kw.get("gqa") else 2, 5, 4, seed=2)
    v = randn(1, k.shape[1], 5, 3, seed=3)
    mask = randn(3, 5, seed=4) if kw.get("mask") else None

    def f(q, k, v):
        with fastattn.backend(backend_name):
            return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kw.get("is_causal", False),
                                                         enable_gqa=bool(kw.get("gqa")))
    assert gradgradcheck(f, [t.requires_grad_() for t in (q, k, v)])


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
def test_attention_create_graph_keeps_the_dropout_mask(backend_name):
    """Under create_graph the gradients are the reference's on the mask the forward's kernel drew: equal to the
    kernel's own backward on the same call."""
    dev = backend_device(backend_name)
    dt = torch.float64 if backend_name != "triton" else torch.float32
    q, k, v = (randn(2, 2, 7, 8, seed=s, dtype=dt, dev=dev).requires_grad_() for s in (1, 2, 3))
    dout = randn(2, 2, 7, 8, seed=4, dtype=dt, dev=dev)
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(0)
        with fastattn.backend(backend_name):
            out = fastattn.attention(q, k, v, causal="top_left", dropout_p=0.4)
        grads.append(torch.autograd.grad(out, (q, k, v), dout, create_graph=create_graph))
    assert all(g.requires_grad for g in grads[1])
    tol = 1e-12 if dt == torch.float64 else 2e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= tol * b.abs().max()


def _penalty_grads(m, x, need_weights, pad):
    """d/d(x, parameters) of |d loss / dx|^2, loss using the output and (need_weights) the attention weights."""
    x = x.clone().requires_grad_()
    out, w = m(x, x, x, key_padding_mask=pad, need_weights=need_weights, average_attn_weights=False)
    loss = (out ** 2).sum() + ((w ** 3).sum() if need_weights else 0)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad((g ** 2).sum(), [x] + list(m.parameters()))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_mha_gradient_penalty_matches_torch(need_weights, padded):
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    o = fnn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    o.load_state_dict(t.state_dict())
    x = randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = padded
    # torch's fused CPU attention has no double backward: its math path (need_weights=True) does
    ref = _penalty_grads(t, x, True, pad) if need_weights else None
    if ref is None:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            ref = _penalty_grads(t, x, False, pad)
    for a, b in zip(_penalty_grads(o, x, need_weights, pad), ref):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
@pytest.mark.parametrize("case", ["layer", "rms", "prenorm", "prenorm_rms"])
def test_add_norm_gradgradcheck(backend_name, case):
    x, r, w, b = randn(3, 8, seed=1), randn(3, 8, seed=2), randn(8, seed=3), randn(8, seed=4)

    def f(x, r, w, b):
        with fastattn.backend(backend_name):
            if case == "layer":
                return fastattn.add_layer_norm(x, None, w, b)
            if case == "rms":
                return fastattn.add_rms_norm(x, None, w)
            norm = fastattn.add_rms_norm(x, r, w, prenorm=True) if case == "prenorm_rms" else \
                fastattn.add_layer_norm(x, r, w, b, prenorm=True)
            return norm[0] * 2 + norm[1] ** 2  # both outputs, so the residual stream's gradient is checked too
    assert gradgradcheck(f, [t.requires_grad_() for t in (x, r, w, b)])


def test_layer_norm_module_double_backward_matches_torch():
    torch.manual_seed(0)
    t, o = torch.nn.LayerNorm(8, dtype=torch.float64), fnn.LayerNorm(8, dtype=torch.float64)
    o.load_state_dict(t.state_dict())
    out = []
    for m in (t, o):
        x = randn(4, 8).requires_grad_()
        g, = torch.autograd.grad((m(x) ** 3).sum(), x, create_graph=True)
        out.append(torch.autograd.grad((g ** 2).sum(), [x] + list(m.parameters())))
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_post_norm_double_backward_through_x_is_refused():
    x, r = randn(3, 8, seed=1).requires_grad_(), randn(3, 8, seed=2).requires_grad_()
    w, b = randn(8, seed=3).requires_grad_(), randn(8, seed=4).requires_grad_()
    y = fastattn.add_layer_norm(x, r, w, b)
    with pytest.raises(RuntimeError, match="double backward.*prenorm=False"):
        torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    # the parameters' second derivatives need no x: they run
    hessians = []
    for y in (fastattn.add_layer_norm(x.detach(), r.detach(), w, b), F.layer_norm(x.detach() + r.detach(), (8,), w, b)):
        gw, = torch.autograd.grad((y ** 3).sum(), w, create_graph=True)
        hessians.append(torch.autograd.grad((gw ** 2).sum(), (w, b)))
    for a, ref in zip(*hessians):
        assert (a - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_linear_cross_entropy_double_backward_is_refused():
    x, w = randn(6, 8).requires_grad_(), randn(11, 8, seed=1).requires_grad_()
    loss = fastattn.linear_cross_entropy(x, w, torch.randint(0, 11, (6,)))
    with pytest.raises(RuntimeError, match="linear_cross_entropy: a double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
def test_varlen_gradgradcheck(backend_name):
    q, k, v = randn(7, 2, 4, seed=1), randn(9, 1, 4, seed=2), randn(9, 1, 3, seed=3)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5, 9], dtype=torch.int32)

    def f(q, k, v):
        with fastattn.backend(backend_name):
            return fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert gradgradcheck(f, [t.requires_grad_() for t in (q, k, v)])


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
def test_varlen_create_graph_keeps_the_dropout_mask(backend_name):
    dev = backend_device(backend_name)
    dt = torch.float64 if backend_name != "triton" else torch.float32
    q, k, v = (randn(9, 2, 8, seed=s, dtype=dt, dev=dev).requires_grad_() for s in (1, 2, 3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev)
    dout = randn(9, 2, 8, seed=4, dtype=dt, dev=dev)
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(0)
        with fastattn.backend(backend_name):
            out = fastattn.attention_varlen(q, k, v, cu, cu, dropout_p=0.4)
        grads.append(torch.autograd.grad(out, (q, k, v), dout, create_graph=create_graph))
    tol = 1e-12 if dt == torch.float64 else 2e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= tol * b.abs().max()
