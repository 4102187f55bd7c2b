"""torch.func support shared by the ops: a vmap rule folds the vmapped dimension into a dimension the kernel already
loops over (attention's batch, add+norm's and the INT8 GEMM's rows), runs the kernel once, and splits it out again.
No Python loop over the vmapped dimension."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def is_transformed(*tensors: Optional[Tensor]) -> bool:
    """True when any tensor is wrapped by a torch.func transform (vmap's BatchedTensor, grad's wrapper): the
    compiled kernels cannot read such a tensor's memory, so the call must go through a custom op, whose vmap rule
    and autograd formula torch.func understands."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def is_legacy_batched(t: Tensor) -> bool:
    """True for the batched tensors of torch's legacy vmap, which gradcheck(check_batched_grad=True) still uses: they
    are batched by running the custom op once per sample (torch's fallback), since no vmap rule sees them."""
    return torch._C._functorch.is_legacy_batchedtensor(t)


def fold(t: Optional[Tensor], bdim: Optional[int], size: int, dim: int = 0) -> Optional[Tensor]:
    """t with its vmapped dim (at bdim, or absent: broadcast) merged into ``dim``: shape (..., size * n, ...), the
    vmapped index outermost. A view whenever the strides allow it."""
    if t is None:
        return None
    if bdim is None:
        t = t.unsqueeze(dim).expand(*t.shape[:dim], size, *t.shape[dim:])
    else:
        t = t.movedim(bdim, dim)
    return t.flatten(dim, dim + 1)


def unfold(t: Tensor, size: int, dim: int = 0) -> Tensor:
    """Inverse of :func:`fold` for an output: (..., size * n, ...) -> (..., size, n, ...) with the vmapped dim at
    ``dim``."""
    return t.unflatten(dim, (size, t.shape[dim] // size))


def batched_size(in_dims: Sequence[Optional[int]], args: Sequence) -> int:
    for d, a in zip(in_dims, args):
        if d is not None:
            return a.shape[d]
    raise ValueError("vmap: no argument is batched")
