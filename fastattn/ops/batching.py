"""torch.func support shared by the ops: a vmap rule folds the vmapped dimension into a dimension the kernel already
loops over (attention's batch, add+norm's and the INT8 GEMM's rows), runs the kernel once, and splits it out again.
No Python loop over the vmapped dimension."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def is_transformed(*tensors: Optional[Tensor]) -> bool:
    """True when any tensor is wrapped by a torch.func transform (vmap's BatchedTensor, grad's wrapper): the
    compiled kernels cannot read such a tensor's memory, so the call must go through a custom op, whose vmap rule
    and autograd formula torch.func understands."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def is_legacy_batched(*tensors: Optional[Tensor]) -> bool:
    """True for the batched tensors of torch's legacy vmap, which gradcheck(check_batched_grad=True) still uses: they
    are batched by running the custom op once per sample (torch's fallback), since no vmap rule sees them."""
    return any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t) for t in tensors)


def front(t: Optional[Tensor], bdim: Optional[int], size: int) -> Optional[Tensor]:
    """t with its vmapped dim (at bdim, or absent: broadcast as a stride-0 view) in front."""
    if t is None:
        return None
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def fold(t: Optional[Tensor], bdim: Optional[int], size: int) -> Optional[Tensor]:
    """t with its vmapped dim merged into its first dim: shape (size * n, ...), the vmapped index outermost. A view
    whenever the strides allow it."""
    return None if t is None else front(t, bdim, size).flatten(0, 1)


def unfold(t: Tensor, size: int) -> Tensor:
    """Inverse of :func:`fold` for an output: (size * n, ...) -> (size, n, ...)."""
    return t.unflatten(0, (size, t.shape[0] // size))
