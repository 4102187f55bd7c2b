"""pytest-benchmark: fastattn.ops.dropout (Philox keep flags, the mask regenerated in the backward) on each backend
against torch's F.dropout, forward and forward+backward, p = 0.1. CPU: the cpu kernel, float32; GPU: Triton, bf16 and
float32. Run: pytest benchmarks/bench_dropout.py --benchmark-only; benchmarks/plot.py turns the JSON into a PNG."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends import available_backends
from fastattn.ops.dropout import dropout
from fastattn.testing import sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# Elements: 2M and 8M, the sizes of a d_model-512 Transformer layer's dropouts at 4096 tokens (after attention and
# after the FFN's activation); on GPU 16x as many, so that the kernel and not the host is timed.
SIZES = [2**21, 2**23] if not GPU else [2**25, 2**27]
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]
CALLS = 10 if GPU else 1  # calls per timed round
IMPLS = ["torch"] + [b for b in available_backends() if b in (("triton",) if GPU else ("cpu",))]
P = 0.1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_dropout(benchmark, impl, n, dtype, direction):
    grad = direction == "fwd+bwd"
    x = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=grad)
    dy = torch.randn_like(x)

    def forward():
        if impl == "torch":
            return F.dropout(x, P)
        with fastattn.backend(impl):
            return dropout(x, P)

    def step():  # CALLS calls, then one synchronize
        with torch.set_grad_enabled(grad):
            for _ in range(CALLS):
                y = forward()
                if grad:
                    torch.autograd.grad(y, x, dy)
        sync(DEVICE)

    benchmark.group = f"dropout {direction} {str(dtype)[6:]} n={n}"
    benchmark.extra_info.update(op="dropout", impl=impl, width=n, dtype=str(dtype)[6:], direction=direction,
                                device=DEVICE, calls_per_round=CALLS)
    benchmark.pedantic(step, warmup_rounds=2, rounds=20 if GPU else 10, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        # bytes moved: x read, out written (and dy read, dx written in the backward); torch's mask not counted
        nbytes = n * x.element_size() * (4 if grad else 2)
        benchmark.extra_info["GB/s"] = nbytes * CALLS / benchmark.stats.stats.median / 1e9
