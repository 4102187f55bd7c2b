"""Dropout in Triton: one program per BLOCK elements, keep flags from tl.rand (Philox) at counters offset + i, so
the CPU kernel keeps the same elements. Contract: fastattn/ops/dropout.py."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _dropout_kernel(X, Out, n, p, scale, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    x = tl.load(X + idx, mask=inside, other=0.0).to(tl.float32)
    keep = tl.rand(seed, offset + idx) >= p
    tl.store(Out + idx, (x * tl.where(keep, scale, 0.0)).to(Out.dtype.element_ty), mask=inside)


def dropout_fwd(x: torch.Tensor, out: torch.Tensor, p: float, seed: int, offset: int) -> None:
    n = x.numel()
    if n:
        _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, p, 1.0 / (1.0 - p), seed, offset, BLOCK=BLOCK)
