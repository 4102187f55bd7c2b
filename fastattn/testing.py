"""Timing helpers shared by the CLI, the benchmarks and the GPU suite (not used by the kernels)."""
import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device="cpu", warmup: int = 3, rep: int = 20, min_time_s: float = 0.0) -> float:
    """Median wall time of fn() in milliseconds; on CUDA synchronized around each call (CUDA events via
    triton.testing.do_bench when Triton is importable)."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    sync(device)
    times, start_all = [], time.perf_counter()
    while len(times) < rep or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def add_norm_bytes(M: int, N: int, dtype: torch.dtype, residual: bool = True, store_s: bool = False,
                   backward: bool = False) -> int:
    """Fewest bytes the fused op must move: inputs read once, outputs written once (weights ignored)."""
    e = torch.tensor([], dtype=dtype).element_size()
    fwd = M * N * e * (1 + residual + 1 + store_s)  # x, residual, y, s
    if not backward:
        return fwd
    return fwd + M * N * e * (3 + residual)  # dy, s read; dx (and dresidual) written


def steady_cpu_allocator() -> bool:
    """Has glibc keep freed memory for reuse (every block from the heap, none mapped on its own; no trimming), so a
    benchmark's repeated multi-MB tensors are reused instead of handed back to the OS and page-faulted in again on
    every call (~0.6-1 us per 4 KiB page: on our 2-core machine that alone moved one CPU ratio between 0.8x and 10x
    from run to run). A caching allocator (jemalloc, tcmalloc; PyTorch's CPU tuning guide recommends one) gives the
    same steady state. It acts on torch's allocations and fastattn's alike. Returns whether it took effect: glibc
    only, and not when FASTATTN_BENCH_DEFAULT_MALLOC=1. (Until session 25 it only fixed the mmap threshold at glibc's
    32 MiB ceiling, so tensors above that, torch's attention scores, FFN hidden and logits at our benchmark shapes,
    still faulted in fresh on every call: MHA eval read 1.50x there against 1.35x here.)"""
    import ctypes
    import os
    if os.environ.get("FASTATTN_BENCH_DEFAULT_MALLOC", "0") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def table(rows, headers) -> str:
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    lines = [" | ".join(c[i].ljust(w) for c, w in zip(cols, widths)) for i in range(len(rows) + 1)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)

