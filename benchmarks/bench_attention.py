"""pytest-benchmark: attention forward, backward and forward+backward on each fastattn backend against torch's
SDPA (on GPU each torch backend separately: flash, efficient, cudnn, math; on CPU torch's CPU kernel). TFLOP/s
(fwd = 4*B*H*L*S*D, x0.5 causal; bwd = 2.5x fwd) and peak memory in extra_info; plot with benchmarks/plot.py."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends import available_backends
from fastattn.testing import sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TOKENS = 16384 if GPU else 4096  # B * L
SUITE = os.environ.get("FASTATTN_BENCH_SUITE") == "1"  # the GPU suite's shorter grid
SEQLENS = ([2048, 8192] if SUITE else [1024, 2048, 4096, 8192, 16384]) if GPU else [128, 512, 1024, 2048]
DIRECTIONS = ["fwd", "bwd"] if SUITE else ["fwd", "bwd", "fwd+bwd"]
HEAD_DIMS = [64, 128]
DTYPE = torch.bfloat16 if GPU else torch.float32
MODEL_DIM = 2048 if GPU else 512  # H = MODEL_DIM // D
CALLS, ROUNDS = (5, 10) if GPU else (1, 5)
TORCH_IMPLS = ((["torch-flash", "torch-efficient", "torch-cudnn"] + ([] if SUITE else ["torch-math"])) if GPU
               else ["torch"])
IMPLS = TORCH_IMPLS + [b for b in available_backends() if b in (("cuda", "triton") if GPU else ("cpu",))]


def _torch_backend(impl):
    from torch.nn.attention import SDPBackend
    return {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "torch-cudnn": SDPBackend.CUDNN_ATTENTION, "torch-math": SDPBackend.MATH}[impl]


def attention_call(impl, q, k, v, mask=None, causal=False):
    """A zero-argument callable running impl's attention once (forward only)."""
    if impl.startswith("torch"):
        if impl == "torch":
            return lambda: F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        from torch.nn.attention import sdpa_kernel
        backend = _torch_backend(impl)

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        return run

    def ours():
        with fastattn.backend(impl):
            return fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
    return ours


def run_benchmark(benchmark, impl, fn, flops, group, info):
    try:  # a torch backend that refuses these inputs (cuDNN, math's memory at long seqlens) is skipped
        fn()
        sync(DEVICE)
    except fastattn.BackendNotSupported as e:
        pytest.skip(str(e)[:200])
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if impl.startswith("torch"):
            pytest.skip(f"{impl}: {str(e).splitlines()[0][:120]}")
        raise
    if GPU:
        torch.cuda.reset_peak_memory_stats()

    def step():
        for _ in range(CALLS):
            fn()
        sync(DEVICE)

    benchmark.group = group
    benchmark.extra_info.update(info, impl=impl, device=DEVICE, calls_per_round=CALLS)
    benchmark.pedantic(step, warmup_rounds=2, rounds=ROUNDS, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = flops * CALLS / benchmark.stats.stats.median / 1e12
    if GPU:
        benchmark.extra_info["peak_mem_MiB"] = torch.cuda.max_memory_allocated() / 2**20


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_attention(benchmark, impl, seqlen, head_dim, causal, direction):
    if impl == "torch-math" and seqlen > 4096:
        pytest.skip("torch-math materializes (B, H, L, L): skipped past 4096")
    B, H = max(TOKENS // seqlen, 1), MODEL_DIM // head_dim
    grad = direction != "fwd"
    q, k, v = (torch.randn(B, H, seqlen, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    dout = torch.randn_like(q)
    fwd = attention_call(impl, q, k, v, causal=causal)
    flops = 4 * B * H * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    if direction == "fwd":
        fn = fwd
    elif direction == "fwd+bwd":
        flops *= 3.5
        fn = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)  # noqa: E731
    else:
        flops *= 2.5
        out = fwd()
        fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
    with torch.set_grad_enabled(grad):
        run_benchmark(benchmark, impl, fn, flops,
                      f"attention {direction} {'causal' if causal else 'full'} D={head_dim} L={seqlen}",
                      dict(op=f"attention-{'causal' if causal else 'full'}-D{head_dim}", direction=direction,
                           dtype=str(DTYPE)[6:], width=seqlen, head_dim=head_dim, causal=causal))


@pytest.mark.parametrize("impl", [i for i in IMPLS if i in ("torch-efficient", "torch", "triton", "cpu", "cuda")])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("seqlen", SEQLENS[1:4] if len(SEQLENS) > 2 else SEQLENS[:1])
def test_masked_attention(benchmark, impl, mask_kind, seqlen):
    """An arbitrary (B, 1, L, S) mask, broadcast over heads: fastattn reads it through its strides."""
    head_dim = 64
    B, H = max(TOKENS // seqlen, 1), MODEL_DIM // head_dim
    q, k, v = (torch.randn(B, H, seqlen, head_dim, device=DEVICE, dtype=DTYPE) for _ in range(3))
    mask = torch.rand(B, 1, seqlen, seqlen, device=DEVICE) > 0.1
    if mask_kind == "float":
        mask = torch.randn(B, 1, seqlen, seqlen, device=DEVICE, dtype=DTYPE)
    flops = 4 * B * H * seqlen * seqlen * head_dim
    with torch.no_grad():
        run_benchmark(benchmark, impl, attention_call(impl, q, k, v, mask), flops,
                      f"attention fwd {mask_kind}-mask D={head_dim} L={seqlen}",
                      dict(op=f"attention-{mask_kind}-mask-D{head_dim}", direction="fwd", dtype=str(DTYPE)[6:],
                           width=seqlen, head_dim=head_dim, causal=False))
