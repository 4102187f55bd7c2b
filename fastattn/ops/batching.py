"""What the ops share for torch.func and for tensors a kernel must not read: a vmap rule folds the vmapped dimension
into a dimension the kernel already loops over (attention's batch, add+norm's and the INT8 GEMM's rows), runs the
kernel once, and splits it out again (no Python loop over the vmapped dimension); wrapped tensors and torch-function
subclasses are told apart from plain ones."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor


def forward_ad_active() -> bool:
    """True while a forward-mode AD level is open (torch.autograd.forward_ad.dual_level; torch.func.jvp, jacfwd,
    hessian): any input may carry a tangent, which a kernel would drop. The ops then run their reference, torch ops
    that forward AD differentiates (torch's own SDPA refuses forward AD on its fused CPU path)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def graph_capture() -> bool:
    """torch.compile (dynamo) or torch.jit.trace is recording: kernels must be called through their custom ops,
    which both record (a direct call into the compiled kernels is invisible to them: a trace would keep only the
    allocation of the output, and replay uninitialized memory)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def is_transformed(*tensors: Optional[Tensor]) -> bool:
    """True under a torch.func transform, or when any tensor is wrapped by one (vmap's BatchedTensor, grad's
    wrapper): the compiled kernels cannot read such a tensor's memory, so the call must go through an
    autograd.Function or custom op whose vmap rule torch.func applies. False while torch.compile traces: dynamo
    cannot call the check (a graph break, an error under fullgraph), and the traced graph reaches the kernels through
    their custom ops."""
    if torch.compiler.is_compiling():
        return False
    # any transform running counts, wrapped tensors or not: under vmap a tensor that is not vmapped (a shared key, a
    # parameter) is a plain one, and an old-style autograd.Function applied to it raises
    return torch._C._are_functorch_transforms_active() or \
        any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def has_torch_function_subclass(*tensors: Optional[Tensor]) -> bool:
    """True when a tensor is a subclass that gives torch functions its own meaning (DTensor, AsyncCollectiveTensor,
    ...): its memory is not what it says, so a kernel must never read it; torch ops on it do the right thing."""
    for t in tensors:
        if t is None or type(t) is Tensor or type(t) is torch.nn.Parameter:
            continue
        override = getattr(type(t).__torch_function__, "__func__", type(t).__torch_function__)
        if override not in (Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl):
            return True
    return False


def autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device type autocast does not know (meta: it raises)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False), a no-op context for a device type autocast does not know."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else contextlib.nullcontext()


def direct_call_ok(device_type: str, *tensors: Optional[Tensor]) -> bool:
    """Whether a caller that asks no gradient may hand these tensors straight to a kernel's forward, skipping the op's
    Function and custom op: nothing records (graph_capture), no autocast for device_type, and no tensor is a
    torch-function subclass or torch.func-wrapped. The modules' inference short ways ask it."""
    if graph_capture() or autocast_on(device_type) or forward_ad_active():
        return False
    return not (has_torch_function_subclass(*tensors) or is_transformed(*tensors))


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


def eager_twin(cls):
    """An old-style twin of the setup_context-style autograd.Function ``cls`` (same forward, context and backward),
    for calls outside torch.func: torch binds a setup_context-style Function's arguments with inspect on every
    apply (~9 us a call here), the old style does not. torch.func and torch.compile take ``cls`` itself."""
    def forward(ctx, *args):
        out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out

    return type(f"{cls.__name__}Eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(cls.backward), "__doc__": eager_twin.__doc__})


def grads_with_graph(forward: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]],
                     grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``forward(*inputs)`` (torch ops) in those inputs that require grad, given ``grad_out``, with a
    graph of their own: what an autograd.Function's backward returns under create_graph=True (a double backward),
    where its kernels' gradients, graph-less, would make the second derivative silently wrong. Each input goes in as
    a view of itself, so that one tensor passed twice (q, k, v the same) gets a gradient per use; None where an input
    needs none."""
    needs = [t is not None and t.requires_grad for t in inputs]
    if not any(needs):
        return (None,) * len(needs)
    with torch.enable_grad():
        leaves = [t.view_as(t) if n else t for t, n in zip(inputs, needs)]
        out = forward(*leaves)
        grads = iter(torch.autograd.grad(out, [t for t, n in zip(leaves, needs) if n], grad_out, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if n else None for n in needs)
