"""pytest-benchmark: attention over a packed batch of variable-length sequences (causal, H 8, D 64), forward and
forward+backward. fastattn.attention_varlen on the packed tokens against what a user does without it: pad the batch
on the right to its longest sequence and run torch's F.scaled_dot_product_attention with is_causal=True (no mask
needed: under a top-left causal mask a real query never sees the padding after it; torch's fused kernel), or
fastattn.attention the same way; on a GPU also torch's own torch.nn.attention.varlen.varlen_attn (Flash Attention;
CUDA only) on the packed tokens ("torch-varlen"). Lengths are drawn uniformly from [L/8, L] (fixed seed); the padded
rows do work for (B * L) tokens where the packed ones do it for the real tokens only. Each row records
``speedup_vs_torch`` (the fastest torch row's median in the same run / this row's) and the real tokens per second.
"""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends import available_backends
from fastattn.testing import sync

from conftest import DEVICE, DTYPE, GPU

TOKENS = 32768 if GPU else 4096  # real tokens per packed batch (about)
MAX_LENS = [1024, 4096] if GPU else [256, 1024]
H, D = (16, 64) if GPU else (8, 64)
ROUNDS = 10 if GPU else 5
OURS = [b for b in available_backends() if b in (("triton",) if GPU else ("cpu",))]
_medians = {}


def batch(max_len: int, seed: int = 0):
    """Lengths from [max_len / 8, max_len] until about TOKENS real tokens; packed q, k, v (T, H, D), their offsets,
    and the same values right-padded to (B, H, max_len, D)."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < TOKENS:
        lens.append(int(torch.randint(max_len // 8, max_len + 1, (1,), generator=g)))
    T, B = sum(lens), len(lens)
    packed = [torch.randn(T, H, D, generator=g).to(DEVICE, DTYPE) for _ in range(3)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    padded = []
    for t in packed:
        p = torch.zeros(B, max_len, H, D, device=DEVICE, dtype=DTYPE)
        for b in range(B):
            p[b, :lens[b]] = t[cu[b]:cu[b + 1]]
        padded.append(p.transpose(1, 2).contiguous())
    return lens, packed, cu, padded


def fn_of(impl: str, lens, packed, cu, padded, backward: bool):
    if impl == "torch-padded":
        leaves = [t.detach().requires_grad_(backward) for t in padded]
        run = lambda: F.scaled_dot_product_attention(*leaves, is_causal=True)  # noqa: E731
    elif impl == "torch-varlen":
        from torch.nn.attention.varlen import varlen_attn
        leaves = [t.detach().requires_grad_(backward) for t in packed]
        m = max(lens)
        run = lambda: varlen_attn(*leaves, cu, cu, m, m, window_size=(-1, 0))  # noqa: E731
    elif impl.endswith("-padded"):
        leaves = [t.detach().requires_grad_(backward) for t in padded]

        def run():
            with fastattn.backend(impl[:-7]):
                return fastattn.attention(*leaves, causal="top_left")
    else:
        leaves = [t.detach().requires_grad_(backward) for t in packed]
        m = max(lens)

        def run():
            with fastattn.backend(impl[:-7]):
                return fastattn.attention_varlen(*leaves, cu, cu, m, m, causal=True)
    if not backward:
        return lambda: run()
    grad = None

    def step():
        nonlocal grad
        out = run()
        grad = torch.ones_like(out) if grad is None or grad.shape != out.shape else grad
        out.backward(grad)
    return step


@pytest.mark.parametrize("impl", ["torch-padded"] + (["torch-varlen"] if GPU else []) + [f"{b}-padded" for b in OURS]
                         + [f"{b}-varlen" for b in OURS])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("max_len", MAX_LENS)
def test_varlen(benchmark, impl, direction, max_len):
    lens, *rest = batch(max_len)
    fn = fn_of(impl, lens, *rest, backward=direction != "fwd")
    group = f"varlen causal B={len(lens)} tokens={sum(lens)} max_len={max_len} H={H} D={D} {str(DTYPE)[6:]} {direction}"
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=DEVICE, direction=direction, op=f"varlen-{direction}",
                                width=max_len, dtype=str(DTYPE)[6:], sequences=len(lens), tokens=sum(lens),
                                padded_tokens=len(lens) * max_len)

    def step():
        with torch.no_grad() if direction == "fwd" else torch.enable_grad():
            fn()
        sync(DEVICE)

    step()
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = sum(lens) / median
    if impl.startswith("torch"):
        _medians[group] = min(median, _medians.get(group, median))
    elif group in _medians:
        benchmark.extra_info["speedup_vs_torch"] = _medians[group] / median
