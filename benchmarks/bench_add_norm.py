"""pytest-benchmark: fused add + LayerNorm / RMSNorm on each backend against torch (x + r, then F.layer_norm /
F.rms_norm), forward and forward+backward. Run: pytest benchmarks/ --benchmark-only [--benchmark-json=out.json];
benchmarks/plot.py turns the JSON into a PNG of speedup vs width."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends import available_backends
from fastattn.testing import add_norm_bytes, sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# Elements per tensor: far above the L2 on GPU, around the L3 on CPU. On GPU 128M (a 7B model's 32k-token batch at
# width 4096): at smaller sizes a call's GPU time is no longer than the eager host side (Python, autograd, launches),
# and the host would be timed instead of the kernel.
ELEMENTS = 128 * 2**20 if GPU else 4 * 2**20
SUITE = os.environ.get("FASTATTN_BENCH_SUITE") == "1"  # the GPU suite's shorter grid
WIDTHS = ([1024, 4096, 16384] if SUITE else [512, 1024, 2048, 4096, 8192, 16384, 65536]) if GPU else \
    [7, 33, 256, 1024, 4096, 16384]  # (7, 33: narrow rows, where auto mode trains on torch's LayerNorm)
DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float32]
# Triton on a CPU tensor would be the interpreter: not a benchmark.
CALLS = 10 if GPU else 1  # calls per timed round
IMPLS = ["torch"] + [b for b in available_backends() if b in (("cuda", "triton") if GPU else ("cpu",))] + \
    ([] if GPU else ["auto"])  # auto mode's choice (fastattn.ops.add_norm.NATIVE_MAX_COLS)


def _inputs(width, dtype, norm, grad):
    M = ELEMENTS // width
    x, r, dy = (torch.randn(M, width, device=DEVICE, dtype=dtype) for _ in range(3))
    w = torch.randn(width, device=DEVICE, dtype=dtype)
    b = None if norm == "rms" else torch.randn(width, device=DEVICE, dtype=dtype)
    leaves = [t for t in (x, r, w, b) if t is not None]
    if grad:
        for t in leaves:
            t.requires_grad_()
    return M, x, r, w, b, dy, leaves


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_add_norm(benchmark, impl, width, dtype, norm, direction):
    grad = direction == "fwd+bwd"
    M, x, r, w, b, dy, leaves = _inputs(width, dtype, norm, grad)

    def forward():
        if impl == "torch":
            s = x + r
            return F.rms_norm(s, (width,), w, 1e-6) if norm == "rms" else F.layer_norm(s, (width,), w, b)
        with fastattn.backend(impl):
            return fastattn.add_rms_norm(x, r, w) if norm == "rms" else fastattn.add_layer_norm(x, r, w, b)

    def step():  # CALLS calls, then one synchronize: the sync's cost stays out of the per-call time
        with torch.set_grad_enabled(grad):
            for _ in range(CALLS):
                y = forward()
                if grad:
                    torch.autograd.grad(y, leaves, dy)
        sync(DEVICE)

    benchmark.group = f"add_{norm}_norm {direction} {str(dtype)[6:]} width={width}"
    benchmark.extra_info.update(op=f"add_{norm}_norm", impl=impl, width=width, rows=M, dtype=str(dtype)[6:],
                                direction=direction, device=DEVICE, calls_per_round=CALLS)
    benchmark.pedantic(step, warmup_rounds=3, rounds=30 if GPU else 15, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        nbytes = add_norm_bytes(M, width, dtype, residual=True, store_s=grad, backward=grad)
        benchmark.extra_info["GB/s"] = nbytes * CALLS / benchmark.stats.stats.median / 1e9
