"""The CUDA C++ INT8 kernels, fastattn._C.int8_mm_cuda / quantize_rows_cuda called directly on a GPU.

int8_mm_cuda bit-exact against fastattn.reference.int8_matmul_ref (int64 sums, the same float32 epilogue) over odd
shapes, every out dtype, scale / bias combinations, misaligned bases (the 4-byte and byte load paths), K = 0, and
every GEMM kernel forced through FASTATTN_CUDA_INT8_KERNEL; quantize_rows_cuda bit-exact against quantize_rows_ref
evaluated on the CUDA tensor; the fastattn-level entry points on the cuda backend; the binding's argument errors.
Timing: benchmarks/bench_int8.py, and benchmarks/cuda_int8_check.py for each GEMM kernel forced.
"""
import pytest
import torch

import fastattn
from fastattn.reference import int8_matmul_ref, quantize_rows_ref
from conftest import HAS_GPU, cuda_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")]
KERNELS = ["small_m", "tile64x64", "tile128x128", "tile128x128w8", "tile128x256"]
OUT_DTYPES = [torch.int32, torch.float16, torch.bfloat16, torch.float32]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.int32: torch.int32}


@pytest.fixture(scope="module")
def C():
    return cuda_kernels("int8_mm_cuda", "quantize_rows_cuda")


def rand_i8(shape, g, misalign=0):
    """int8 tensor on the GPU; misalign > 0 gives a contiguous view whose data starts `misalign` bytes into its
    buffer (the 4-byte / byte load paths)."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.randint(-128, 128, (n + misalign,), generator=g, dtype=torch.int8)
    return flat.cuda()[misalign:].view(*shape)


def ref_mm_gpu(a, b, sa, sb, bias, out_dtype):
    """int8_matmul_ref on the GPU for large shapes: the accumulator from an fp64 matmul is exact (integer products
    and partial sums far below 2**53), and float(acc) rounds the same integer; then the same float32 ops."""
    acc = a.double() @ b.double().T
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.to(torch.float32)
    if sa is not None:
        out = out * sa.reshape(-1, 1)
    if sb is not None:
        out = out * sb.reshape(1, -1)
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


def _cpu(t):
    return None if t is None else t.cpu()


def reference(a, b, sa, sb, bias, out_dtype):
    M, K = a.shape
    if M * b.shape[0] * max(K, 1) <= 2e7:  # the literal reference, on CPU
        return int8_matmul_ref(a.cpu(), b.cpu(), _cpu(sa), _cpu(sb), _cpu(bias), out_dtype)
    return ref_mm_gpu(a, b, sa, sb, bias, out_dtype).cpu()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_gpu_reference_is_int8_matmul_ref(C, out_dtype):
    """The fp64 GPU reference used for large shapes agrees with the literal one (if not: fix the test, not the
    kernel)."""
    g = torch.Generator().manual_seed(0)
    a, b = rand_i8((200, 1000), g), rand_i8((300, 1000), g)
    sa, sb, bias = torch.rand(200).cuda() / 1000, torch.rand(300).cuda() / 100, torch.randn(300).cuda()
    if out_dtype == torch.int32:
        sa = sb = bias = None
    r1 = int8_matmul_ref(a.cpu(), b.cpu(), _cpu(sa), _cpu(sb), _cpu(bias), out_dtype)
    r2 = ref_mm_gpu(a, b, sa, sb, bias, out_dtype).cpu()
    assert torch.equal(r1.view(BITS[out_dtype]), r2.view(BITS[out_dtype]))


def check_mm(C, monkeypatch, seed, M, N, K, out_dtype, sa_on, sb_on, bias_on, kernel=None, a_mis=0, b_mis=0):
    g = torch.Generator().manual_seed(seed)
    a = rand_i8((M, K), g, a_mis)
    b = rand_i8((N, K), g, b_mis)
    if M and K:
        a[0] = -128  # |acc| up to K * 2**14
    if N and K:
        b[0] = -128
    sa = (torch.rand(M, generator=g) / 1000).cuda() if sa_on else None
    sb = (torch.rand(N, generator=g) / 100).cuda() if sb_on else None
    bias = torch.randn(N, generator=g).cuda() if bias_on else None
    if kernel is not None:
        monkeypatch.setenv("FASTATTN_CUDA_INT8_KERNEL", kernel)  # read on every call
    out = C.int8_mm_cuda(a, b, sa, sb, bias, out_dtype)
    torch.cuda.synchronize()
    ref = reference(a, b, sa, sb, bias, out_dtype)
    out = out.cpu()
    assert out.shape == (M, N) and out.dtype == out_dtype, f"got {tuple(out.shape)} {out.dtype}"
    bad = out.view(BITS[out_dtype]) != ref.view(BITS[out_dtype])
    if bad.any():
        idx = bad.nonzero()[:3].tolist()
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} elements differ, e.g. at {idx}: "
                    f"{[out[i][j].item() for i, j in idx]} vs ref {[ref[i][j].item() for i, j in idx]}")


def _epilogue_cases():
    """Every out dtype and scale / bias combination over odd shapes (the auto kernel choice: small-M, 64x64, ...)."""
    combos = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
              (False, False, False)]
    shapes = [(1, 1, 1), (7, 13, 5), (1, 129, 100), (16, 7, 31), (33, 65, 100), (129, 65, 100), (300, 129, 4099),
              (1, 4096, 4096), (16, 4096, 4096), (300, 300, 4096), (1, 8, 0), (40, 17, 0), (2048, 2048, 1024),
              (1024, 4096, 512)]
    return [(M, N, K, od, *scales) for M, N, K in shapes for od in OUT_DTYPES
            for scales in ([(False, False, False)] if od == torch.int32 else combos)]


@pytest.mark.parametrize("M, N, K, out_dtype, sa, sb, bias", _epilogue_cases(), ids=str)
def test_int8_mm_is_exact(C, monkeypatch, M, N, K, out_dtype, sa, sb, bias):
    check_mm(C, monkeypatch, M * 7919 + N * 31 + K, M, N, K, out_dtype, sa, sb, bias)


def _load_path_cases():
    """Misaligned bases and K % 16 != 0, for every kernel forced (None: auto) on tails."""
    cases = []
    for kernel in [None] + KERNELS:
        for M, N, K in [(1, 31, 4096), (20, 40, 1024), (129, 131, 320), (300, 129, 257), (257, 513, 1040),
                        (130, 260, 4160), (31, 33, 4099)]:
            for a_mis, b_mis in [(0, 0), (4, 0), (0, 1)]:
                if kernel not in (None, "small_m", "tile64x64") and (a_mis, b_mis) != (0, 0):
                    continue  # the other kernels fall back to tile64x64 off the 16-byte path
                cases.append((kernel, M, N, K, torch.int32, False, False, False, a_mis, b_mis))
        cases.append((kernel, 129, 258, 96, torch.bfloat16, True, True, True, 0, 0))
        cases.append((kernel, 513, 1000, 2000, torch.float16, True, True, True, 0, 0))
    return cases


@pytest.mark.parametrize("kernel, M, N, K, out_dtype, sa, sb, bias, a_mis, b_mis", _load_path_cases(), ids=str)
def test_int8_mm_kernels_and_load_paths(C, monkeypatch, kernel, M, N, K, out_dtype, sa, sb, bias, a_mis, b_mis):
    check_mm(C, monkeypatch, M * 7919 + N * 31 + K + a_mis + 2 * b_mis, M, N, K, out_dtype, sa, sb, bias, kernel,
             a_mis, b_mis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K", [(9, 1), (9, 7), (9, 100), (9, 4099), (9, 4096), (5, 16384), (3000, 64), (17, 1000),
                                  (1, 8)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("misalign", [0, 1])
def test_quantize_rows_is_bit_exact(C, dtype, M, K, smooth, misalign):
    """Against quantize_rows_ref on the CUDA tensor (torch's CUDA `x / 127.0` is what the kernel matches): zero,
    subnormal and ties rows; a misaligned base (2/4 bytes off) takes the scalar path."""
    g = torch.Generator().manual_seed(M * K + 2 * smooth + misalign)
    xf = torch.randn(M, K + misalign, generator=g) * 3
    if M > 2:
        xf[1] = 0  # zero row
        xf[2, 0] = 0.5
    if M > 4:
        xf[3] *= 1e-39  # subnormal row (float32)
        xf[4, K // 2] = 60000.0
    if M > 6:
        xf[5, : K - 1] = torch.tensor([(k % 255 - 127) + 0.5 for k in range(K - 1)])  # ties
        xf[5, K - 1] = 127.0
    x = xf.to(dtype).cuda()
    if misalign:
        x = x.flatten()[1: 1 + M * K].view(M, K)  # contiguous, 2/4-byte offset: scalar path
    sm = (torch.rand(K, generator=g) + 0.5).cuda() if smooth else None
    q, s = C.quantize_rows_cuda(x, sm)
    qr, sr = quantize_rows_ref(x, sm)
    assert torch.equal(s.view(torch.int32), sr.view(torch.int32)), \
        f"scale differs in rows {(s != sr).nonzero().flatten()[:8].tolist()}"
    assert torch.equal(q, qr), \
        f"{int((q != qr).sum())} elements of q differ (max {(q.int() - qr.int()).abs().max().item()} steps)"


def test_public_api_on_cuda_backend(C):
    """fastattn.int8_matmul (3-D a, 2-D scales) and quantize_per_token forced to the cuda backend."""
    g = torch.Generator().manual_seed(2)
    a, b = rand_i8((37, 96), g), rand_i8((40, 96), g)
    sa, sb, bias = torch.rand(37).cuda(), torch.rand(40).cuda(), torch.randn(40).cuda()
    with fastattn.backend("cuda"):
        out = fastattn.int8_matmul(a.view(1, 37, 96), b, sa.view(1, 37), sb, bias, out_dtype=torch.bfloat16)
        q, s = fastattn.quantize_per_token(torch.randn(3, 5, 96, device="cuda", dtype=torch.float16))
    ref = int8_matmul_ref(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), bias.cpu(), torch.bfloat16)
    assert torch.equal(out.view(37, 40).cpu().view(torch.int16), ref.view(torch.int16))
    assert q.shape == (3, 5, 96) and s.shape == (3, 5), f"shapes {tuple(q.shape)} {tuple(s.shape)}"


@pytest.mark.parametrize("call, match", [
    (lambda C, a, b, sa: C.int8_mm_cuda(a.float(), b, None, None, None, torch.float16), "a must have dtype"),
    (lambda C, a, b, sa: C.int8_mm_cuda(a, b[:, :95].contiguous(), None, None, None, torch.float16), "b must have K"),
    (lambda C, a, b, sa: C.int8_mm_cuda(a, b, sa[:5], None, None, torch.float16), "a_scale must have shape"),
    (lambda C, a, b, sa: C.int8_mm_cuda(a, b, sa, None, None, torch.int32), "int32"),
    (lambda C, a, b, sa: C.int8_mm_cuda(a, b, None, None, None, torch.float64), "out_dtype"),
    (lambda C, a, b, sa: C.int8_mm_cuda(a.cpu(), b, None, None, None, torch.float16), "CUDA tensor"),
    (lambda C, a, b, sa: C.quantize_rows_cuda(torch.randn(4, 8, device="cuda").t(), None), "contiguous"),
    (lambda C, a, b, sa: C.quantize_rows_cuda(torch.randn(4, 8, device="cuda"), torch.ones(7, device="cuda")),
     "smooth must have shape"),
], ids=["a dtype", "b K", "a_scale shape", "int32 with scales", "out_dtype", "CPU tensor", "contiguous",
        "smooth shape"])
def test_binding_argument_errors(C, call, match):
    g = torch.Generator().manual_seed(2)
    a, b, sa = rand_i8((37, 96), g), rand_i8((40, 96), g), torch.rand(37).cuda()
    with pytest.raises(RuntimeError, match=match):
        call(C, a, b, sa)
