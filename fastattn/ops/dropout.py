"""Dropout on a counter-based generator: element i of a contiguous tensor is kept when the uniform of logical counter
``offset + i`` under key ``seed`` (word (offset + i) % 4 of Philox4x32-10 at counter (offset + i) // 4: one Philox
evaluation serves four elements) is >= p, and scaled by 1 / (1 - p). Nothing is stored for the backward but
(p, seed, offset): it applies the same keep flags to the gradient. (seed, offset) are drawn from torch's default
generator, so torch.manual_seed reproduces a run. Contract of every backend:

  fwd(x, out, p, seed, offset) -> None: out = x * keep / (1 - p), both contiguous, one dtype; out may be x

Backends: cpu (csrc/cpu/dropout_kernel.cpp) and triton (kernels/dropout.py) keep the same elements (the same Philox
words as the attention kernels' dropout); reference: torch's generator seeded by seed + offset
(reproducible, not Philox-equal). No CUDA C++ kernel: on GPUs Triton runs it. Under torch.compile or a torch.func
transform, and for tensor subclasses, ``dropout`` is torch's own F.dropout (which those understand).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError
from ..backends import Dispatcher, Impl, REFERENCE_DEVICES, compiled_has, compiled_op, triton_op
from .batching import eager_twin, forward_ad_active, graph_capture, has_torch_function_subclass, is_transformed

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class DropoutRequest(NamedTuple):
    device: str
    dtype: torch.dtype


def dropout_rng(one_mask: Optional[str] = None) -> tuple:
    """A dropout mask's Philox (seed, offset) for this op and attention's, drawn from torch's default generator so
    that torch.manual_seed reproduces the mask (one randint call of two values: each call costs ~3 us of host time):
    offsets below 2**40 (far from 2**63) and multiples of 4, so that a Triton block (and each row of an attention
    mask) starts a Philox block: one Philox evaluation gives four elements there (kernels/dropout.py).

    Under vmap(randomness="different") the draw is one per sample: the first sample's serves, as the kernels fold
    the samples into their batch, whose Philox counters differ (a mask per sample). ``one_mask``: the caller's name
    when it needs one mask for every sample, refused there."""
    t = torch.randint(0, 2**62, (2,), device="cpu")
    if not torch.compiler.is_compiling() and torch._C._functorch.is_batchedtensor(t):
        if one_mask:
            raise ArgumentError(f"{one_mask}: dropout under vmap(randomness='different') (its masks differ per "
                                "sample): use randomness='same', or no dropout")
        while torch._C._functorch.is_batchedtensor(t):
            t = torch._C._functorch.get_unwrapped(t)
        t = t.reshape(-1, 2)[0]
    seed, r = t.tolist()
    return seed, 4 * (r >> 24)


def seeded_uniform(shape, seed: int, device) -> Tensor:
    """torch.rand(shape) from a generator seeded with seed on device (the reference backends' dropout); on the meta
    device, which has no generator, a meta tensor."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device=device)
    return torch.rand(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def dropout_ref(x: Tensor, out: Tensor, p: float, seed: int, offset: int) -> None:
    keep = seeded_uniform(x.shape, seed + offset, x.device) >= p
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    out.copy_(x.to(cdt) * (keep.to(cdt) * (1.0 / (1.0 - p))))


dispatcher = Dispatcher("dropout", [
    Impl("triton", triton_op("dropout", "dropout_fwd"), None, ("cuda",), _FLOATS),
    Impl("cpu", compiled_op("dropout_cpu"), None, ("cpu",), _FLOATS + (torch.float64,), compiled_has("dropout_cpu")),
    Impl("reference", dropout_ref, None, REFERENCE_DEVICES, _FLOATS + (torch.float64,)),
])


def _apply(x: Tensor, p: float, seed: int, offset: int, inplace: bool) -> Tensor:
    impl = dispatcher.select(DropoutRequest(x.device.type, x.dtype))
    src = x if x.is_contiguous() else x.contiguous()
    out = src if inplace and src is x else torch.empty_like(src)
    impl.fwd(src, out, p, seed, offset)
    if inplace and out is not x:
        x.copy_(out)
        return x
    return out


class DropoutFunction(torch.autograd.Function):
    """x * keep / (1 - p) with the keep flags of (seed, offset); the backward is the same op on the gradient (so it
    is differentiable again)."""

    @staticmethod
    def forward(x, p, seed, offset, inplace):
        return _apply(x, p, seed, offset, inplace)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p, seed, offset, inplace = inputs
        ctx.args = (p, seed, offset)
        if inplace:
            ctx.mark_dirty(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() or is_transformed(grad):  # double backward (create_graph=True), torch.func
            return DropoutFunction.apply(grad, *ctx.args, False), None, None, None, None
        # a setup_context-style apply binds its arguments with inspect (~9 us): the op itself when nothing records it
        return _apply(grad, *ctx.args, False), None, None, None, None


DropoutFunctionEager = eager_twin(DropoutFunction)


def dropout(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout's signature and meaning, on fastattn's Philox kernels: the mask is drawn several
    times faster than torch's CPU generator draws it, and regenerated in the backward instead of stored."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p: dropout probability has to be between 0 and 1, but got {p!r}")
    if not training or p == 0.0:
        return x
    if p == 1.0 or not x.is_floating_point() or graph_capture() or is_transformed(x) or forward_ad_active() or \
            has_torch_function_subclass(x) or x.dtype not in _FLOATS + (torch.float64,):
        return F.dropout(x, p, training, inplace)
    if inplace and x.requires_grad and x.is_leaf and torch.is_grad_enabled():
        return F.dropout(x, p, training, inplace)  # torch's error for an in-place op on a leaf that requires grad
    seed, offset = dropout_rng()  # torch.manual_seed reproduces the mask
    return DropoutFunctionEager.apply(x, float(p), seed, offset, inplace)
