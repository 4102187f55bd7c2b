"""INT8 matmul and quantization on every backend: exact int32 accumulators, epilogue within float tolerance,
quantization bit-exact with the reference; Int8Linear within its quantization-step bound; SmoothQuant; QAT."""
import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.nn import Int8Linear
from fastattn.reference import int8_matmul_ref, quantize_rows_ref, w8a16_matmul_ref
from conftest import assert_bounded, backend_device, backend_params, skip_if_not_built

BK = pytest.mark.parametrize("backend_name", backend_params(), indirect=True)
SHAPES = [(1, 1, 1), (7, 13, 5), (129, 65, 100), (33, 129, 257), (64, 64, 4096), (3, 37, 4101)]


def int8(shape, gen, device):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).to(device)


@BK
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int32_accumulator_is_exact(backend_name, M, N, K):
    skip_if_not_built(backend_name, "int8_mm")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(M * N + K)
    a, b = int8((M, K), g, dev), int8((N, K), g, dev)
    a[0, :] = -128  # extremes: |acc| up to K * 2**14
    b[0, :] = -128
    with fastattn.backend(backend_name):
        acc = fastattn.int8_matmul(a, b, out_dtype=torch.int32)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.cpu(), int8_matmul_ref(a.cpu(), b.cpu(), out_dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: autotuned configs exist on GPU only")
def test_every_triton_config_is_exact():
    from fastattn.kernels import int8 as k
    g = torch.Generator().manual_seed(0)
    a, b = int8((300, 1000), g, "cuda"), int8((200, 1000), g, "cuda")
    ref = int8_matmul_ref(a.cpu(), b.cpu(), out_dtype=torch.int32)
    for config in k._mm_configs(all_configs=True):
        assert torch.equal(k.int8_mm_with_config(a, b, config).cpu(), ref), str(config)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton needs a GPU or its interpreter")
def test_every_decode_tile_is_exact():
    """Each tile the GPU may autotune the small-M (decode) kernel to: exact int32 sums (W8A8) and W8A16 within fp32
    rounding, over an N and K that no tile divides."""
    from fastattn.kernels import int8 as k
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    a, b = int8((3, 4101), g, dev), int8((37, 4101), g, dev)
    x = torch.randn(3, 4101, generator=g).to(torch.bfloat16).to(dev)
    ones = torch.ones(37, device=dev)
    ref = int8_matmul_ref(a.cpu(), b.cpu(), out_dtype=torch.int32)
    ref16 = x.cpu().double() @ b.cpu().double().T
    bound16 = 4101 * 2.0**-24 * (x.cpu().double().abs() @ b.cpu().double().abs().T)  # fp32 summation: K * eps * sum|.|
    for tile in k._SMALL_M_TILES:
        out = k._small_m(a, b, torch.empty(3, 37, dtype=torch.int32, device=dev), None, None, None, tile)
        assert torch.equal(out.cpu(), ref), tile
        out = k._small_m(x, b, torch.empty(3, 37, dtype=torch.float32, device=dev), None, ones, None, tile)
        assert ((out.cpu().double() - ref16).abs() <= bound16).all(), tile


@BK
@pytest.mark.parametrize("M, N, K", SHAPES[:4] + SHAPES[5:])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("scales", ["vector", "scalar", "none", "bias"])
def test_epilogue(backend_name, M, N, K, out_dtype, scales):
    skip_if_not_built(backend_name, "int8_mm")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(K)
    a, b = int8((M, K), g, dev), int8((N, K), g, dev)
    sa = (torch.rand(M, generator=g) / 1000).to(dev)
    sb = (torch.rand(N, generator=g) / 100).to(dev)
    bias = torch.randn(N, generator=g).to(dev) if scales == "bias" else None
    if scales == "scalar":
        sa, sb = 0.003, torch.tensor(0.002, device=dev)
    elif scales == "none":
        sa = sb = None
    with fastattn.backend(backend_name):
        out = fastattn.int8_matmul(a, b, sa, sb, bias, out_dtype=out_dtype)
    as_t = None if sa is None else torch.as_tensor(sa, device=dev, dtype=torch.float32)
    ref = int8_matmul_ref(a, b, as_t, sb, bias, torch.float64 if out_dtype == torch.float32 else out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    # same float32 epilogue as the reference: at most one rounding step of out_dtype apart
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol * ref.abs().max().item() * 1e-3 + 1e-6)


@BK
@pytest.mark.parametrize("K", [1, 7, 100, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_is_bit_exact(backend_name, K, dtype, smooth):
    skip_if_not_built(backend_name, "quantize_rows")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(9, K, generator=g) * 3).to(dtype).to(dev)
    x[1] = 0  # a zero row: scale 0, q 0
    x[2, 0] = 127 * 0.5 / 127  # ties round to even
    sm = (torch.rand(K, generator=g) + 0.5).to(dev) if smooth else None
    with fastattn.backend(backend_name):
        q, s = fastattn.quantize_per_token(x, sm)
    qr, sr = quantize_rows_ref(x, sm)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, sr), "scales differ"
    assert torch.equal(q, qr), f"{(q.int() - qr.int()).abs().max()} quantization steps off"



def _w8a16_case(M, N, K, dtype, has_bias, seed, device="cpu"):
    """x (M, K) in dtype, as the first rows of a NaN-filled buffer (a read past its end shows), int8 w (N, K),
    w_scale, bias; and the float64 result."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((M * K + 64,), float("nan"), dtype=dtype)
    x = buf[:M * K].view(M, K)
    x.copy_(torch.randn(M, K, generator=g))
    w, s = int8((N, K), g, "cpu"), torch.rand(N, generator=g) / 100
    bias = torch.randn(N, generator=g) if has_bias else None
    ref = (x.double() @ w.double().T) * s.double() + (0 if bias is None else bias.double())
    x, w, s, bias = (t if t is None else t.to(device) for t in (x, w, s, bias))
    return x, w, s, bias, ref


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
@pytest.mark.parametrize("M", [1, 3, 8, 17, 130])
@pytest.mark.parametrize("K", [100, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_w8a16(backend_name, M, K, dtype, has_bias):
    """Within twice torch's error (the float32 reference, in dtype) of the float64 result: the CPU kernel's GEMV
    (M <= 16) and GEMM paths, K tails, N = 203 past their blocks of 96 weight rows; NaN past the end of x."""
    if backend_name == "triton" and (dtype != torch.float16 or M not in (1, 17)):
        pytest.skip("triton: float16 / bfloat16 on a GPU, float16 in the interpreter (bf16 tl.dot): two sizes")
    skip_if_not_built(backend_name, "w8a16_mm")
    dev = backend_device(backend_name)
    x, w, s, bias, ref = _w8a16_case(M, 203, K, dtype, has_bias, seed=M * K, device=dev)
    with fastattn.backend(backend_name):
        out = fastattn.w8a16_matmul(x, w, s, bias)
    assert out.dtype == dtype
    assert_bounded("w8a16", out.cpu(), ref, w8a16_matmul_ref(x, w, s, bias).cpu(), dtype)


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
def test_strided_bias(backend_name):
    """A float32 bias that is a strided view (every other element of a fused vector): Triton read it as contiguous
    (off by ~2), the CPU kernels refused it."""
    skip_if_not_built(backend_name, "w8a16_mm")
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (17, 64), generator=g, dtype=torch.int8).to(dev)
    b = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8).to(dev)
    x = torch.randn(17, 64, generator=g).half().to(dev)
    sa, sb = torch.rand(17, generator=g).to(dev) / 100, torch.rand(24, generator=g).to(dev) / 100
    bias = torch.randn(48, generator=g).to(dev)[::2]
    with fastattn.backend(backend_name):
        got = fastattn.int8_matmul(a, b, sa, sb, bias, out_dtype=torch.float32)
        got16 = fastattn.w8a16_matmul(x, b, sb, bias)
    torch.testing.assert_close(got, int8_matmul_ref(a, b, sa, sb, bias.contiguous(), out_dtype=torch.float32))
    torch.testing.assert_close(got16, w8a16_matmul_ref(x, b, sb, bias.contiguous()))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M", [4, 12, 300])
def test_w8a16_cpu_schedule(threads, M):
    """The CPU w8a16 kernel at 1-3 threads (more than cores) over N = 1000 weight rows (not a multiple of its
    blocks of 96) and K = 3001: GEMV with one group of rows (M = 4) and two (M = 12 > 8), and GEMM with K in blocks
    of 256 and two passes over the rows of x (M = 300 > 256)."""
    skip_if_not_built("cpu", "w8a16_mm")
    x, w, s, bias, ref = _w8a16_case(M, 1000, 3001, torch.float32, True, seed=threads * M)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastattn.backend("cpu"):
            out = fastattn.w8a16_matmul(x, w, s, bias)
    finally:
        torch.set_num_threads(before)
    assert_bounded("w8a16", out, ref, w8a16_matmul_ref(x, w, s, bias), torch.float32)


def test_int8linear_within_quantization_bound():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(3, 17, 256)
    q = Int8Linear.from_float(lin)
    y, yf = q(x), lin(x)
    # |dy| <= 1/2 s_w[n] sum|x| + 1/2 s_x[m] sum|W[n]| + K/4 s_x s_w  (rounding of x and W to their int8 grids)
    _, s_x = quantize_rows_ref(x)
    s_w = q.weight_scale
    bound = (0.5 * s_w * x.abs().sum(-1, keepdim=True) + 0.5 * s_x[..., None] * lin.weight.abs().sum(-1)
             + 0.25 * 256 * s_x[..., None] * s_w)
    err = (y - yf).abs()
    assert (err <= bound * 1.001 + 1e-5).all(), f"max excess {(err - bound).max():.3g}"
    assert err.max() > 0  # it did quantize


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_static", "w8a16"])
def test_int8linear_modes_and_state_dict(mode):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    q = Int8Linear.from_float(lin, mode, input_scale=x.abs().max().item() / 127)
    y = q(x)
    assert y.shape == (8, 32) and y.dtype == x.dtype
    assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()
    q2 = Int8Linear(64, 32, mode=mode)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), y)
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias", "input_scale"}


def test_int8linear_bias_is_float32_and_exact():
    """The bias is kept in the epilogue's float32 (no cast kernel per call); a bf16 layer's bias converts exactly,
    and a layer built with a bf16 bias (dtype=) still computes through float32 vectors."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    q = Int8Linear.from_float(lin)
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, lin.bias.float())
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    xq, sx = fastattn.quantize_per_token(x)
    expect = fastattn.int8_matmul(xq, q.weight, sx, q.weight_scale, lin.bias, out_dtype=torch.bfloat16)
    assert torch.equal(q(x), expect)
    q16 = Int8Linear(64, 32, dtype=torch.bfloat16)  # a bf16 bias: converted per call
    q16.load_state_dict(q.state_dict())
    assert q16.bias.dtype == torch.bfloat16
    expect16 = fastattn.int8_matmul(xq, q.weight, sx, q16.weight_scale, q16.bias, out_dtype=torch.bfloat16)
    assert torch.equal(q16(x), expect16)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                                  lambda m: m.to("meta", torch.bfloat16)], ids=["bf16", "half", "double", "meta"])
def test_int8linear_casts_keep_float32_buffers(cast):
    """Casting a model (model.to(bfloat16), .half()) keeps an Int8Linear's scales, smooth and bias float32, as
    from_pretrained(dtype=...) and torch.ao's quantized Linear do (they were rounded to 16 bits: up to 3.5e-3 of a
    weight scale); a device move still moves them."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = Int8Linear.from_float(lin, "w8a8_static", smooth=torch.rand(64) + 0.5, input_scale=0.0123)
    names = ("weight_scale", "input_scale", "smooth", "bias")
    before = {n: getattr(q, n).clone() for n in names}
    assert not torch.equal(before["weight_scale"].bfloat16().float(), before["weight_scale"])  # a cast rounds them
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    y = q(x)
    m = cast(nn.Sequential(q))
    assert m[0] is q and q.weight.dtype == torch.int8
    for n in names:
        buf = getattr(q, n)
        assert buf.dtype == torch.float32 and buf.device == q.weight.device, n
        assert buf.is_meta or torch.equal(buf, before[n]), n
    assert q.weight.is_meta or torch.equal(q(x), y)


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_static", "w8a16"])
def test_int8linear_compiles_without_graph_breaks(mode):
    """torch.compile traces Int8Linear through the registered custom ops (fullgraph: no break) and matches eager."""
    torch.manual_seed(0)
    q = Int8Linear.from_float(nn.Linear(64, 32), mode, input_scale=0.03)
    x = torch.randn(3, 5, 64)
    assert torch.equal(torch.compile(q, backend="aot_eager", fullgraph=True)(x), q(x))


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("mode", ["w8a8", "w8a8_static", "w8a16"])
def test_int8linear_passes_the_gradient_to_its_input(mode, smooth):
    """The int8 weight is frozen, but x gets the gradient of x W^T with W the dequantized weight (columns / smooth;
    w8a8's rounding of x passed straight through): layers and adapters before an Int8Linear train (it cut the graph:
    their gradients were silently None)."""
    torch.manual_seed(0)
    s = torch.rand(64) + 0.5 if smooth else None
    q = Int8Linear.from_float(nn.Linear(64, 32), mode, smooth=s, input_scale=0.03)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    assert y.requires_grad and q.weight.grad is None
    dy = torch.randn_like(y)
    y.backward(dy)
    w = q.weight.double() * q.weight_scale.double()[:, None] / (1 if s is None else s.double())
    torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not q(x).requires_grad


def test_functional_w8a16_gradients_and_refusals():
    """fastattn.w8a16_matmul passes x's and the bias's gradients (x's through the dequantized weight; the output
    had no grad_fn: x's gradient was silently dropped). Scales that ask for a gradient no op computes are refused
    by name (int8_matmul's output had none either)."""
    torch.manual_seed(0)
    w, ws = fastattn.quantize_per_channel(torch.randn(6, 8))
    x, bias = torch.randn(2, 3, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    y = fastattn.w8a16_matmul(x, w, ws, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    wd = w.double() * ws.double()[:, None]
    torch.testing.assert_close(x.grad.double(), dy.double() @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, dy.sum((0, 1)))
    with pytest.raises(ValueError, match="w_scale: requires grad"):
        fastattn.w8a16_matmul(x, w, ws.clone().requires_grad_())
    a, sa = fastattn.quantize_per_token(torch.randn(4, 8))
    with pytest.raises(ValueError, match="a_scale: requires grad"):
        fastattn.int8_matmul(a, w, sa.requires_grad_(), ws, out_dtype=torch.float32)
    with torch.no_grad():  # inference: fine
        assert fastattn.int8_matmul(a, w, sa, ws, out_dtype=torch.float32).shape == (4, 6)
    bias.grad = None  # a bias parameter: its gradient, the epilogue's value
    y = fastattn.int8_matmul(a, w, sa.detach(), ws, bias, out_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(y, fastattn.int8_matmul(a, w, sa, ws, bias, out_dtype=torch.float32))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(bias.grad, torch.full((6,), 4.0))


def test_layers_before_a_quantized_model_train():
    """A GPT quantized w8a16 keeps its float parts trainable through its int8 layers: the first block's norm gets a
    gradient (it got none: the Int8Linears cut the graph)."""
    from fastattn.models import GPT, GPTConfig
    torch.manual_seed(0)
    m = fastattn.quantize(GPT(GPTConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4)), mode="w8a16").train()
    ids = torch.randint(0, 40, (2, 9))
    m(ids, labels=ids).loss.backward()
    norm = m.blocks[0].norm1.weight
    assert norm.grad is not None and norm.grad.abs().sum() > 0


def _outlier_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(128), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].weight[:4] = 60.0  # activation outlier channels, as in LLMs
    data = [torch.randn(16, 128) for _ in range(4)]
    return model, data


def test_smoothquant_lowers_error_on_outlier_channels():
    model, data = _outlier_model_and_data()
    x = torch.randn(64, 128)
    ref = model(x)
    import copy
    plain = fastattn.quantize(copy.deepcopy(model), data, smoothquant_alpha=None)
    smooth = fastattn.quantize(copy.deepcopy(model), data, smoothquant_alpha=0.5)
    err_plain = (plain(x) - ref).abs().mean().item()
    err_smooth = (smooth(x) - ref).abs().mean().item()
    assert err_smooth < 0.7 * err_plain, (err_smooth, err_plain)
    # the smoothing went into the LayerNorm (an exact fold), not into the Int8Linear
    assert isinstance(smooth[1], Int8Linear) and smooth[1].smooth is None
    assert smooth[0].weight[:4].max() < 60.0


def test_smoothquant_keeps_scale_when_fold_is_not_exact():
    class Residual(nn.Module):  # the LayerNorm's output is also used by the residual: folding would change it
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

        def forward(self, x):
            h = self.ln(x)
            return h + self.fc(h)

    torch.manual_seed(0)
    m = Residual()
    x = torch.randn(8, 32)
    ref = m(x)
    fastattn.quantize(m, [x], smoothquant_alpha=0.5)
    assert m.fc.smooth is not None
    assert (m(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_smoothquant_fold_checked_on_dataclass_outputs():
    """A model returning a dataclass (as fastattn.models do): the fold check compares its fields, so a fold that
    changes another output of the LayerNorm is not kept (it was accepted unchecked)."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor
        h: torch.Tensor

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

        def forward(self, x):
            h = self.ln(x)
            return Out(self.fc(h), h)

    torch.manual_seed(0)
    m = M()
    x = torch.randn(8, 32)
    x[:, 3] *= 20  # an outlier channel: smoothing is far from 1
    ref = m(x)
    fastattn.quantize(m, [x], smoothquant_alpha=0.5)
    assert m.fc.smooth is not None
    torch.testing.assert_close(m(x).h, ref.h)


def test_quantize_static_and_skip():
    model, data = _outlier_model_and_data()
    fastattn.quantize(model, data, mode="w8a8_static", skip=["3"])
    assert isinstance(model[1], Int8Linear) and model[1].mode == "w8a8_static"
    assert isinstance(model[3], nn.Linear) and not isinstance(model[3], Int8Linear)
    with pytest.raises(ValueError, match="calib_data"):
        fastattn.quantize(nn.Sequential(nn.Linear(4, 4)), mode="w8a8_static")


def test_qat_recovers_accuracy():
    """A model whose weights have outliers loses accuracy under plain int8 PTQ; a few QAT steps win it back."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        teacher[0].weight[:, 0] *= 40  # one dominant input column: a coarse per-channel grid for the rest
    x = torch.randn(2048, 32)
    y = teacher(x).detach()
    import copy
    ptq = fastattn.quantize(copy.deepcopy(teacher))
    loss_ptq = F.mse_loss(ptq(x), y).item()
    student = fastattn.prepare_qat(copy.deepcopy(teacher))
    opt = torch.optim.Adam(student.parameters(), lr=3e-5)
    for _ in range(300):  # full batch: seeds 0-2 give 0.57-0.62 x the PTQ loss
        loss = F.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat = fastattn.convert_qat(student)
    assert isinstance(qat[0], Int8Linear)
    loss_qat = F.mse_loss(qat(x), y).item()
    assert loss_qat < 0.8 * loss_ptq, (loss_qat, loss_ptq)


class _Shared(nn.Module):
    """One Linear registered (and called) at two places."""

    def __init__(self):
        super().__init__()
        self.ln, self.a = nn.LayerNorm(16), nn.Linear(16, 16)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.relu(self.a(self.ln(x))))


def test_quantize_replaces_a_shared_linear_everywhere():
    """A Linear registered at two places becomes one Int8Linear at both (it stayed float at the second, where
    SmoothQuant had scaled its weight: 120% error); the layout rebuilds both; QAT swaps both."""
    torch.manual_seed(0)
    m, x = _Shared(), torch.randn(8, 16)
    ref = m(x)
    fastattn.quantize(m, [x])
    assert isinstance(m.a, Int8Linear) and m.b is m.a
    assert (m(x) - ref).abs().max() < 0.05 * ref.abs().max()
    fresh = fastattn.apply_int8_layout(_Shared(), fastattn.int8_layout(m))
    assert isinstance(fresh.b, Int8Linear) and fresh.b is fresh.a
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), m(x))
    qat = fastattn.prepare_qat(_Shared())
    assert type(qat.b) is fastattn.nn.quantized.QATLinear and qat.b is qat.a
    qat = fastattn.convert_qat(qat)
    assert isinstance(qat.b, Int8Linear) and qat.b is qat.a


def test_quantize_a_bare_linear_returns_the_int8_layer():
    """model itself an nn.Linear: the replacement is returned (it was left float, with a submodule named '')."""
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    q = fastattn.quantize(lin, [x])
    assert isinstance(q, Int8Linear) and "" not in dict(lin.named_children())
    assert (q(x) - lin(x)).abs().max() < 0.05 * lin(x).abs().max()
    qat = fastattn.prepare_qat(nn.Linear(8, 4))
    assert type(qat) is fastattn.nn.quantized.QATLinear
    assert isinstance(fastattn.convert_qat(qat), Int8Linear)


def test_quantize_skip_as_one_string():
    """skip="head" is one pattern (it was read as the patterns 'h', 'e', 'a', 'd': nothing skipped)."""
    m = nn.Sequential()
    m.add_module("body", nn.Linear(8, 8))
    m.add_module("head", nn.Linear(8, 4))
    fastattn.quantize(m, skip="head")
    assert isinstance(m.body, Int8Linear) and type(m.head) is nn.Linear
    m = fastattn.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), skip="1")
    assert type(m[0]) is fastattn.nn.quantized.QATLinear and type(m[1]) is nn.Linear


def test_skip_keeps_a_module_whole_and_logs_unmatched_patterns(caplog):
    """A skipped module keeps every Linear inside it float (quantize, prepare_qat; as convert's skip), and a pattern
    that matches no module is logged (before: only the Linears' own names were matched, so skip="decoder"
    quantized the whole decoder silently)."""
    def model():
        return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))), nn.Linear(4, 4))
    for fn, cls in ((fastattn.quantize, Int8Linear), (fastattn.prepare_qat, fastattn.nn.quantized.QATLinear)):
        m = fn(model(), skip="0")
        assert type(m[0][0]) is nn.Linear and type(m[0][1][0]) is nn.Linear and type(m[1]) is cls
        m = fn(model(), skip="0.1")
        assert type(m[0][0]) is cls and type(m[0][1][0]) is nn.Linear
        with caplog.at_level(logging.WARNING, logger="fastattn"):
            caplog.clear()
            fn(model(), skip=("no_such_layer", "0.*"))
        assert [r.getMessage() for r in caplog.records] == [
            f"fastattn.{fn.__name__}: skip entry 'no_such_layer' matched no module"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastattn"):
            assert type(fn(nn.Linear(4, 4), skip="*")) is nn.Linear  # (the model itself matched: no warning)
        assert not caplog.records


def test_calibration_inputs_nonfinite_empty_or_by_keyword(caplog):
    """Calibration: an inf / NaN activation is refused naming the Linear and the batch (it made every scale and,
    through SmoothQuant, every weight NaN, silently); an empty batch is passed over; a Linear called with input=...
    is measured. Int8Linear and QATLinear take nn.Linear's keyword. Quantizing an int8 model again is logged (it
    changes nothing)."""
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(input=self.norm(x))

    torch.manual_seed(0)
    x = torch.randn(6, 8)
    bad = x.clone()
    bad[2, 3] = float("inf")
    for mode, alpha in (("w8a8", 0.5), ("w8a8_static", None)):
        with pytest.raises(ValueError, match="calib_data: batch 1 gives 'fc' .* inf or NaN"):
            fastattn.quantize(Keyword(), [x, bad * float("nan")], mode=mode, smoothquant_alpha=alpha)
    m = Keyword()
    want = m(x)
    q = fastattn.quantize(copy.deepcopy(m), [x, x[:0]], mode="w8a8_static")
    assert isinstance(q.fc, Int8Linear) and q.fc.input_scale.item() > 0
    assert (q(x) - want).abs().max() < 0.05 * want.abs().max()
    assert (fastattn.prepare_qat(copy.deepcopy(m))(x) - want).abs().max() < 0.05 * want.abs().max()
    with caplog.at_level(logging.WARNING, logger="fastattn"):
        fastattn.quantize(q, [x], mode="w8a16")
    assert "nothing to quantize: the model's Linears are Int8Linear already (w8a8_static)" in caplog.text


def test_float_state_dict_into_int8_refused():
    """A float checkpoint loaded into an Int8Linear (strict=False too) is refused by name: the copy truncated the
    float weight into the int8 buffer (zeros)."""
    lin = nn.Linear(8, 4)
    q = fastattn.quantize(copy.deepcopy(lin))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="weight: a float weight .* for an Int8Linear"):
            q.load_state_dict(lin.state_dict(), strict=strict)
    q.load_state_dict(fastattn.quantize(copy.deepcopy(lin)).state_dict())


def test_quantize_calibration_errors_are_clear_and_change_nothing():
    """No calibration batch (an empty list, a generator used up) and, for w8a8_static, a Linear the calibration
    never reached: a ValueError naming it, before the model is changed (it failed half-converted, unnamed)."""
    model, data = _outlier_model_and_data()
    gen = iter(data)
    fastattn.quantize(model, gen)
    for calib in ([], gen):
        with pytest.raises(ValueError, match="calib_data: no batches"):
            fastattn.quantize(nn.Sequential(nn.Linear(4, 4)), calib)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    m = Unused()
    with pytest.raises(ValueError, match="'unused' .* never ran"):
        fastattn.quantize(m, [torch.randn(2, 8)], mode="w8a8_static")
    assert type(m.used) is nn.Linear and type(m.unused) is nn.Linear


def test_float64_models_refused_by_name():
    """A float64 model was quantized and then refused its first input (Int8Linear runs float32 / float16 /
    bfloat16 activations, its TypeError naming an x the user never passed): quantize and convert_qat refuse it
    up front, naming the Linear, and change nothing."""
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(TypeError, match="its Linear '0' holds float64 weights.*model.float"):
        fastattn.quantize(m, mode="w8a16")
    assert type(m[0]) is nn.Linear and type(m[2]) is nn.Linear
    q = fastattn.prepare_qat(nn.Sequential(nn.Linear(4, 4)).double())
    with pytest.raises(TypeError, match="its Linear '0' holds float64 weights"):
        fastattn.convert_qat(q)
    with pytest.raises(TypeError, match="the Linear holds float64 weights"):
        fastattn.quantize(nn.Linear(4, 4).double())
    assert fastattn.quantize(m.float(), mode="w8a16")(torch.randn(3, 4)).shape == (3, 2)


def test_quantize_calibrates_in_eval_mode():
    """A model in training mode calibrates without dropout (its noise made every fold check fail, leaving the
    smoothing in the layers) and gets its modes back."""
    model, data = _outlier_model_and_data()
    model = nn.Sequential(model[0], nn.Dropout(0.2), *model[1:]).train()
    fastattn.quantize(model, data)
    assert model[2].smooth is None and model[0].weight[:4].max() < 60.0  # folded into the LayerNorm
    assert model.training and model[1].training


def test_quantize_keeps_the_transformer_encoder_fast_path_float():
    """torch's TransformerEncoderLayer reads its Linears' weights directly in eval / no_grad (its fast path): they
    stay float, as fastattn.convert keeps them (an int8 weight there crashed: "Float and Char")."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = layer(x)
        fastattn.quantize(layer, [x])
        torch.testing.assert_close(layer(x), ref)
    assert type(layer.linear1) is nn.Linear


def test_int8linear_static_clamps_and_propagates_nonfinite():
    """w8a8_static: values past the calibrated range clamp to +-127 steps; a row with NaN or inf gives NaN as in the
    w8a8 mode (NaN was cast to int8 as garbage, a finite output)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    q = Int8Linear.from_float(lin, "w8a8_static", input_scale=1 / 127)  # range [-1, 1]
    x = torch.full((4, 8), 0.5)
    x[1, 0], x[2, 3], x[3, 0] = 100.0, float("nan"), -float("inf")
    y = q(x)
    clamped = x[1].clone()
    clamped[0] = 1.0
    torch.testing.assert_close(y[1], q(clamped[None])[0])
    assert y[[0, 1]].isfinite().all() and y[[2, 3]].isnan().all()
    assert Int8Linear.from_float(lin)(x)[[2, 3]].isnan().all()  # w8a8 (dynamic) alike


def test_int8linear_from_float_on_meta():
    """A Linear on the meta device (a model built without memory) converts to a meta Int8Linear of its shapes."""
    q = Int8Linear.from_float(nn.Linear(8, 4, bias=False, device="meta"), "w8a16")
    assert q.weight.is_meta and q.weight.shape == (4, 8) and q.weight.dtype == torch.int8 and q.bias is None


@pytest.mark.parametrize("call, match, exc", [
    (lambda: fastattn.int8_matmul(torch.randn(4, 8), torch.zeros(4, 8, dtype=torch.int8)), "a: dtype", TypeError),
    (lambda: fastattn.int8_matmul(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4, 9, dtype=torch.int8)),
     "K mismatch", ValueError),
    (lambda: fastattn.int8_matmul(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8),
                                  torch.ones(5)), "a_scale", ValueError),
    (lambda: fastattn.int8_matmul(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8), None,
                                  torch.ones(4)), "b_scale", ValueError),
    (lambda: fastattn.int8_matmul(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8), 1.0,
                                  out_dtype=torch.int32), "out_dtype", ValueError),
    (lambda: fastattn.quantize_per_token(torch.zeros(4, 8, dtype=torch.int32)), "x: dtype", TypeError),
    (lambda: fastattn.quantize_per_token(torch.zeros(4, 8), torch.ones(7)), "smooth", ValueError),
    (lambda: fastattn.quantize_per_channel(torch.zeros(2, 4, 8)), "w:", ValueError),
    (lambda: Int8Linear(4, 4, mode="int4"), "mode", ValueError),
    (lambda: Int8Linear(4, 4)(torch.zeros(2, 4, dtype=torch.int32)), "input: expected", TypeError),
    (lambda: Int8Linear(4, 4)(torch.zeros(2, 5)), "in_features", ValueError),
    (lambda: Int8Linear.from_float(nn.Conv1d(4, 4, 1)), "linear: expected a torch.nn.Linear", TypeError),
    (lambda: fastattn.quantize("model"), "model: expected a torch.nn.Module", TypeError),
    (lambda: fastattn.prepare_qat(3), "model: expected a torch.nn.Module", TypeError),
    (lambda: fastattn.quantize(nn.Linear(4, 4), [torch.randn(2, 4)], smoothquant_alpha=2.0), "smoothquant_alpha",
     ValueError),
    (lambda: fastattn.w8a16_matmul(torch.randn(2, 4), torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), [1, 2, 3]),
     "bias", ValueError),
    (lambda: fastattn.w8a16_matmul(torch.randn(2, 4), torch.zeros(3, 4, dtype=torch.int8), None), "w_scale: required",
     TypeError),
    (lambda: fastattn.w8a16_matmul(torch.tensor(1.0), torch.zeros(3, 4, dtype=torch.int8), torch.ones(3)), "x: shape",
     ValueError),
    (lambda: Int8Linear(4, 4)(torch.tensor(1.0)), "input: shape", ValueError),
    (lambda: fastattn.convert_qat(fastattn.prepare_qat(nn.Sequential(nn.Linear(4, 4))), "w8a8_static"), "mode:",
     ValueError),
    (lambda: fastattn.quantize(nn.Sequential(nn.Linear(4, 4)), skip=[3]), "skip:", TypeError),
])
def test_bad_input(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M, N, K", [(200, 1100, 2100), (97, 40, 1027)])
def test_cpu_schedule_is_exact(threads, M, N, K):
    """The CPU packed matmuls split the columns into one group per thread, each group into blocks of panels that fit
    L2 (512 KB of packed B: a few panels at K = 2100) and the rows into chunks, and threads take each other's
    remaining items: several groups, blocks and chunks, fewer panels than threads, and more threads than cores."""
    skip_if_not_built("cpu", "int8_mm")
    g = torch.Generator().manual_seed(10 * N + threads)  # new values per case: stale output memory cannot pass
    a, b = int8((M, K), g, "cpu"), int8((N, K), g, "cpu")
    sa, sb = torch.rand(M, generator=g), torch.rand(N, generator=g)
    ref = int8_matmul_ref(a, b, out_dtype=torch.int32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastattn.backend("cpu"):
            acc = fastattn.int8_matmul(a, b, out_dtype=torch.int32)
            out = fastattn.int8_matmul(a, b, sa, sb, out_dtype=torch.float32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(acc, ref)
    torch.testing.assert_close(out.double(), int8_matmul_ref(a, b, sa, sb, out_dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("env, paths, w8a16_path", [
    ({"FASTATTN_CPU_NO_AVX512": "1"}, ("avx-vnni", "avx2"), "avx2"),
    ({"FASTATTN_CPU_NO_AVX512": "1", "FASTATTN_CPU_NO_AVXVNNI": "1"}, ("avx2",), "avx2"),
    ({"FASTATTN_CPU_NO_AVX2": "1"}, ("portable",), "portable"),
], ids=["no-avx512", "avx2", "portable"])
def test_cpu_code_paths(env, paths, w8a16_path):
    """The CPU int8 kernels pick AVX-512 VNNI, AVX-VNNI, AVX2 or portable code at run time (once per process), the
    w8a16 one AVX-512F, AVX2 or portable: run this file's CPU cases in fresh processes with the faster paths turned
    off, checking which paths they took. (This process runs them on the fastest path the CPU has.)"""
    import os
    import subprocess
    import sys
    from fastattn import _ext
    if not hasattr(_ext._C, "int8_mm_cpu"):
        pytest.skip("fastattn._C has no CPU int8 kernels in this build")
    if not _ext._C.cpu_has_avx2() and paths != ("portable",):
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, **env)
    took = subprocess.run([sys.executable, "-c", "import fastattn; i = fastattn.build_info(); "
                           "print(i['cpu_int8_path'], i['cpu_w8a16_path'])"],
                          env=env, capture_output=True, text=True, timeout=120)
    int8_path, _, w8a16_took = took.stdout.strip().partition(" ")
    assert int8_path in paths and w8a16_took == w8a16_path, took.stdout + took.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "cpu and not code_paths"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_gpu_auto_order_depends_on_rows():
    """Decode-sized calls go to the CUDA C++ kernels first (cheaper launches, faster small-M kernel), larger ones to
    Triton's GEMM; on a GPU with both built, auto mode picks accordingly."""
    from fastattn.ops import int8 as I
    small = I.Int8Request("cuda", torch.float16, 4096, decode=True)
    large = I.Int8Request("cuda", torch.float16, 4096, decode=False)
    assert I._gpu_order(small)[0] == "cuda" and I._gpu_order(large)[0] == "triton"
    if torch.cuda.is_available() and hasattr(fastattn._ext._C, "int8_mm_cuda"):
        assert I._mm.select(small).backend == "cuda" and I._mm.select(large).backend == "triton"


def test_w8a16_cpu_bad_input_named():
    """The w8a16 binding's own checks (Int8Linear.bind_rows calls the kernel directly): each names the argument."""
    from fastattn import _ext
    skip_if_not_built("cpu", "w8a16_mm")
    C = _ext._C
    x, w, s = torch.randn(2, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)
    cases = [(lambda: C.w8a16_mm_cpu(x, w.float(), s, None), "w must have dtype"),
             (lambda: C.w8a16_mm_cpu(x.double(), w, s, None), "x must have dtype"),
             (lambda: C.w8a16_mm_cpu(x, w.t().contiguous().t(), s, None), "w must be contiguous"),
             (lambda: C.w8a16_mm_cpu(x, torch.zeros(3, 9, dtype=torch.int8), s, None), "w must have K = 8"),
             (lambda: C.w8a16_mm_cpu(x, w, torch.ones(4), None), "w_scale must have shape"),
             (lambda: C.w8a16_mm_cpu(x, w, s.double(), None), "w_scale must have dtype"),
             (lambda: C.w8a16_mm_cpu(x, w, s, torch.ones(2)), "bias must have shape")]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()


# ---- the few-row float32 linear (fastattn.ops.gemv: the w8a16 kernel's GEMV body on a float32 weight) ----------
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("N, K", [(1, 1), (97, 7), (203, 33), (300, 770)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_gemv_cpu(M, N, K, has_bias):
    """fastattn.ops.gemv on the CPU kernel: rows 1..16 (one and two passes of its 8-row body), K and N off every
    vector and chunk width; error bounded by torch's F.linear against float64."""
    from fastattn.ops.gemv import gemv
    skip_if_not_built("cpu", "gemv_f32")
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if has_bias else None
    with fastattn.backend("cpu"):
        out = gemv(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_bounded("gemv", out, ref, F.linear(x, w, b), torch.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_cpu_schedule(threads):
    """1-3 threads (more than cores) over N = 1000 weight rows, not a multiple of the work item; K = 3001."""
    from fastattn.ops.gemv import gemv
    skip_if_not_built("cpu", "gemv_f32")
    g = torch.Generator().manual_seed(threads)
    x, w = torch.randn(3, 3001, generator=g), torch.randn(1000, 3001, generator=g) / 55
    b = torch.randn(1000, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastattn.backend("cpu"):
            out = gemv(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert_bounded("gemv", out, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b), torch.float32)


def test_gemv_cpu_bad_input_named():
    """The binding's own checks (the bound decode step calls it directly): each names the argument."""
    from fastattn import _ext
    from fastattn.ops.gemv import gemv
    skip_if_not_built("cpu", "gemv_f32")
    C = _ext._C
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    cases = [(lambda: C.gemv_f32_cpu(x, w.t().contiguous().t(), None), "w must be contiguous"),
             (lambda: C.gemv_f32_cpu(x.double(), w, None), "x must have dtype"),
             (lambda: C.gemv_f32_cpu(torch.randn(17, 8), w, None), "at most 16"),
             (lambda: C.gemv_f32_cpu(x, torch.randn(3, 9), None), "w must have K = 8"),
             (lambda: C.gemv_f32_cpu(x, w, torch.randn(4)), "bias must have shape")]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()
    with pytest.raises(ValueError, match="x: 17 rows"):
        gemv(torch.randn(17, 8), w)
    with pytest.raises(TypeError, match="dtypes must be"):
        gemv(x, w.double())
    assert torch.equal(C.gemv_f32_cpu(torch.randn(2, 0), torch.randn(3, 0), torch.arange(3.0)),
                       torch.arange(3.0).expand(2, 3))


@BK
def test_k_zero_gives_what_f_linear_gives(backend_name):
    """K = 0 (empty sums): scaled zeros plus the bias, of F.linear's shape, as F.linear gives (a 3-D a or any x
    raised a reshape error)."""
    skip_if_not_built(backend_name, "int8_mm")
    dev = backend_device(backend_name)
    a, b = torch.zeros(2, 3, 0, dtype=torch.int8, device=dev), torch.zeros(5, 0, dtype=torch.int8, device=dev)
    bias = torch.arange(5.0, device=dev)
    want = F.linear(torch.zeros(2, 3, 0, device=dev), torch.zeros(5, 0, device=dev), bias)
    with fastattn.backend(backend_name):
        out = fastattn.int8_matmul(a, b, torch.ones(2, 3, device=dev), 2.0, bias, out_dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out.float(), want)
        assert torch.equal(fastattn.int8_matmul(a, b, out_dtype=torch.int32), torch.zeros_like(want, dtype=torch.int32))
        for x in (torch.randn(3, 0), torch.randn(2, 3, 0)) if backend_name != "cuda" else ():  # (no CUDA C++ w8a16)
            y = fastattn.w8a16_matmul(x.to(dev, torch.bfloat16), b, torch.ones(5, device=dev), bias)
            assert y.dtype == torch.bfloat16 and torch.equal(y.float(), want[0] if x.dim() == 2 else want)


def test_k_past_the_int32_accumulator(caplog):
    """K > 131071: the sum of K int8 products (each up to 2**14) can overflow an int32. The int32-accumulator
    backends declare the limit, so auto mode falls back to the reference (logged) instead of the CPU kernel raising;
    out_dtype=torch.int32 is refused (the reference's int32 result wrapped silently)."""
    from fastattn.ops.int8 import MAX_K_INT32, Int8Request, _mm
    K = MAX_K_INT32 + 1
    reasons = _mm.why_not(Int8Request("cpu", torch.float32, K))
    for name in ("cpu", "cuda", "triton"):
        assert any(f"K={K} > 131071" in r for r in _mm.impls[name].declared_reasons(Int8Request("cuda", torch.float32,
                                                                                                 K))), name
    assert reasons["reference"] == []
    a, b = torch.full((1, K), -128, dtype=torch.int8), torch.full((2, K), -128, dtype=torch.int8)
    _mm._select.cache_clear()  # the choice is cached per request: log it afresh
    with caplog.at_level("DEBUG", logger="fastattn"):
        out = fastattn.int8_matmul(a, b, 1.0, 1.0, out_dtype=torch.float32)  # auto: the reference
    assert torch.equal(out, torch.full((1, 2), 2.0 ** 31))
    assert f"running on 'reference' for Int8Request(device='cpu', dtype=torch.float32, K={K}" in caplog.text
    assert f"refused: cpu: K={K} > 131071" in caplog.text
    with pytest.raises(fastattn.BackendNotSupported, match=f"K={K} > 131071"), fastattn.backend("cpu"):
        fastattn.int8_matmul(a, b, 1.0, 1.0, out_dtype=torch.float32)
    for bk in ("cpu", "reference", None):
        with fastattn.backend(bk), pytest.raises(ValueError, match=f"torch.int32 with K={K}: the sum of K products"):
            fastattn.int8_matmul(a, b, out_dtype=torch.int32)
    acc = fastattn.int8_matmul(a[:, 1:], b[:, 1:], out_dtype=torch.int32)  # K = 131071: exact on every backend
    assert acc[0, 0].item() == MAX_K_INT32 * 2 ** 14


def test_convert_int8_refuses_float64_up_front():
    """convert(int8=...) refuses a float64 model as fastattn.quantize does, naming the Linear, and changes nothing
    (it converted it, and the first forward raised a TypeError about an x the user never passed)."""
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with pytest.raises(TypeError, match="its Linear '0' holds float64 weights.*model.float"):
        fastattn.convert(m, int8=True)
    assert [type(c) for c in m] == [nn.Linear, nn.LayerNorm, nn.Linear]
    with pytest.raises(TypeError, match="the Linear holds float64 weights"):
        fastattn.convert(nn.Linear(4, 4).double(), int8="w8a16")
    fastattn.convert(m, int8=True, skip=("0", "2"))  # no Linear to quantize: nothing to refuse
    assert type(m[0]) is nn.Linear and isinstance(m[1], fastattn.nn.LayerNorm)


@pytest.mark.parametrize("training", [False, True])
def test_qat_swaps_keep_the_training_flag(training):
    """prepare_qat / convert_qat: the new layers take the replaced ones' mode (an eval model got training QATLinear
    layers, and convert_qat then training Int8Linear ones)."""
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).train(training)
    m = fastattn.prepare_qat(m)
    assert isinstance(m[0], fastattn.nn.QATLinear) and all(c.training == training for c in m.modules())
    m = fastattn.convert_qat(m)
    assert isinstance(m[0], Int8Linear) and all(c.training == training for c in m.modules())
    assert fastattn.prepare_qat(nn.Linear(4, 4).eval()).training is False  # a bare Linear alike


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_w8a16_reference_rows_equal_the_reference(dtype, has_bias):
    """The reference backend's w8a16 on rows (its epilogue in place) computes w8a16_matmul_ref's bits."""
    from fastattn.ops.int8 import _w8a16_ref_rows
    x, w, s, bias, _ = _w8a16_case(33, 40, 70, dtype, has_bias, seed=5)
    assert torch.equal(_w8a16_ref_rows(x, w, s, bias), w8a16_matmul_ref(x, w, s, bias))


@pytest.mark.parametrize("K", [1, 64, 128])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_w8a16_cpu_short_k_runs_torch_gemm(K, has_bias):
    """CPU float32 w8a16 of at least W8A16_TORCH_MIN_M rows and at most W8A16_TORCH_MAX_K columns runs the reference
    (torch's GEMM beats the kernel's GEMM path there: see fastattn.ops.int8.W8A16_TORCH_MIN_M): in auto mode its bits,
    within the kernels' error bound; Int8Linear's output and input gradient too. No timing: the choice is checked."""
    from fastattn.ops import int8 as i8
    M = i8.W8A16_TORCH_MIN_M
    x, w, s, bias, ref = _w8a16_case(M, 203, K, torch.float32, has_bias, seed=K)
    assert i8._w8a16.select(i8._w8a16_request(x, 203)).backend == "reference"
    out = fastattn.w8a16_matmul(x, w, s, bias)
    assert torch.equal(out, w8a16_matmul_ref(x, w, s, bias))
    assert_bounded("w8a16", out, ref, w8a16_matmul_ref(x, w, s, bias), torch.float32)
    if i8._w8a16.why_not(i8._w8a16_request(x, 203))["cpu"] == []:
        with fastattn.backend("cpu"):
            kernel = fastattn.w8a16_matmul(x, w, s, bias)
        assert_bounded("w8a16 (kernel)", kernel, ref, w8a16_matmul_ref(x, w, s, bias), torch.float32)
    lin = nn.Linear(K, 203, bias=has_bias)
    layer = Int8Linear.from_float(lin, mode="w8a16")
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert torch.equal(y, w8a16_matmul_ref(x, layer.weight, layer.weight_scale, layer.bias))
    y.backward(torch.ones_like(y))
    dq = layer.weight.float() * layer.weight_scale[:, None]
    torch.testing.assert_close(xg.grad, torch.ones_like(y) @ dq)


def test_w8a16_cpu_kernel_keeps_other_shapes():
    """The CPU kernel keeps fewer rows (its GEMV path and small GEMMs), longer K, half inputs and a forced backend."""
    from fastattn.ops import int8 as i8
    if "cpu" not in fastattn.available_backends():
        pytest.skip("no CPU kernels")
    M, K = i8.W8A16_TORCH_MIN_M, i8.W8A16_TORCH_MAX_K

    def chosen(x, forced="", N=i8.W8A16_TORCH_MIN_N):
        return i8._w8a16.select(i8._w8a16_request(x, N), forced).backend
    assert chosen(torch.empty(M, K)) == "reference"
    assert chosen(torch.empty(M - 1, K)) == "cpu"
    assert chosen(torch.empty(M, K + 1)) == "cpu"
    assert chosen(torch.empty(M, K), N=i8.W8A16_TORCH_MIN_N - 1) == "cpu"  # narrow outputs: the kernel's small panels
    assert chosen(torch.empty(i8.DECODE_M, 64)) == "cpu"
    assert chosen(torch.empty(M, K, dtype=torch.bfloat16)) == "cpu"
    assert chosen(torch.empty(M, K), "cpu") == "cpu"
    assert i8.w8a16_kernel("cpu", torch.float32, 64) is i8._w8a16.impls["cpu"].fwd  # bound for a decode step
