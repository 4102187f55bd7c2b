"""torch.export (the deployment path torch recommends over TorchScript): the drop-in modules and the models export,
with dynamic batch and sequence sizes, and the exported program computes what eager does at other sizes."""
import copy

import pytest
import torch
from torch.export import Dim, export

import fastattn
import fastattn.nn as fnn
from fastattn.models import BERT, GPT, BERTConfig, GPTConfig, Seq2Seq, Seq2SeqConfig
from conftest import HAS_GPU, assert_bounded

E, H, V = 16, 4, 50
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")]
# cpu always; cuda (the programs run the GPU's kernels: Triton, CUDA C++) marked gpu, skipped without one
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def _to(args, device):
    return tuple(a if a is None else a.to(device) for a in args)


class SelfAttention(torch.nn.Module):
    def __init__(self, e=E, h=H):
        super().__init__()
        self.mha = fnn.MultiheadAttention(e, h, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def _x(B, L):
    return torch.randn(B, L, E)


def _ids(B, L):
    return torch.randint(0, V, (B, L))


def _pad(B, L):
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, -2:] = True
    return pad


# name -> (module, inputs at (B, L), which inputs have the (batch, seq) dims)
CASES = {
    "mha": (SelfAttention, lambda B, L: (_x(B, L), _pad(B, L)), (True, True)),
    "encoder-layer": (lambda: fnn.TransformerEncoderLayer(E, H, 32, batch_first=True), lambda B, L: (_x(B, L),),
                      (True,)),
    "transformer": (lambda: fnn.Transformer(E, H, 1, 1, 32, batch_first=True), lambda B, L: (_x(B, L), _x(B, L)),
                    (True, True)),
    "layernorm": (lambda: fnn.LayerNorm(E), lambda B, L: (_x(B, L),), (True,)),
    "gpt": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, max_seq_len=32)),
            lambda B, L: (_ids(B, L),), (True,)),
    "gpt-rope-gqa": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, n_kv_head=2, pos="rotary",
                                           max_seq_len=32)), lambda B, L: (_ids(B, L),), (True,)),
    "bert": (lambda: BERT(BERTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, max_seq_len=32)),
             lambda B, L: (_ids(B, L),), (True,)),
    "seq2seq": (lambda: Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, max_seq_len=32)),
                lambda B, L: (_ids(B, L), None, _ids(B, L)), (True, False, True)),  # (source, mask, decoder inputs)
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_export_with_dynamic_batch_and_sequence(case, device):
    make, inputs, dynamic = CASES[case]
    torch.manual_seed(0)
    m = make().eval().to(device)
    b, s = Dim("b", min=1, max=16), Dim("s", min=3, max=32)
    shapes = tuple({0: b, 1: s} if d else None for d in dynamic)
    program = export(m, _to(inputs(2, 5), device), dynamic_shapes=shapes)
    for B, L in ((2, 5), (3, 17), (1, 32)):  # past the decode route's 16 queries: one program for every size
        args = _to(inputs(B, L), device)
        got = _logits(program.module()(*args))
        assert got.device.type == device
        torch.testing.assert_close(got, _logits(m(*args)), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_export_runs_each_gpu_backend(backend):
    """A bf16 MultiheadAttention of head dim 32 (one the CUDA C++ kernel takes) with a key padding mask, exported with
    dynamic sizes and run under the backend forced (the custom op reads it when the program runs; a kernel that
    cannot run raises): within 2x the eager module's own bf16 error (same backend) of the float64 CPU result."""
    torch.manual_seed(0)
    m = SelfAttention(64, 2).eval()
    ref = copy.deepcopy(m).double()
    m = m.to("cuda", torch.bfloat16)
    b, s = Dim("b", min=1, max=16), Dim("s", min=3, max=64)
    program = export(m, _to((torch.randn(2, 5, 64).bfloat16(), _pad(2, 5)), "cuda"),
                     dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    for B, L in ((2, 5), (3, 40)):
        x, pad = torch.randn(B, L, 64), _pad(B, L)
        args = _to((x.bfloat16(), pad), "cuda")
        with fastattn.backend(backend), torch.no_grad():
            got, eager = program.module()(*args), m(*args)
        with torch.no_grad():
            want = ref(x.double(), pad)
        assert_bounded(f"{backend} B={B} L={L}", got.cpu(), want, eager.cpu(), torch.bfloat16)


class _WideNorms(torch.nn.Module):
    """A LayerNorm wider than add_norm.NATIVE_MAX_COLS, add_layer_norm with prenorm, linear_cross_entropy: the CPU
    shape rules (torch's ops for small problems) must not guard a dynamic dimension."""

    def __init__(self):
        super().__init__()
        self.norm, self.head = fnn.LayerNorm(128), torch.nn.Linear(128, 30, bias=False)

    def forward(self, x, t):
        y, s = fastattn.add_layer_norm(self.norm(x), x, self.norm.weight, self.norm.bias, prenorm=True)
        return fastattn.linear_cross_entropy((y + s).flatten(0, 1), self.head.weight, t.flatten())


@pytest.mark.parametrize("device", DEVICES)
def test_export_shape_rules_keep_dynamic_dims(device):
    """(On the GPU: its own rules, the add+norm kernel's choice by size among them, must not guard either.)"""
    torch.manual_seed(0)
    m = _WideNorms().to(device)
    b = Dim("b")  # (unbounded: a size test on it would have to guard)
    program = export(m, _to((torch.randn(2, 5, 128), torch.randint(0, 30, (2, 5))), device),
                     dynamic_shapes=({0: b}, {0: b}))
    for B in (1, 3, 40):
        x, t = _to((torch.randn(B, 5, 128), torch.randint(0, 30, (B, 5))), device)
        torch.testing.assert_close(program.module()(x, t), m(x, t))


def test_export_int8_linear():
    torch.manual_seed(0)
    q = fnn.Int8Linear.from_float(torch.nn.Linear(E, 8), "w8a16")
    x = _x(2, 5)
    assert torch.equal(export(q, (x,)).module()(x), q(x))


# ---- training an exported program: the custom ops' own autograd formulas (export keeps no autograd.Function's
# backward: non-strict records the ops bare, strict runs the Function without grad) -------------------------------
class _NormAttention(torch.nn.Module):
    """torch's Linear, LayerNorm, MultiheadAttention and TransformerEncoderLayer (fastattn.convert swaps the last
    three), and fastattn.add_layer_norm with a residual (prenorm: s is an output)."""

    def __init__(self, layer: bool = True):
        super().__init__()
        self.lin = torch.nn.Linear(E, E)
        self.norm = torch.nn.LayerNorm(E)
        self.mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.layer = torch.nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True) if layer else None

    def forward(self, x):
        h = self.norm(self.lin(x))
        y, s = fastattn.add_layer_norm(h, x, self.norm.weight, prenorm=True)
        h = self.mha(y, y, y, need_weights=False)[0] + s
        return h if self.layer is None else self.layer(h)


class _ProjectedSDPA(torch.nn.Module):
    """fastattn.scaled_dot_product_attention between torch projections, and fastattn.add_rms_norm (prenorm: eager
    has a double backward for it)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(E, 3 * E)
        self.weight = torch.nn.Parameter(torch.rand(E) + 0.5)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D)
        y, s = fastattn.add_rms_norm(out.transpose(1, 2).reshape(x.shape), x, self.weight, prenorm=True)
        return y * s


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def _check_exported_training(m, x, strict, loss=lambda y: y.pow(2).sum(), device="cpu"):
    """The exported program of m computes m's output and, through backward, m's parameter gradients (eager
    fastattn's, every one present). On the GPU (m and x moved there) the outputs to float32 rounding, not bit for
    bit: eager and the program may reach cuBLAS for the projections through different calls."""
    m, x = m.to(device), x.to(device)
    exported = copy.deepcopy(m)
    gm = export(exported, (x,), strict=strict).module()
    y = gm(x)
    assert y.device.type == device
    torch.testing.assert_close(y, m(x), **(dict(rtol=0, atol=0) if device == "cpu" else {}))
    loss(y).backward()
    loss(m(x)).backward()
    got, want = _grads(gm), _grads(m)
    assert [n for n, g in got.items() if g is None] == []
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


@pytest.mark.parametrize("strict", [False, True])
def test_exported_program_trains_like_eager_linear_layernorm(strict):
    torch.manual_seed(0)
    m = fastattn.convert(torch.nn.Sequential(torch.nn.Linear(E, E), torch.nn.LayerNorm(E), torch.nn.Linear(E, 4)))
    _check_exported_training(m, _x(3, 5), strict)


@pytest.mark.parametrize("device", DEVICES)
def test_exported_program_trains_like_eager_mha_and_encoder_layer(device):
    torch.manual_seed(0)
    _check_exported_training(fastattn.convert(_NormAttention()), _x(2, 5), strict=False, device=device)


def test_strict_exported_program_trains_like_eager_mha():
    """Strict export runs an autograd.Function's forward without grad: MultiheadAttention's projections and the
    encoder layer's FFN (_RowLinear) are plain F.linear under export."""
    torch.manual_seed(0)
    _check_exported_training(fastattn.convert(_NormAttention()), _x(2, 5), strict=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strict", [False, True])
def test_exported_program_trains_like_eager_attention_op(strict, device):
    torch.manual_seed(0)
    _check_exported_training(_ProjectedSDPA(), _x(2, 5), strict, device=device)


class _MHAWeights(torch.nn.Module):
    """MultiheadAttention returning its attention weights (averaged or per head), under a bool or float mask."""

    def __init__(self, mask, average):
        super().__init__()
        self.lin, self.mha, self.mask, self.average = torch.nn.Linear(E, E), fnn.MultiheadAttention(E, H), mask, average

    def forward(self, x):
        h = self.lin(x)
        out, w = self.mha(h, h, h, attn_mask=self.mask, average_attn_weights=self.average)
        return torch.cat([out.flatten(), (w * torch.arange(float(w.shape[-1]))).flatten()])


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_exported_program_trains_like_eager_mha_weights(strict, mask):
    """need_weights=True: the weights are built from torch ops under export (strict export's trace of the weights'
    autograd.Function gave wrong gradients, non-strict export's a failed backward over its in-place ops)."""
    torch.manual_seed(0)
    m = {None: None, "bool": torch.rand(5, 5) > 0.6, "float": torch.randn(5, 5)}[mask]
    if mask == "bool":
        m.fill_diagonal_(False)  # (True: masked out, as in torch)
    x = _x(5, 2)
    for average in (True, False):
        eager = _MHAWeights(m, average)
        gm = export(copy.deepcopy(eager), (x,), strict=strict).module()
        y, want = gm(x), eager(x)
        torch.testing.assert_close(y, want)  # (the weights by torch ops: not bit-equal to the kernel's lse route)
        y.pow(2).sum().backward()
        want.pow(2).sum().backward()
        got = _grads(gm)
        for n, g in _grads(eager).items():
            torch.testing.assert_close(got[n], g, msg=n)


def test_exported_program_double_backward_like_eager():
    """A gradient penalty (create_graph=True) through the exported attention and norms: the ops' backward with a
    graph of its own, as eager's."""
    torch.manual_seed(0)
    m, x = _ProjectedSDPA(), _x(2, 5).requires_grad_()
    gm = export(copy.deepcopy(m), (x,)).module()

    def penalty(f):
        dx, = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        dx.pow(2).sum().backward()
        return {n: p.grad for n, p in f.named_parameters()}

    got, want = penalty(gm), penalty(m)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


class _LMHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(E, E)
        self.head = torch.nn.Linear(E, V)

    def forward(self, x, target):
        return fastattn.linear_cross_entropy(self.lin(x), self.head.weight, target, self.head.bias)


@pytest.mark.parametrize("strict", [False, True])
def test_exported_program_trains_like_eager_linear_cross_entropy(strict):
    torch.manual_seed(0)
    m, x, t = _LMHead(), _x(2, 5), _ids(2, 5)
    t[0, :2] = -100  # ignored
    gm = export(copy.deepcopy(m), (x, t), strict=strict).module()
    loss = gm(x, t)
    torch.testing.assert_close(loss, m(x, t), rtol=0, atol=0)
    loss.backward()
    m(x, t).backward()
    got = _grads(gm)
    for n, g in _grads(m).items():
        torch.testing.assert_close(got[n], g, msg=n)
    t[:] = -100  # a mean over no target: nan, its gradients 0 (as eager's)
    gm.zero_grad()
    loss = gm(x, t)
    loss.backward()
    assert loss.isnan() and all(bool((p.grad == 0).all()) for p in gm.parameters())


class _PostNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(E, E)

    def forward(self, x):
        return fastattn.add_layer_norm(self.lin(x), x)


def test_exported_add_norm_traced_without_grad_refuses_backward():
    """Traced under no_grad, the op kept no x + residual: training the program raises, gradients are not lost."""
    m, x = _PostNorm(), _x(2, 5)
    with torch.no_grad():
        gm = export(m, (x,)).module()
    with pytest.raises(RuntimeError, match="kept no x \\+ residual"):
        gm(x).sum().backward()


def test_linear_cross_entropy_op_refuses_unequal_loss_gradients():
    """The op's weight gradient is a sum over the rows: per-row loss weights cannot be applied, and raise."""
    x, w, t = _x(1, 6)[0].requires_grad_(), torch.randn(V, E, requires_grad=True), _ids(1, 6)[0]
    need = (True, True, False)  # x, w, bias
    losses = torch.ops.fastattn.linear_cross_entropy_fwd(x, w, None, t, -100, 4, torch.float32, *need, "")[0]
    with pytest.raises(RuntimeError, match="gradients differ"):
        (losses * torch.arange(6.0)).sum().backward()
