"""pytest-benchmark: INT8 GEMM (W8A8, fused dequant) against torch's float matmul and torch._int_mm, and Int8Linear
(quantize + GEMM + dequant; and weight-only W8A16) against nn.Linear. TOPS in extra_info. On CPU also the w8a16
kernel against F.linear in float32 and the reference at GPT-2 small's Linear shapes (test_w8a16_cpu), and its GEMV
body on a float32 weight (fastattn.ops.gemv, the decode step's projections) against F.linear (test_gemv_cpu).

Decode-sized calls (M <= 16) on GPU are timed twice: eager (host overhead included: Python validation, dispatch,
kernel launch) and replayed from a CUDA graph (GPU time alone, as graph-captured decoding runs them), both for
torch and fastattn; the graph rows carry "-graph" in their direction."""
import pytest
import torch

import fastattn
from fastattn.backends import available_backends
from fastattn.nn import Int8Linear
from conftest import graphed
from fastattn.testing import sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
FLOAT = torch.bfloat16 if GPU else torch.float32
GEMMS = [(1, 4096, 4096), (16, 4096, 4096), (4096, 4096, 4096), (8192, 8192, 8192)] if GPU else \
    [(1, 1024, 1024), (128, 1024, 1024), (1024, 1024, 1024)]
LINEARS = [(1, 4096, 4096), (4096, 4096, 4096)] if GPU else [(1, 1024, 1024), (512, 1024, 1024)]
# CPU: 40 rounds of one call (~1 ms each at 1024^3), so that a burst of the host's other load cannot take the median.
CALLS, ROUNDS = (10, 10) if GPU else (1, 40)
OURS = [b for b in available_backends() if b in (("cuda", "triton") if GPU else ("cpu",))]


def _timings(M):
    return ["eager", "graph"] if GPU and M <= 16 else ["eager"]


def _bench(benchmark, fn, ops, group, info, timing="eager"):
    try:
        fn()
        sync(DEVICE)
    except fastattn.BackendNotSupported as e:
        pytest.skip(str(e)[:200])
    except RuntimeError as e:  # e.g. torch._int_mm's shape limits
        if info["impl"].startswith("torch"):
            pytest.skip(str(e).splitlines()[0][:160])
        raise

    if timing == "graph":
        replay = graphed(fn, CALLS)

        def step():
            replay()
            sync(DEVICE)
        group, info = group + " (cuda graph)", dict(info, direction=info["direction"] + "-graph")
    else:
        def step():
            for _ in range(CALLS):
                fn()
            sync(DEVICE)

    benchmark.group = group
    benchmark.extra_info.update(info, device=DEVICE, calls_per_round=CALLS)
    benchmark.pedantic(step, warmup_rounds=2, rounds=ROUNDS, iterations=1)
    if ops and benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = ops * CALLS / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("timing", ["eager", "graph"])
@pytest.mark.parametrize("impl", ["torch-float", "torch-int_mm"] + OURS)
@pytest.mark.parametrize("M, N, K", GEMMS, ids=lambda v: str(v))
def test_int8_gemm(benchmark, impl, M, N, K, timing):
    if timing not in _timings(M):
        pytest.skip("CUDA-graph timing is for decode-sized M on GPU")
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEVICE)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEVICE)
    sa, sb = torch.rand(M, device=DEVICE), torch.rand(N, device=DEVICE)
    out_dtype = FLOAT
    if impl == "torch-float":
        af, bf = a.to(FLOAT), b.to(FLOAT)
        fn = lambda: af @ bf.T  # noqa: E731
    elif impl == "torch-int_mm":
        bt = b.T
        fn = lambda: torch._int_mm(a, bt)  # noqa: E731
    else:
        def fn():
            with fastattn.backend(impl):
                return fastattn.int8_matmul(a, b, sa, sb, out_dtype=out_dtype)
    _bench(benchmark, fn, 2 * M * N * K, f"int8 gemm M={M} N={N} K={K}",
           dict(op="int8_gemm", impl=impl, width=M, dtype=str(FLOAT)[6:], direction=f"N{N}K{K}"), timing)


@pytest.mark.parametrize("timing", ["eager", "graph"])
@pytest.mark.parametrize("impl", ["torch-linear", "w8a8", "w8a16"])
@pytest.mark.parametrize("M, N, K", LINEARS, ids=lambda v: str(v))
def test_int8_linear(benchmark, impl, M, N, K, timing):
    if timing not in _timings(M):
        pytest.skip("CUDA-graph timing is for decode-sized M on GPU")
    lin = torch.nn.Linear(K, N, device=DEVICE, dtype=FLOAT)
    x = torch.randn(M, K, device=DEVICE, dtype=FLOAT)
    mod = lin if impl == "torch-linear" else Int8Linear.from_float(lin, impl)
    with torch.no_grad():
        _bench(benchmark, lambda: mod(x), 2 * M * N * K, f"linear M={M} N={N} K={K}",
               dict(op="int8_linear", impl=impl if impl == "torch-linear" else f"Int8Linear-{impl}", width=M,
                    dtype=str(FLOAT)[6:], direction=f"N{N}K{K}"), timing)


# GPT-2 small's Linear layers (768 x 768 attention out, 3072 x 768 MLP up, 768 x 3072 MLP down, 50257 x 768 LM
# head) at one decode token and at a 128-token prefill.
W8A16_CPU = [(1, 768, 768), (1, 3072, 768), (1, 768, 3072), (1, 50257, 768), (128, 768, 768), (128, 3072, 768),
             (512, 768, 64)]  # a short K: auto mode runs the reference there (fastattn.ops.int8.W8A16_TORCH_MIN_M)


@pytest.mark.skipif(GPU, reason="the CPU w8a16 kernel")
@pytest.mark.parametrize("impl", ["torch-linear-fp32", "reference", "cpu", "auto"])
@pytest.mark.parametrize("M, N, K", W8A16_CPU, ids=lambda v: str(v))
def test_w8a16_cpu(benchmark, impl, M, N, K):
    """fastattn.w8a16_matmul's CPU kernel against F.linear on the float32 weight (4x the bytes) and the reference
    (the weight dequantized per call, then torch's matmul). GB/s: the bytes of the weight each reads (float32 for
    F.linear, int8 for the others) over the median time."""
    if impl == "cpu" and "cpu" not in available_backends():
        pytest.skip("fastattn._C is not built")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s, bias = torch.rand(N, generator=g) / 100, torch.randn(N, generator=g)
    if impl == "torch-linear-fp32":
        wf = w.float() * s[:, None]
        fn = lambda: torch.nn.functional.linear(x, wf, bias)  # noqa: E731
    else:
        def fn():
            with fastattn.backend(impl):
                return fastattn.w8a16_matmul(x, w, s, bias)
    _bench(benchmark, fn, 2 * M * N * K, f"w8a16 cpu M={M} N={N} K={K}",
           dict(op="w8a16", impl=impl, width=M, dtype="float32", direction=f"N{N}K{K}"))
    weight_bytes = N * K * (4 if impl.startswith("torch") else 1)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = weight_bytes * CALLS / benchmark.stats.stats.median / 1e9



@pytest.mark.skipif(GPU, reason="the CPU float32 GEMV (GPU decoding keeps torch's)")
@pytest.mark.parametrize("impl", ["torch-linear", "torch-linear-colmajor", "cpu"])
@pytest.mark.parametrize("M, N, K", [(m, n, k) for m, n, k in W8A16_CPU if m == 1], ids=lambda v: str(v))
def test_gemv_cpu(benchmark, impl, M, N, K):
    """fastattn.ops.gemv's CPU kernel against F.linear on the same float32 weight, row-major (nn.Linear's layout)
    and column-major (what torch's GEMV reads fastest). GB/s: the weight's bytes over the median time."""
    from fastattn.ops.gemv import gemv
    if impl == "cpu" and "cpu" not in available_backends():
        pytest.skip("fastattn._C is not built")
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    if impl == "cpu":
        def fn():
            with fastattn.backend("cpu"):
                return gemv(x, w, bias)
    else:
        wt = w.t().contiguous().t() if impl.endswith("colmajor") else w
        fn = lambda: torch.nn.functional.linear(x, wt, bias)  # noqa: E731
    _bench(benchmark, fn, 2 * M * N * K, f"gemv cpu M={M} N={N} K={K}",
           dict(op="gemv", impl=impl, width=M, dtype="float32", direction=f"N{N}K{K}"))
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = N * K * 4 * CALLS / benchmark.stats.stats.median / 1e9

@pytest.mark.parametrize("impl", ["torch"] + OURS)
@pytest.mark.parametrize("M, K", [(1, 4096), (4096, 4096)], ids=lambda v: str(v))
def test_quantize(benchmark, impl, M, K):
    """Per-token quantization alone (torch: the same absmax / divide / round in eager ops)."""
    x = torch.randn(M, K, device=DEVICE, dtype=FLOAT)
    if impl == "torch":
        def fn():
            scale = x.abs().amax(-1, keepdim=True).float() / 127
            return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale
    else:
        def fn():
            with fastattn.backend(impl):
                return fastattn.quantize_per_token(x)
    _bench(benchmark, fn, 0, f"quantize M={M} K={K}",
           dict(op="quantize", impl=impl, width=M, dtype=str(FLOAT)[6:], direction=f"K{K}"))
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = M * K * (x.element_size() + 1) * CALLS / benchmark.stats.stats.median / 1e9
