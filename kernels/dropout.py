"""Dropout in Triton: one program per BLOCK elements, keep flags from philox_keep at logical counters offset + i,
as the CPU kernels draw them (also the attention kernels' dropout). Contract: fastattn/ops/dropout.py."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def philox_keep(seed, counter, p):
    """counter's uniform >= p: word (counter % 4) of Philox4x32-10 at counter // 4 (csrc/cpu/philox.h: one Philox
    evaluation serves four consecutive counters there)."""
    u0, u1, u2, u3 = tl.rand4x(seed, counter >> 2)
    w = counter & 3
    return tl.where(w == 0, u0, tl.where(w == 1, u1, tl.where(w == 2, u2, u3))) >= p


@triton.jit
def philox_words(seed, block):
    """Philox4x32-10 at counters ``block`` (any shape) as a (*block.shape, 2, 2) tensor: reshaped to (..., 4n), the
    uniforms of counters 4 * block + 0, 1, 2, 3 in order (one evaluation for four counters, where philox_keep spends
    one on each)."""
    u0, u1, u2, u3 = tl.rand4x(seed, block)
    return tl.join(tl.join(u0, u2), tl.join(u1, u3))


@triton.jit
def _dropout_kernel(X, Out, n, p, scale, seed, offset, GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    inside = idx < n
    x = tl.load(X + idx, mask=inside, other=0.0).to(tl.float32)
    if GROUPED:  # offset % 4 == 0: the block's counters start a Philox block
        keep = tl.reshape(philox_words(seed, (offset + start) // 4 + tl.arange(0, BLOCK // 4)), (BLOCK,)) >= p
    else:
        keep = philox_keep(seed, offset + idx, p)
    tl.store(Out + idx, (x * tl.where(keep, scale, 0.0)).to(Out.dtype.element_ty), mask=inside)


def dropout_fwd(x: torch.Tensor, out: torch.Tensor, p: float, seed: int, offset: int) -> None:
    n = x.numel()
    if n:
        _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, p, 1.0 / (1.0 - p), seed, offset,
                                                  GROUPED=offset % 4 == 0, BLOCK=BLOCK)
