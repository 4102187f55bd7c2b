"""add + LayerNorm on the CPU against torch, call by call alternated (torch, fastattn, torch, ...), medians of
REPS x CALLS: on a shared, noisy machine both sides see the same memory state, which pytest-benchmark's
one-side-then-the-other rounds do not (runs on this project's machine moved a ratio by up to 10x when torch's
allocations began to page-fault). Run: python benchmarks/cpu_interleaved.py [M N] [REPS CALLS]."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn.testing import steady_cpu_allocator


def main(M=4096, N=1024, reps=3, calls=50):
    torch.manual_seed(0)
    x, r, dy = (torch.randn(M, N) for _ in range(3))
    w, b = torch.randn(N), torch.randn(N)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]

    def backward(fn):
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(dy)

    def torch_fwd(x, r, w, b):
        return F.layer_norm(x + r, (N,), w, b)

    pairs = {"fwd": (lambda: torch_fwd(x, r, w, b), lambda: fastattn.add_layer_norm(x, r, w, b)),
             "fwd+bwd": (lambda: backward(torch_fwd), lambda: backward(fastattn.add_layer_norm))}
    steady = steady_cpu_allocator()
    print(f"add + LayerNorm [{M}, {N}] fp32, {torch.get_num_threads()} threads, backend "
          f"{fastattn.available_backends()[0]}, steady allocator {steady}")
    for name, (theirs, ours) in pairs.items():
        for rep in range(reps):
            for _ in range(5):
                theirs(), ours()
            t_theirs, t_ours = [], []
            for _ in range(calls):
                for f, acc in ((theirs, t_theirs), (ours, t_ours)):
                    t0 = time.perf_counter()
                    f()
                    acc.append(time.perf_counter() - t0)
            a, o = statistics.median(t_theirs), statistics.median(t_ours)
            print(f"{name:8s} rep {rep}: torch {a * 1e3:.3f} ms, fastattn {o * 1e3:.3f} ms, {a / o:.2f}x")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
