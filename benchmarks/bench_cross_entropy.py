"""pytest-benchmark: fastattn.linear_cross_entropy (an LM head's loss in chunks, no logits in memory) against torch's
unfused ``F.cross_entropy(F.linear(h, W).float(), target)``, forward and forward+backward (gradients of h and W).
CPU: the cpu row kernel, float32, the CLI's default GPT head (2048 tokens x 256 -> 4096) and GPT-2's (1024 x 768
-> 50257). GPU: Triton, bf16, GPT-2's head at 8 x 1024 tokens and a Llama-3-sized vocabulary. Each fastattn row
records speedup_vs_torch (ratio of medians in this run) and TFLOP/s (2 N d V per GEMM: one forward, three with
the backward). Run: pytest benchmarks/bench_cross_entropy.py --benchmark-only."""
import pytest
import torch

import fastattn
from fastattn.backends import available_backends
from fastattn.ops.cross_entropy import linear_cross_entropy
from fastattn.reference import linear_cross_entropy_ref
from fastattn.testing import sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# CPU also a small head (256 x 256 -> 100), where auto mode runs the unfused reference (TORCH_MAX_LOGITS)
SHAPES = [(8192, 768, 50257), (8192, 2048, 128256)] if GPU else [(2048, 256, 4096), (1024, 768, 50257), (256, 256, 100)]
DTYPE = torch.bfloat16 if GPU else torch.float32
IMPLS = ["torch"] + [b for b in available_backends() if b in (("triton",) if GPU else ("cpu",))] + \
    ([] if GPU else ["auto"])
_medians = {}  # (group, impl) -> median s


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_linear_cross_entropy(benchmark, impl, shape, direction):
    N, d, V = shape
    grad = direction == "fwd+bwd"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(N, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_(grad)
    w = (torch.randn(V, d, device=DEVICE, generator=g) * 0.02).to(DTYPE).requires_grad_(grad)
    target = torch.randint(0, V, (N,), device=DEVICE, generator=g)

    def step():
        with torch.set_grad_enabled(grad):
            if impl == "torch":
                loss = linear_cross_entropy_ref(h, w, target)
            else:
                with fastattn.backend(impl):
                    loss = linear_cross_entropy(h, w, target)
            if grad:
                torch.autograd.grad(loss, (h, w))
        sync(DEVICE)

    group = f"linear cross-entropy {direction} {str(DTYPE)[6:]} {N}x{d}->{V}"
    benchmark.group = group
    benchmark.extra_info.update(op="linear_cross_entropy", impl=impl, width=V, batch=N, dtype=str(DTYPE)[6:],
                                direction=direction, device=DEVICE)
    benchmark.pedantic(step, warmup_rounds=1, rounds=10 if GPU else 5, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: one plain run
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["TFLOP/s"] = 2 * N * d * V * (3 if grad else 1) / median / 1e12
    _medians[(group, impl)] = median
    if impl != "torch" and (group, "torch") in _medians:
        benchmark.extra_info["speedup_vs_torch"] = _medians[(group, "torch")] / median
