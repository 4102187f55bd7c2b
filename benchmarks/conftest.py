import os
import sys

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastattn imports triton
from fastattn.testing import steady_cpu_allocator  # noqa: E402

# CPU runs time kernels, not page faults: see steady_cpu_allocator (FASTATTN_BENCH_DEFAULT_MALLOC=1 turns it off).
STEADY_MALLOC = steady_cpu_allocator() if not GPU else False
sys.path.insert(0, os.path.dirname(__file__))


# what model benchmarks run in: bfloat16 on a GPU, float32 on the CPU
DEVICE, DTYPE = ("cuda", torch.bfloat16) if GPU else ("cpu", torch.float32)


# A benchmark file's correctness guard (both sides compute the same thing): it takes the benchmark fixture, unused, so
# that --benchmark-only (the README's and dev.sh bench's command), which skips tests without it, still runs it
GUARD = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")


def env_int(name: str, default: int) -> int:
    """The environment's FASTATTN_BENCH_<name> as an int, else ``default`` (a benchmark's shape or round count)."""
    return int(os.environ.get(f"FASTATTN_BENCH_{name}", default))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["steady_cpu_allocator"] = STEADY_MALLOC


def interleaved(benchmark, runs: dict, ours: str, tokens: int, group: str, rounds: int, **info) -> None:
    """Each round calls every function of ``runs`` (name -> callable, the baseline first) in turn: on a shared,
    noisy machine the ratio of two minima taken in the same rounds (load only ever adds time) is steadier than medians
    taken minutes apart. extra_info: each one's minimum and median (s) and ms/token (``tokens`` per call), and
    speedup_vs_<baseline> of ``ours`` from the minima; the warm-up round is dropped."""
    import time
    times = {name: [] for name in runs}

    def step():
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    benchmark.group = group
    benchmark.extra_info.update(impl="+".join(runs), ours=ours, **info)
    benchmark.pedantic(step, warmup_rounds=1, rounds=rounds, iterations=1)
    best = {}
    for name, ts in times.items():
        ts = sorted(ts[1:] if len(ts) > 1 else ts)
        best[name] = ts[0]
        benchmark.extra_info[f"{name} min s"] = ts[0]
        benchmark.extra_info[f"{name} median s"] = ts[len(ts) // 2]
        benchmark.extra_info[f"{name} ms/token (min, incl. prefill)"] = ts[0] / tokens * 1e3
    base = next(iter(runs))
    benchmark.extra_info[f"speedup_vs_{base}"] = best[base] / best[ours]


def synced(device: str, fn):
    """fn, called under torch.inference_mode and then synchronised with ``device`` (a timed call)."""
    from fastattn.testing import sync

    def call():
        with torch.inference_mode():
            fn()
        sync(device)
    return call


def interleaved_speculative(benchmark, runs: dict, ours, tokens: int, group: str, rounds: int, **info) -> None:
    """``interleaved`` over four runs: "transformers" and "transformers-lookup" (its generate without and with
    prompt_lookup_num_tokens), "fastattn" and "fastattn-lookup" (model ``ours``'s); extra_info adds the draft acceptance
    of ``ours``'s last speculative call and fastattn-lookup's speedups over transformers-lookup and fastattn."""
    interleaved(benchmark, runs, "fastattn-lookup", tokens, group, rounds, **info)
    st = ours.speculation_stats
    extra = benchmark.extra_info
    extra.update(acceptance=st.acceptance, steps=st.steps)
    best = {name: extra[f"{name} min s"] for name in runs}
    extra["speedup_vs_transformers-lookup"] = best["transformers-lookup"] / best["fastattn-lookup"]
    extra["speedup_vs_fastattn"] = best["fastattn"] / best["fastattn-lookup"]


def best_per_call(fns: dict, rounds: int, calls: int, device: str) -> dict:
    """name -> the minimum seconds per call of each function of ``fns``, the functions alternated round by round
    (a shared, noisy host only ever adds time), ``calls`` calls a round after one untimed call, synchronized."""
    import time
    from fastattn.testing import sync
    best = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                fn()
                sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync(device)
                best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return best


def graphed(fn, calls: int, warmup: int = 3):
    """fn's ``calls`` calls captured once in a CUDA graph; returns the replay. ``warmup`` eager calls first, on a
    side stream (autotuning and compiling run there, as torch's CUDA-graph notes ask)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay
