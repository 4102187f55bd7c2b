"""pytest-benchmark: split-KV decode attention (fastattn.decode_attention) against torch's
F.scaled_dot_product_attention on the same KV cache, one query row per sequence (batch 1, D 64; MHA with 8 heads
and GQA with 32 query heads on 8 kv heads; cache 8192, and 16384 on GPU). Each fastattn row records
``speedup_vs_torch`` (torch's median in the same run / ours) and GB/s (K and V read once); on a GPU,
``test_decode_graphed`` times both from a CUDA graph (the kernels' own time, no launch cost);
``test_decode_interleaved`` alternates the two call by call for noisy shared hosts (ratio of the minima).

    python benchmarks/bench_decode.py --threshold   # decode kernel vs the flash kernel by cache length
    python benchmarks/bench_decode.py --route       # fastattn.attention routed or not, by cache length (MIN_KEYS)
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends import available_backends
from conftest import best_per_call, graphed
from fastattn.testing import sync

GPU = torch.cuda.is_available()
SUITE = os.environ.get("FASTATTN_BENCH_SUITE") == "1"  # the GPU suite: no interleaved rows (its summary reads medians)
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
CACHES = [8192, 16384] if GPU else [8192]
CASES = [(8, 8), (32, 8)]  # (query heads, kv heads)
CALLS, ROUNDS = (20, 20) if GPU else (5, 20)
OURS = [b for b in available_backends() if b in (("triton",) if GPU else ("cpu",))]
_medians = {}  # group -> torch's median, for the ratios


def make(H, Hk, S, L=1, B=1, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(B, Hk, S, D, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(B, Hk, S, D, generator=g).to(DEVICE, DTYPE)
    return q, k, v


def call(impl, q, k, v):
    if impl == "torch":
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])

    def ours():
        with fastattn.backend(impl):
            return fastattn.decode_attention(q, k, v)
    return ours


def rotating(impl, sets):
    """impl's call on each (q, k, v) of sets in turn: caches larger together than the last-level cache are read
    from memory on every call, as a model's layers read theirs (cold)."""
    fns = [call(impl, *t) for t in sets]
    i = [0]

    def run():
        i[0] = (i[0] + 1) % len(fns)
        return fns[i[0]]()
    return run


def gbytes(k, v):
    return (k.numel() * k.element_size() + v.numel() * v.element_size()) / 1e9


@pytest.mark.parametrize("impl", ["torch"] + OURS)
@pytest.mark.parametrize("cache", ["warm", "cold"])
@pytest.mark.parametrize("S", CACHES)
@pytest.mark.parametrize("H,Hk", CASES, ids=["mha", "gqa"])
def test_decode(benchmark, impl, cache, S, H, Hk):
    """warm: the same cache every call (it may stay in the last-level cache: 33.5 MB at 8 heads, S 8192, fp32; a
    GPU's L2 holds 16k bf16); cold: four caches in turn, each read from memory."""
    sets = [make(H, Hk, S, seed=i) for i in range(4 if cache == "cold" else 1)]
    fn = rotating(impl, sets)

    def step():
        for _ in range(CALLS):
            fn()
        sync(DEVICE)

    with torch.no_grad():
        fn()
        sync(DEVICE)
        _record(benchmark, impl, step, sets[0], cache, S, H, Hk)


@pytest.mark.skipif(not GPU, reason="CUDA graphs: GPU only")
@pytest.mark.parametrize("impl", ["torch"] + OURS)
@pytest.mark.parametrize("S", CACHES)
@pytest.mark.parametrize("H,Hk", CASES, ids=["mha", "gqa"])
def test_decode_graphed(benchmark, impl, S, H, Hk):
    """The kernels' GPU time, no host time on either side: CALLS calls over four caches in turn (cold) captured in
    one CUDA graph and replayed, as a graphed decode step runs them (generate(cuda_graph=True))."""
    sets = [make(H, Hk, S, seed=i) for i in range(4)]
    fn = rotating(impl, sets)
    with torch.no_grad():
        replay = graphed(fn, CALLS, warmup=len(sets))

    def step():
        replay()
        sync(DEVICE)

    _record(benchmark, impl, step, sets[0], "graph", S, H, Hk)


def _record(benchmark, impl, step, qkv, cache, S, H, Hk):
    """Time step (CALLS calls) and record per-call ms, GB/s and, for ours, the ratio to torch's row of the group."""
    _, k, v = qkv
    group = f"decode B=1 H={H} Hk={Hk} D=64 S={S} L=1 {str(DTYPE)[6:]} {cache}"
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=DEVICE, calls_per_round=CALLS,
                                op=f"decode-H{H}-Hk{Hk}-D64-L1-{cache}", direction="fwd", dtype=str(DTYPE)[6:],
                                width=S, heads=H, kv_heads=Hk)
    benchmark.pedantic(step, warmup_rounds=3, rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: one plain run, no statistics
        return
    median = benchmark.stats.stats.median / CALLS
    benchmark.extra_info["ms_per_call"] = median * 1e3
    benchmark.extra_info["GB/s"] = gbytes(k, v) / median
    if impl == "torch":
        _medians[group] = median
    elif group in _medians:
        benchmark.extra_info["speedup_vs_torch"] = _medians[group] / median


@pytest.mark.skipif(SUITE, reason="the GPU suite times test_decode only")
@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize("H,Hk", CASES, ids=["mha", "gqa"])
def test_decode_interleaved(benchmark, impl, H, Hk):
    """torch and ours alternated round by round at cache 8192 (shared, noisy hosts): the ratio of the minima."""
    q, k, v = make(H, Hk, 8192)
    result = {}

    def step():
        result.update(best_per_call({i: call(i, q, k, v) for i in ("torch", impl)}, rounds=3, calls=CALLS,
                                    device=DEVICE))

    benchmark.group = f"decode interleaved H={H} Hk={Hk} S=8192"
    benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info.update(impl=impl, torch_ms=result["torch"] * 1e3, ours_ms=result[impl] * 1e3,
                                speedup_vs_torch=result["torch"] / result[impl])


def threshold_sweep():
    """Per cache length, L = 1, batch 4, 8 heads, D 64: the decode kernel, the flash kernel (same backend, its own
    short-query path) and torch, each called directly (no fastattn.attention in front)."""
    from fastattn.ops.attention import AttnParams, dispatch
    impl = OURS[0] if OURS else "reference"
    print(f"kernels alone ({impl}, {DEVICE}, {DTYPE}, {torch.get_num_threads()} threads): ms per call")
    for S in [128, 512, 1024, 2048, 4096, 8192]:
        q, k, v = make(8, 8, S, B=4)
        p = AttnParams(scale=64 ** -0.5)
        with fastattn.backend(impl):
            best = best_per_call({"decode": lambda: fastattn.decode_attention(q, k, v),
                                  "flash": lambda: dispatch.fwd(q, k, v, None, None, p, impl),
                                  "torch": call("torch", q, k, v)}, rounds=15, calls=max(1, 20000 // S),
                                 device=DEVICE)
        print(f"S={S:>5} " + " ".join(f"{n} {t * 1e3:.3f}" for n, t in best.items())
              + f"  flash/decode {best['flash'] / best['decode']:.2f}")


def route_sweep(L):
    """fastattn.attention with and without the route to the decode kernel (MIN_KEYS forced), a GPT-2-like decode
    step: batch 1, 12 heads, D 64, L queries, half the cache padded (key_padding_mask)."""
    from fastattn.ops.attention import decode as Dec
    dev = DEVICE
    saved = dict(Dec.MIN_KEYS)
    print(f"fastattn.attention, L={L} ({DEVICE}, {DTYPE}, {torch.get_num_threads()} threads): us per call")
    try:
        for S in [16, 32, 64, 256, 1024, 4096]:
            q, k, v = make(12, 12, S, L=L)
            pad = torch.zeros(1, S, dtype=torch.bool, device=dev)
            pad[:, S // 2:] = True

            def run(min_keys):
                Dec.MIN_KEYS[dev] = min_keys
                Dec._route_backend.cache_clear()
                return fastattn.attention(q, k, v, key_padding_mask=pad)
            best = best_per_call({"routed": lambda: run(1), "flash": lambda: run(1 << 40),
                                  "torch": lambda: F.scaled_dot_product_attention(q, k, v,
                                                                                  attn_mask=~pad[:, None, None])},
                                 rounds=10, calls=100, device=DEVICE)
            print(f"S={S:>5} " + " ".join(f"{n} {t * 1e6:.1f}" for n, t in best.items())
                  + f"  flash/routed {best['flash'] / best['routed']:.2f}")
    finally:
        Dec.MIN_KEYS.update(saved)
        Dec._route_backend.cache_clear()


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.exit(print(__doc__))
    if "--threshold" in sys.argv:
        threshold_sweep()
    elif "--route" in sys.argv:
        route_sweep(L=1)
        route_sweep(L=16)
    else:
        os.execvp(sys.executable, [sys.executable, "-m", "pytest", __file__, "--benchmark-only", "-q"])
