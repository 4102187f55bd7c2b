"""Fused linear + cross-entropy (Liger-Kernel's idea): the loss of ``F.cross_entropy(input @ weight.T + bias,
target)`` without the (N, V) logits in memory. Rows go through in chunks: a chunk's logits are one GEMM into a
reused buffer, the cross-entropy kernel turns them in place into their gradient (softmax - onehot) and per-row
losses, and two more GEMMs fold that gradient into the input's and the weight's gradients at once (all in the
forward; the backward only scales them by the incoming gradient). Per step this saves the logits, their
log-softmax and their gradient (three (N, V) tensors: 33 MB each for the CLI's default GPT, 1.6 GB each for
GPT-2 at batch 8 x 1024) and the passes over them. Contract of every backend of the row op:

  fwd(logits (n, V) rows contiguous, target (n,) int64, loss (n,) float32 (float64 for float64), ignore_index,
      write_grad) -> None: loss[i] = logsumexp(logits[i]) - logits[i, target[i]] (0 where target == ignore_index);
      write_grad: logits[i] <- softmax(logits[i]) - onehot(target[i]) (zeros where ignored), in place

Backends: cpu (csrc/cpu/cross_entropy_kernel.cpp), triton (kernels/cross_entropy.py), reference (torch). No CUDA
C++ kernel: on GPUs Triton runs it, as for dropout. torch.compile sees the fused forward as one custom op. Under a
torch.func transform, for tensor subclasses (DTensor) or with a reduction the fused path cannot fold ("none"),
:func:`linear_cross_entropy` is the unfused reference, the same torch calls a user would write.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import Dispatcher, Impl, REFERENCE_DEVICES, compiled_has, compiled_op, forced_backend_name, triton_op
from ..errors import ArgumentError
from ..reference import linear_cross_entropy_ref
from .add_norm import shape_rule_ok
from .batching import (autocast_off, autocast_on, forward_ad_active, graph_capture, has_torch_function_subclass,
                       is_transformed)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Logits per chunk. CPU: 16 MB of float32, in L3 between the passes. GPU: 512 MB of bf16. Every chunk adds its
# weight gradient into a (V, d) float32 accumulator (and, in bf16, through a (V, d) temporary), ~12 V d bytes of
# traffic; with Liger's rule (chunk logits ~ the input's size: ~V / d chunks) that traffic outgrows the GEMMs
# themselves at GPT-2 / Llama-3 vocabularies (30 GB, 197 GB a step at 8192 tokens), so fewer, larger chunks.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}
MIN_CHUNK_ROWS = {"cpu": 256, "cuda": 64}  # fewer rows make the chunk's GEMMs inefficient


class CrossEntropyRequest(NamedTuple):
    device: str
    dtype: torch.dtype


def cross_entropy_rows_ref(logits: Tensor, target: Tensor, loss: Tensor, ignore_index: int, write_grad: bool) -> None:
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(cdt)
    ignored = target == ignore_index
    t = target.masked_fill(ignored, 0)
    lse = torch.logsumexp(x, -1)
    loss.copy_(torch.where(ignored, 0.0, lse - x.gather(1, t[:, None]).squeeze(1)))
    if write_grad:
        g = torch.exp(x - lse[:, None])
        g.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
        logits.copy_(g.masked_fill_(ignored[:, None], 0.0))


dispatcher = Dispatcher("cross_entropy", [
    Impl("triton", triton_op("cross_entropy", "cross_entropy_fwd"), None, ("cuda",), _FLOATS),
    Impl("cpu", compiled_op("cross_entropy_cpu"), None, ("cpu",), _FLOATS + (torch.float64,),
         compiled_has("cross_entropy_cpu")),
    Impl("reference", cross_entropy_rows_ref, None, REFERENCE_DEVICES, _FLOATS + (torch.float64,)),
])


def chunk_rows(N: int, V: int, device: torch.device) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS logits, at least MIN_CHUNK_ROWS, at most N. On CPU the chunk's GEMMs
    (whose inner dimension it is for the weight's gradient) run faster the more rows they get: 2-core host, V 4096,
    256 rows 39 ms, 1024 rows 36 ms, unfused 53 ms."""
    kind = device.type if device.type in CHUNK_ELEMENTS else "cuda"
    return max(1, min(N, max(MIN_CHUNK_ROWS[kind], CHUNK_ELEMENTS[kind] // V)))


def _check_targets(t: Tensor, V: int, ignore_index: int) -> None:
    if t.device.type == "meta":  # no values to check
        return
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bool(bad.any()):
        raise ArgumentError(f"target: class index {t[bad][0].item()} is outside [0, {V}) and is not ignore_index "
                            f"({ignore_index})")


@torch.library.custom_op("fastattn::checked_targets", mutates_args=())
def checked_targets_op(target: Tensor, V: int, ignore_index: int) -> Tensor:
    """A copy of target after _check_targets: compiled and exported programs on the unfused path keep the
    ArgumentError for a class index outside [0, V) (the fused op checks its targets itself)."""
    _check_targets(target.reshape(-1), V, ignore_index)
    return target.clone()


@checked_targets_op.register_fake
def _(target, V, ignore_index):
    return torch.empty_like(target)


def _fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, ignore_index: int, chunk: int, cd: torch.dtype,
         need_x: bool, need_w: bool, need_b: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses (N,) and the unscaled gradients of x (N, d) in cd, w (V, d) and b (V,) in float32 (float64
    for float64): each empty when not needed."""
    _check_targets(target, w.shape[0], ignore_index)
    impl = dispatcher.select(CrossEntropyRequest(x.device.type, cd), backend or None)
    N, V = x.shape[0], w.shape[0]
    acc = torch.float64 if cd == torch.float64 else torch.float32
    grad = need_x or need_w or need_b
    with autocast_off(x.device.type):
        xc, wc = x.to(cd).contiguous(), w.to(cd).contiguous()
        bc = None if b is None else b.to(cd)
        losses = torch.empty(N, dtype=acc, device=x.device)
        gx = torch.empty_like(xc) if need_x else x.new_empty(0, dtype=cd)
        gw = torch.zeros(w.shape, dtype=acc, device=x.device) if need_w else x.new_empty(0, dtype=acc)
        gb = torch.zeros(V, dtype=acc, device=x.device) if need_b else x.new_empty(0, dtype=acc)
        buf = torch.empty(min(chunk, N), V, dtype=cd, device=x.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            xs, lg = xc[s:e], buf[:e - s]
            if bc is None:
                torch.mm(xs, wc.t(), out=lg)
            else:
                torch.addmm(bc, xs, wc.t(), out=lg)
            impl.fwd(lg, target[s:e], losses[s:e], ignore_index, grad)
            if need_x:
                torch.mm(lg, wc, out=gx[s:e])
            if need_w:
                if cd == acc:
                    gw.addmm_(lg.t(), xs)
                else:
                    gw.add_(torch.mm(lg.t(), xs))
            if need_b:
                gb.add_(lg.sum(0, dtype=acc))
    return losses, gx, gw, gb


# The custom op: opaque to torch.compile, with a fake implementation for tracing; eager calls _fwd directly.
linear_cross_entropy_fwd_op = torch.library.custom_op("fastattn::linear_cross_entropy_fwd", _fwd, mutates_args=())


@linear_cross_entropy_fwd_op.register_fake
def _(x, w, b, target, ignore_index, chunk, cd, need_x, need_w, need_b, backend):
    acc = torch.float64 if cd == torch.float64 else torch.float32
    N, d, V = x.shape[0], x.shape[1], w.shape[0]
    return (x.new_empty(N, dtype=acc), x.new_empty((N, d) if need_x else (0,), dtype=cd),
            x.new_empty((V, d) if need_w else (0,), dtype=acc), x.new_empty(V if need_b else 0, dtype=acc))


def _op_setup_context(ctx, inputs, output):
    x, w, b, target, ignore_index, chunk, cd, need_x, need_w, need_b, backend = inputs
    losses, gx, gw, gb = output
    ctx.mark_non_differentiable(gx, gw, gb)
    ctx.save_for_backward(gx, gw, gb)
    ctx.dtypes, ctx.need = (x.dtype, w.dtype, None if b is None else b.dtype), (need_x, need_w, need_b)


def _op_backward(ctx, dlosses, dgx, dgw, dgb):
    """The gradients the forward computed, scaled by the losses': exact for x (row by row); w's and b's are sums
    over the rows, so every loss must have one gradient, as under linear_cross_entropy's sum or mean."""
    if torch.is_grad_enabled() and any(ctx.needs_input_grad[:3]):
        raise RuntimeError("fastattn::linear_cross_entropy_fwd: a double backward (create_graph=True) is not supported "
                           "(its gradients are computed in the forward, with no graph)")
    for name, wanted, computed in zip(("x", "w", "b"), ctx.needs_input_grad[:3], ctx.need):
        if wanted and not computed:
            raise RuntimeError(f"fastattn::linear_cross_entropy_fwd: the gradient of {name} was not computed "
                               f"(need_{name}=False: traced without it requiring grad)")
    if any(ctx.needs_input_grad[1:3]) and not torch.compiler.is_compiling() and dlosses.numel() and \
            bool((dlosses - dlosses[:1]).abs().amax() > 0):  # (a nan gradient passes: nan > 0 is False)
        raise RuntimeError("fastattn::linear_cross_entropy_fwd: the losses' gradients differ, but w's and b's "
                           "gradients are sums over the rows (differentiate the losses' sum or mean)")
    scales = (dlosses[:, None], dlosses[:1], dlosses[:1])  # x's row by row; w's and b's one for every row
    out = [(g * c.to(g.dtype)).to(dt) if wanted else None
           for g, c, dt, wanted in zip(ctx.saved_tensors, scales, ctx.dtypes, ctx.needs_input_grad[:3])]
    return (*out,) + (None,) * 8


# The op differentiable by itself: what torch.export's programs record (export keeps no autograd.Function's backward:
# linear_cross_entropy calls the op without the Function there, in _exported_loss).
linear_cross_entropy_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _exported_loss(x, w, b, target, ignore_index: int, mean: bool, chunk: int, cd: torch.dtype, need, backend):
    """LinearCrossEntropyFunction's loss from the differentiable op, for torch.export."""
    losses = linear_cross_entropy_fwd_op(x, w, b, target, ignore_index, chunk, cd, *need, backend)[0]
    total = losses.sum()
    if not mean:
        return total
    count = (target != ignore_index).sum()
    # a mean over no target is nan with gradients 0, as the Function's (and torch's)
    return torch.where(count > 0, total / count.clamp_min(1), float("nan"))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum or mean over the non-ignored rows of cross_entropy(x @ w.T + b, target), x (N, d), w (V, d), b (V,) or
    None, target (N,), in compute dtype cd (the autocast dtype, or x's). The gradients named by ``need`` are computed
    in the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, x, w, b, target, ignore_index: int, mean: bool, chunk: int, cd: torch.dtype, need, backend):
        fwd = linear_cross_entropy_fwd_op if graph_capture() else _fwd
        losses, gx, gw, gb = fwd(x, w, b, target, ignore_index, chunk, cd, *need, backend)
        total = losses.sum()
        count = (target != ignore_index).sum() if mean else None
        ctx.save_for_backward(*(g if n else None for g, n in zip((gx, gw, gb), need)), count)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        return total / count if mean else total

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad[:3]):  # create_graph=True
            raise RuntimeError("fastattn.linear_cross_entropy: a double backward (create_graph=True) is not supported "
                               "(its gradients are computed in the forward, with no graph); F.cross_entropy of "
                               "F.linear's logits supports it")
        *grads, count = ctx.saved_tensors
        # a mean over no target (every one ignored) is nan, as torch's; its gradients are 0, as torch's
        scale = g / count.clamp_min(1) if count is not None else g
        out = [None if t is None else (t * scale.to(t.dtype)).to(dt) for t, dt in zip(grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None)


def _check(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], reduction: str) -> None:
    for name, t in (("input", input), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise ArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
    if input.dim() < 1 or not input.is_floating_point():
        raise ArgumentError(f"input: expected a floating tensor (..., d), got {input.dtype} of shape "
                            f"{tuple(input.shape)}")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ArgumentError(f"weight: expected shape (V, {input.shape[-1]}) for input of shape {tuple(input.shape)}, "
                            f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ArgumentError("weight: no classes (V = 0)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ArgumentError(f"target: expected shape {tuple(input.shape[:-1])} (input's without its last dim), got "
                            f"{tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ArgumentError(f"target: expected class indices (an integer tensor), got {target.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ArgumentError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ArgumentError(f"{name}: on {t.device}, input on {input.device}")
    if reduction not in ("mean", "sum", "none"):
        raise ArgumentError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


# Where the unfused reference (F.linear + F.cross_entropy: the logits, their log-softmax and gradient materialised)
# beats the fused path on CPU, float32: (a) at most TORCH_MAX_LOGITS logits, where the fused path's fixed host work
# (its buffers, the gradients' zeroing and rescaling, a dozen more torch calls: ~150 us a call on a 2-core Zen 3)
# outweighs the logits' passes; (b) with the weight's gradient, at most TORCH_MAX_ROWS_PER_D rows per unit of the
# hidden size d: the fused path's (V, d) float32 weight gradient (zeroed, accumulated into, rescaled in the backward:
# ~3 V d passes) costs more than the (N, V) logits passes it saves, and holds more memory than those logits.
# Measured interleaved, one thread, fwd+bwd, time / torch's (fused -> reference): d 256: N 16 V 100 2.41 -> 1.58,
# V 1000 1.67 -> 1.23, V 8192 1.30 -> 0.98; N 64 V 100 1.92 -> 1.42, V 8192 1.17 -> 0.98; N 256 V 100 1.47 -> 1.19;
# N 1024 V 100 1.12 -> 1.06; d 64: N 16 V 8192 1.20 -> 1.02; d 768: N 192 V 8192 1.09 -> 1.02. The other side: d 256
# N 256 V 1000 (256k logits) 1.05 / 1.06, N 128 V 8192 (N = d / 2) 0.91 / 1.09, N 1024 V 1000 0.93 / 0.98; d 64
# N 32 V 8192 1.04 / 1.13; without gradients (where (b) does not apply) d 256 N 64 V 32768 0.87 / 1.08.
TORCH_MAX_LOGITS = 1 << 17
TORCH_MAX_ROWS_PER_D = 0.25


def torch_faster(x: Tensor, weight: Tensor, bias: Optional[Tensor], cd: torch.dtype, need_w: bool) -> bool:
    """Whether linear_cross_entropy on rows x (N, d) runs the unfused reference (CPU, float32, auto mode; eager,
    compiled or a static torch.export: add_norm.shape_rule_ok): see TORCH_MAX_LOGITS."""
    if not x.is_cpu or cd != torch.float32 or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or (bias is not None and bias.dtype != torch.float32):
        return False
    if not shape_rule_ok(x):  # (before any test of the sizes: under a dynamic export it would guard them)
        return False
    N, d = x.shape
    if N * weight.shape[0] > TORCH_MAX_LOGITS and not (need_w and N <= TORCH_MAX_ROWS_PER_D * d):
        return False
    return not forced_backend_name()


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias).float().flatten(0, -2), target.flatten(),
    ignore_index=ignore_index, reduction=reduction)`` with input (..., d), weight (V, d), target (...) class indices,
    without materialising the logits: an LM head's loss in a fraction of its memory and time. reduction="none"
    returns the per-token losses shaped like ``target`` (the unfused expression, logits materialised). Under autocast
    the GEMMs run in the autocast dtype and the softmax in float32, as the unfused expression does. ``chunk_size``:
    rows per chunk (default: see :func:`chunk_rows`; small float32 problems on the CPU then run the unfused
    expression, faster there: TORCH_MAX_LOGITS). Targets outside [0, V) other than ignore_index raise
    ArgumentError."""
    _check(input, weight, target, bias, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if reduction == "none" or is_transformed(input, weight, bias) or forward_ad_active() or \
            has_torch_function_subclass(input, weight, target, bias):
        if not is_transformed(target) and not has_torch_function_subclass(target):
            _check_targets(target, weight.shape[0], ignore_index)
        return linear_cross_entropy_ref(input, weight, target, bias, ignore_index=ignore_index, reduction=reduction)
    x, t = input.reshape(-1, input.shape[-1]), target.reshape(-1).long()
    dev = x.device.type
    cd = torch.get_autocast_dtype(dev) if autocast_on(dev) and x.dtype in _FLOATS else x.dtype
    if x.shape[0] == 0:  # torch: nan for a mean over no rows, 0 for a sum (float64 stays)
        logits = F.linear(x, weight, bias)
        return (logits if logits.dtype == torch.float64 else logits.float()).sum() / (0 if reduction == "mean" else 1)
    grad = torch.is_grad_enabled()
    need = (grad and x.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    if chunk_size is None and torch_faster(x, weight, bias, cd, need[1]):
        if torch.compiler.is_compiling():  # (data-dependent: checked inside an op the graph keeps)
            target = checked_targets_op(target, weight.shape[0], int(ignore_index))
        else:
            _check_targets(t, weight.shape[0], ignore_index)
        return linear_cross_entropy_ref(input, weight, target, bias, ignore_index=ignore_index, reduction=reduction)
    chunk = chunk_size or chunk_rows(x.shape[0], weight.shape[0], x.device)
    fn = _exported_loss if torch.compiler.is_exporting() else LinearCrossEntropyFunction.apply
    return fn(x, weight, bias, t, int(ignore_index), reduction == "mean", chunk, cd, need, forced_backend_name())
