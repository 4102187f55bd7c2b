"""Fused residual-add + LayerNorm / RMSNorm: validation, backend dispatch, custom ops and the autograd.Function.

Every backend implements the same pair of functions on 2-D contiguous tensors:

  fwd(x, residual, weight, bias, eps, is_rms, store_s, s_fp32) -> [y, s, mean, rstd]
  bwd(dy, s, mean, rstd, weight, ds, has_bias, is_rms, dres_fp32) -> [dx, dres, dweight, dbias]

Absent outputs are empty tensors. s = x + residual is rounded to its dtype (float32 when s_fp32, else x's) and
the norm is computed from the rounded s; mean/rstd are float32 (float64 for float64 input), so a forward on one
backend and a backward on another agree. The backward needs s: it is stored when a residual is added and a
gradient is needed, or for prenorm; otherwise x itself serves as s. The full contract: csrc/README.md.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import Dispatcher, Impl, REFERENCE_DEVICES, compiled_op, debug, forced_backend_name, triton_op
from ..reference import add_norm_ref, norm_residual_dtype
from .batching import (direct_call_ok, eager_twin, fold, forward_ad_active, front, grads_with_graph, graph_capture,
                       has_torch_function_subclass, is_legacy_batched, is_transformed, unfold)

MAX_COLS = 65536
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class NormRequest(NamedTuple):
    device: str
    dtype: torch.dtype
    cols: int
    big: bool = False  # at least TRITON_FWD_MIN elements


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- reference backend: the reference forward, and the closed-form backward in torch ops ------------------------
def _ref_fwd(x, residual, weight, bias, eps, is_rms, store_s, s_fp32):
    cdt = _stats_dtype(x.dtype)
    s = x.to(torch.float32 if s_fp32 else x.dtype) if residual is None else \
        (x.to(cdt) + residual.to(cdt)).to(torch.float32 if s_fp32 else x.dtype)
    sc = s.to(cdt)
    mean = sc.new_empty(0) if is_rms else sc.mean(-1)
    centered = sc if is_rms else sc - mean[:, None]
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    y = add_norm_ref(s, None, weight, bias, eps, is_rms=is_rms, upcast=True).to(x.dtype)
    return [y, s if store_s else s.new_empty(0), mean, rstd]


def _ref_bwd(dy, s, mean, rstd, weight, ds, has_bias, is_rms, dres_fp32):
    cdt = _stats_dtype(dy.dtype)
    g, sc, r = dy.to(cdt), s.to(cdt), rstd.to(cdt)[:, None]
    xhat = (sc if is_rms else sc - mean.to(cdt)[:, None]) * r
    dweight = (g * xhat).sum(0) if weight is not None else g.new_empty(0)
    dbias = g.sum(0) if has_bias else g.new_empty(0)
    if weight is not None:
        g = g * weight.to(cdt)
    dsum = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not is_rms:
        dsum = dsum - g.mean(-1, keepdim=True)
    dsum = dsum * r
    if ds is not None:
        dsum = dsum + ds.to(cdt)
    dres = dsum.float() if dres_fp32 else dsum.new_empty(0, dtype=torch.float32)
    return [dsum.to(dy.dtype), dres, dweight, dbias]


def _cols_check(req: NormRequest):
    return [f"row width {req.cols} > {MAX_COLS}"] if req.cols > MAX_COLS else []


_IMPLS = [
    Impl("cuda", compiled_op("add_norm_fwd_cuda"), compiled_op("add_norm_bwd_cuda"), ("cuda",), _FLOATS,
         _cols_check),
    Impl("triton", triton_op("add_norm", "add_norm_fwd"), triton_op("add_norm", "add_norm_bwd"), ("cuda",),
         _FLOATS, _cols_check),
    Impl("cpu", compiled_op("add_norm_fwd_cpu"), compiled_op("add_norm_bwd_cpu"), ("cpu",),
         _FLOATS + (torch.float64,), _cols_check),
    Impl("reference", _ref_fwd, _ref_bwd, REFERENCE_DEVICES, _FLOATS + (torch.float64,)),
]
# On GPU the backward prefers CUDA C++ (the faster on an H100: benchmarks/results/2026-11-26-h100-run1), the forward
# Triton from TRITON_FWD_MIN elements (1.67-2.07x torch at 128M against CUDA C++'s 1.58-1.86x, run 3) and CUDA C++
# below: a Triton launch costs ~50 us more host time than a pybind call (run 4: add_layer_norm took 84 us a call
# against torch's 20), more than the kernels' difference until the tensors are tens of MB. Both share the
# (y, s, mean, rstd) contract, so they mix.
TRITON_FWD_MIN = 1 << 24
_dispatch = Dispatcher("add_norm", _IMPLS, priority={
    "cuda": lambda req: ("triton", "cuda", "reference") if req.big else ("cuda", "triton", "reference")})
_bwd_dispatch = Dispatcher("add_norm_backward", _IMPLS, priority={"cuda": ("cuda", "triton", "reference")})


def _request(t: Tensor) -> NormRequest:
    return NormRequest(t.device.type, t.dtype, t.shape[-1], t.numel() >= TRITON_FWD_MIN)


def select_backend(x: Tensor, backend: Optional[str] = None) -> str:
    """The backend that would run add_layer_norm / add_rms_norm on x (raises if a forced one cannot)."""
    return _dispatch.select(_request(x), backend).backend


def why_not(x: Tensor):
    """Every backend's reasons against running on x (an empty list means supported)."""
    return _dispatch.why_not(_request(x))


# ---- custom ops: opaque to torch.compile, with fake implementations for tracing -------------------------------
def _fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
         is_rms: bool, store_s: bool, s_fp32: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _dispatch.select(_request(x), backend or None)
    return tuple(impl.fwd(x, residual, weight, bias, eps, is_rms, store_s, s_fp32))


def _bwd(dy: Tensor, s: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], ds: Optional[Tensor],
         has_bias: bool, is_rms: bool, dres_fp32: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _bwd_dispatch.select(_request(dy), backend or None)
    return tuple(impl.bwd(dy, s, mean, rstd, weight, ds, has_bias, is_rms, dres_fp32))


# Custom ops: opaque to torch.compile, with fake implementations for tracing. Eager calls skip this layer (its
# dispatch costs microseconds that small rows notice) and call _fwd / _bwd directly.
add_norm_fwd_op = torch.library.custom_op("fastattn::add_norm_fwd", _fwd, mutates_args=())
add_norm_bwd_op = torch.library.custom_op("fastattn::add_norm_bwd", _bwd, mutates_args=())


@add_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, is_rms, store_s, s_fp32, backend):
    M, N = x.shape
    st = _stats_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty((M, N) if store_s else (0,), dtype=torch.float32 if s_fp32 else x.dtype),
            x.new_empty(0 if is_rms else M, dtype=st), x.new_empty(M, dtype=st))


@add_norm_bwd_op.register_fake
def _(dy, s, mean, rstd, weight, ds, has_bias, is_rms, dres_fp32, backend):
    M, N = dy.shape
    st = _stats_dtype(dy.dtype)
    return (torch.empty_like(dy), dy.new_empty((M, N) if dres_fp32 else (0,), dtype=torch.float32),
            dy.new_empty(N if weight is not None else 0, dtype=st), dy.new_empty(N if has_bias else 0, dtype=st))


class _LeafAccumulation:
    """Does the running backward pass accumulate a gradient into a leaf among ``tensors``? Built in the forward,
    asked in the backward (AddNormFunction's dres_fp32).

    Why: .backward() accumulating into x or residual gets a separate dres (the leaf's AccumulateGrad would clone a
    dx shared by two edges: a copy saved); torch.autograd.grad(), which accumulates nothing, gets one dx for both (a
    tensor pass saved). Only private autograd internals tell the two apart: the leaves' AccumulateGrad nodes and
    torch._C._will_engine_execute_node. Where they are missing, or while torch.compile traces, runs() answers True:
    the separate dres, correct either way.
    """

    def __init__(self, *tensors):
        self.nodes = None  # None: unknown
        if torch.compiler.is_compiling():
            return
        try:
            from torch.autograd.graph import get_gradient_edge
        except ImportError:
            return
        self.nodes = tuple(get_gradient_edge(t).node for t in tensors if t.is_leaf)

    def runs(self) -> bool:
        if self.nodes is None:
            return True
        try:
            return any(torch._C._will_engine_execute_node(n) for n in self.nodes)
        except RuntimeError:  # torch refuses the question for a leaf while autograd.grad() runs
            return False
        except AttributeError:  # private API gone: assume the accumulation runs
            return True


class AddNormFunction(torch.autograd.Function):
    """(y, s, mean, rstd) of add+norm over the last dim of x. s is the stored x + residual (shaped like x; empty
    unless store_s), mean / rstd the per-row statistics (M,): the backward's, not differentiable. torch.func: vmap
    moves the vmapped dim in front of the rows (one launch), and the backward is AddNormBackward."""

    @staticmethod
    def forward(x, residual, weight, bias, eps, is_rms, prenorm, s_dtype, backend, needs_grad):
        shape = x.shape
        flat = x.dim() == 2  # rows already: no reshape / view either way (~1-3 us of host time each)
        x2 = (x if flat else x.reshape(-1, shape[-1])).contiguous()  # (M, N)
        r2 = None if residual is None else (residual if flat else residual.reshape(-1, shape[-1])).contiguous()
        s_fp32 = s_dtype == torch.float32 and x.dtype != torch.float32
        store_s = prenorm or (needs_grad and (residual is not None or s_fp32))
        fwd = add_norm_fwd_op if graph_capture() else _fwd
        y, s, mean, rstd = fwd(x2, r2, weight, bias, eps, is_rms, store_s, s_fp32, backend)
        if flat:  # (s is x itself when the reference kept it: a view, as before, not the input as an output)
            return y, (s.view(shape) if s is x else s), mean, rstd
        return y.view(shape), (s.view(shape) if store_s else s), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, eps, is_rms, prenorm, s_dtype, backend, needs_grad = inputs
        y, s, mean, rstd = output
        ctx.set_materialize_grads(False)
        # s = x + residual is differentiable (prenorm's residual stream) when x or residual is: not by weight or bias
        s_grad = prenorm and any(ctx.needs_input_grad[:2])
        ctx.mark_non_differentiable(*((mean, rstd) if s_grad else (s, mean, rstd)))
        if needs_grad:
            base = s if s.numel() or not x.numel() else x
            # (an inference-mode x beside a weight that trains: torch refuses to save it, torch's rms_norm does not)
            inference = not torch.compiler.is_compiling() and base.is_inference()  # (dynamo cannot trace the test)
            ctx.save_for_backward(base.clone() if inference else base, mean, rstd, weight)
        # Both gradients wanted and one of x, residual a leaf: its AccumulateGrad would clone a dx shared by two edges.
        ctx.leaf_pair = (residual is not None and all(ctx.needs_input_grad[:2]) and (x.is_leaf or residual.is_leaf))
        ctx.leaf_accumulation = None if not ctx.leaf_pair or torch.compiler.is_compiling() or \
            is_transformed(x, residual) else _LeafAccumulation(x, residual)
        ctx.y_dtype, ctx.prenorm, ctx.eps, ctx.s_stored = y.dtype, prenorm, eps, bool(s.numel())
        ctx.meta = (x.shape, is_rms, bias is not None, backend, None if residual is None else residual.dtype,
                    None if weight is None else weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, dy, ds, dmean, drstd):
        shape, is_rms, has_bias, backend, res_dtype, w_dtype, b_dtype = ctx.meta
        s, mean, rstd, weight = ctx.saved_tensors
        N = shape[-1]
        s = s.reshape(-1, N)
        dy2 = torch.zeros_like(s, dtype=ctx.y_dtype) if dy is None else dy.reshape(-1, N)  # only s was used
        # s carries a gradient only as prenorm's residual stream (torch.compile hands a non-differentiable output
        # a zero gradient anyway, shaped like s: empty when s was not stored)
        ds2 = None if ds is None or not ctx.prenorm else ds.reshape(-1, N).to(s.dtype)
        # A float32 residual's gradient comes from the kernel as its own float32 tensor: for a half x it has another
        # dtype; for a float32 x beside a leaf that this pass accumulates into it spares autograd a copy (a leaf's
        # AccumulateGrad clones a gradient that another edge still holds). Otherwise (activations, or
        # torch.autograd.grad capturing the leaves) dx serves both, as torch's x + r does: one tensor pass fewer.
        dres_fp32 = res_dtype == torch.float32 and (dy2.dtype != torch.float32 or (ctx.leaf_pair and (
            ctx.leaf_accumulation is None or ctx.leaf_accumulation.runs())))
        flags = (has_bias, is_rms, dres_fp32, backend)
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() and not compiling and not is_transformed(dy2, s, weight, ds2):
            return _grads_with_graph(ctx, dy, ds, *ctx.saved_tensors[::3])  # create_graph=True: a double backward
        if not compiling and is_transformed(dy2, s, mean, rstd, weight, ds2):  # torch.func
            dx, dres, dw, db = AddNormBackward.apply(dy2, s, mean, rstd, weight, ds2, *flags)
        else:  # the custom op for torch.compile and gradcheck's batched grads (legacy vmap)
            bwd = add_norm_bwd_op if compiling or is_legacy_batched(dy2, ds2) else _bwd
            dx, dres, dw, db = bwd(dy2.contiguous(), s.contiguous(), mean, rstd, weight,
                                   None if ds2 is None else ds2.contiguous(), *flags)
        dx = dx.view(shape)
        if res_dtype is None or not ctx.needs_input_grad[1]:
            dr = None
        else:
            dr = dres.view(shape) if dres_fp32 else dx.to(res_dtype)
        dw = dw.to(w_dtype) if weight is not None and ctx.needs_input_grad[2] else None
        db = db.to(b_dtype) if has_bias and ctx.needs_input_grad[3] else None
        return dx, dr, dw, db, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, residual, weight, bias, *flags):
        n = info.batch_size
        if in_dims[2] is not None or in_dims[3] is not None:  # a weight per sample: the reference, batched by torch
            return _vmapped_ref_fwd(info, in_dims, x, residual, weight, bias, *flags)
        # the vmapped dim becomes the outermost row dim: the rows of every sample in one launch
        x, residual = front(x, in_dims[0], n), front(residual, in_dims[1], n)
        y, s, mean, rstd = AddNormFunction.apply(x, residual, weight, bias, *flags)
        return (y, s, unfold(mean, n) if mean.numel() else mean, unfold(rstd, n)), \
            (0, 0 if s.numel() else None, 0 if mean.numel() else None, 0)


AddNormFunctionEager = eager_twin(AddNormFunction)


def _op_setup_context(ctx, inputs, output):
    """add_norm_fwd_op's context, in AddNormFunction's fields: the op on 2-D rows, with s (when stored) a
    differentiable output, as prenorm's."""
    x, residual, weight, bias, eps, is_rms, store_s, s_fp32, backend = inputs
    y, s, mean, rstd = output
    ctx.no_s = not store_s and (residual is not None or s_fp32)  # the backward reads s: here neither kept nor x
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*((mean, rstd) if store_s else (s, mean, rstd)))
    ctx.save_for_backward(s if store_s else x, mean, rstd, weight)
    ctx.leaf_pair, ctx.leaf_accumulation = False, None
    ctx.y_dtype, ctx.prenorm, ctx.eps, ctx.s_stored = y.dtype, store_s, eps, store_s
    ctx.meta = (x.shape, is_rms, bias is not None, backend, None if residual is None else residual.dtype,
                None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _op_backward(ctx, dy, ds, dmean, drstd):
    if ctx.no_s:
        raise RuntimeError("fastattn::add_norm_fwd: called with store_s=False and a residual (or s_fp32), it kept no "
                           "x + residual for the backward (a program traced without gradients: trace it with them)")
    return AddNormFunction.backward(ctx, dy, ds, dmean, drstd)[:9]  # (the op has no needs_grad argument)


# The op differentiable by itself, with AddNormFunction's backward: what torch.export's programs record (export drops
# an autograd.Function's backward: _add_norm calls the op without the Function there).
add_norm_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _grads_with_graph(ctx, dy: Optional[Tensor], ds: Optional[Tensor], base: Tensor, weight: Optional[Tensor]):
    """AddNormFunction's gradients with a graph of their own (a backward under create_graph=True): y recomputed by
    torch ops from the saved ``base`` (x, or with prenorm s = x + residual, itself an output whose gradient goes
    back through this Function) and differentiated by autograd. Post-norm with a residual keeps s but not x and
    residual, so there is no graph to give them: refused."""
    shape, is_rms, has_bias, _, res_dtype, w_dtype, b_dtype = ctx.meta
    need = ctx.needs_input_grad
    if ctx.s_stored and not ctx.prenorm and (need[0] or need[1]):
        raise RuntimeError("fastattn add+norm: a double backward (create_graph=True) through x and residual is not "
                           "supported with prenorm=False and a residual (the forward keeps x + residual, not x and "
                           "residual); torch's x + residual and F.layer_norm / F.rms_norm support it")
    N = shape[-1]
    dt = dw = None
    if dy is not None:
        dt, dw = grads_with_graph(lambda s, w: add_norm_ref(s, None, w, None, ctx.eps, is_rms=is_rms,
                                                            upcast=True).to(ctx.y_dtype), (base, weight), dy)
    if ds is not None and ctx.prenorm:
        dt = ds if dt is None else dt + ds
    dx = None if dt is None or not need[0] else dt.to(ctx.y_dtype)
    dr = None if dt is None or res_dtype is None or not need[1] else dt.to(res_dtype)
    dw = None if dw is None else dw.to(w_dtype)
    db = dy.reshape(-1, N).sum(0).to(b_dtype) if has_bias and need[3] and dy is not None else None
    return dx, dr, dw, db, None, None, None, None, None, None


def _vmapped_ref_fwd(info, in_dims, x, residual, weight, bias, eps, is_rms, prenorm, s_dtype, backend, needs_grad):
    def one(x, residual, weight, bias):
        shape = x.shape
        r2 = None if residual is None else residual.reshape(-1, shape[-1])
        s_fp32 = s_dtype == torch.float32 and x.dtype != torch.float32
        y, s, mean, rstd = _ref_fwd(x.reshape(-1, shape[-1]), r2, weight, bias, eps, is_rms, True, s_fp32)
        return y.view(shape), s.view(shape), mean, rstd

    y, s, mean, rstd = torch.vmap(one, in_dims=in_dims[:4], randomness=info.randomness)(x, residual, weight, bias)
    if not (prenorm or needs_grad):
        s = s.new_empty(0)
    return (y, s, mean, rstd), (0, 0 if s.numel() else None, 0 if mean.numel() else None, 0)


class AddNormBackward(torch.autograd.Function):
    """The add+norm backward as a function of its own, so that torch.func can batch it (jacrev, per-sample
    gradients); it has no derivative itself (no double backward)."""

    @staticmethod
    def forward(dy, s, mean, rstd, weight, ds, has_bias, is_rms, dres_fp32, backend):
        return tuple(_bwd(dy.contiguous(), s.contiguous(), mean, rstd, weight, None if ds is None else ds.contiguous(),
                          has_bias, is_rms, dres_fp32, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fastattn add+norm: double backward is not implemented")

    @staticmethod
    def vmap(info, in_dims, dy, s, mean, rstd, weight, ds, has_bias, is_rms, dres_fp32, backend):
        n = info.batch_size
        if in_dims[4] is not None:  # a weight per sample: the reference backward, batched by torch
            out = torch.vmap(lambda *t: tuple(_ref_bwd(*t, has_bias, is_rms, dres_fp32)), in_dims=in_dims[:6],
                             randomness=info.randomness)(dy, s, mean, rstd, weight, ds)
            return out, tuple(0 if t.numel() else None for t in out)
        dy, s, ds = (fold(t, d, n) for t, d in zip((dy, s, ds), (in_dims[0], in_dims[1], in_dims[5])))
        mean = fold(mean, in_dims[2], n) if mean.numel() else mean
        rstd = fold(rstd, in_dims[3], n)
        dx, dres, _, _ = AddNormBackward.apply(dy, s, mean, rstd, weight, ds, False, is_rms, dres_fp32, backend)
        # the kernel sums dweight / dbias over all rows of every sample: per sample here, in torch ops
        cdt = _stats_dtype(dy.dtype)
        dyc = dy.to(cdt).view(n, -1, dy.shape[-1])  # (n, M, N)
        xhat = ((s.to(cdt) if is_rms else s.to(cdt) - mean.to(cdt)[:, None]) * rstd.to(cdt)[:, None]).view_as(dyc)
        dw = (dyc * xhat).sum(1) if weight is not None else dy.new_empty(0, dtype=cdt)
        db = dyc.sum(1) if has_bias else dy.new_empty(0, dtype=cdt)
        out = (unfold(dx, n), unfold(dres, n) if dres.numel() else dres, dw, db)
        return out, (0, 0 if dres.numel() else None, 0 if dw.numel() else None, 0 if db.numel() else None)


def _check_tensor(name: str, t, x: Tensor, shape, dtypes) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.shape == shape and t.dtype in dtypes and t.device == x.device:
        return
    if t.device != x.device:
        raise ValueError(f"{name}: on device {t.device}, but x is on {x.device}; all tensors must share a device")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported here (expected one of "
                        f"{', '.join(str(d) for d in dtypes)})")


def _validate(x, residual, weight, bias, eps) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or getattr(residual, "is_nested", False):
        for name, t in (("x", x), ("residual", residual)):
            if getattr(t, "is_nested", False) and t.layout == torch.strided:  # (jagged ones run on the reference)
                raise TypeError(f"{name}: a NestedTensor of torch.strided layout is not supported (one of "
                                f"layout=torch.jagged is, or a padded tensor)")
    if x.dtype not in _FLOATS + (torch.float64,):
        raise TypeError(f"x: dtype {x.dtype} is not supported (float16, bfloat16, float32, float64)")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: shape {tuple(x.shape)} needs a non-empty last (normalized) dimension")
    allowed = (x.dtype, torch.float32)
    if residual is not None:
        _check_tensor("residual", residual, x, x.shape, allowed)
    if weight is not None:
        _check_tensor("weight", weight, x, x.shape[-1:], allowed)
    if bias is not None:
        _check_tensor("bias", bias, x, x.shape[-1:], allowed)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite non-negative float, got {eps!r}")


# Where torch's own LayerNorm (F.layer_norm of x + residual, differentiated by torch) beats the kernels on CPU, float32,
# auto mode, when a gradient is wanted: rows of at most NATIVE_MAX_COLS, or at most NATIVE_MAX_ELEMENTS in all. A call
# through AddNormFunction and the C++ kernels costs ~40-90 us of host time more than torch's (a 2-core Zen 3: checks,
# reshapes, the Function's forward and backward in Python), which only larger tensors repay; and on narrow rows the
# kernels lose to torch's outright (widths not a multiple of 8 or 16: the forward 1.1-1.4x torch's, the backward ~2x
# at M 16384). Measured interleaved, one thread, fwd+bwd time / torch's (kernel path -> torch's),
# fastattn.nn.LayerNorm against torch.nn.LayerNorm: M 64 N 7-1024 2.7-2.0 -> 1.3-1.2; M 1024 N 7 1.7 -> 1.1, N 33
# 2.3 -> 1.2, N 64 1.9 -> 1.2, N 128 1.30 -> 1.07, N 256 1.16 -> 1.13; M 512 N 512 1.45 -> 1.09; M 4096 N 33 2.0 ->
# 1.1; M 16384 N 7 1.07 -> 1.02, N 9 1.7 -> 1.0, N 33 1.8 -> 1.0; add_layer_norm with a residual alike (M 64: 2.5 ->
# 1.4, M 256 N 512 1.50 -> 1.12). Past the bounds, kept on the kernels: M 4096 N 128 (512k elements) 1.13 / 1.37,
# add_layer_norm 1.12 / 1.29; M 4096 N 1024 0.71 / 0.98; M 16384 N 96 0.87 / 0.96, N 128 0.97 / 0.95. Without a
# gradient the kernels stay: their forward is 0.55-0.95x torch's from ~256k elements at widths that are multiples of
# 16, and jit.trace (also with a gradient) and dynamic torch.export keep fastattn's op in their graphs, whose results
# eager inference then matches bit for bit (tests/test_func_transforms.py). RMSNorm stays on the kernels: torch's CPU
# rms_norm is composite (several ops and their backwards), 0.12-0.9x the kernels' from M 1024 N 64 / M 256 N 128 on,
# within 0.05-0.3x of them below.
NATIVE_MAX_COLS = 64
NATIVE_MAX_ELEMENTS = 1 << 18


def native_faster(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  prenorm: bool) -> bool:
    """Whether add + LayerNorm of x (rows of its last dim) runs on torch's ops rather than a kernel (see
    NATIVE_MAX_COLS): float32 x, residual, weight and bias on the CPU, a gradient wanted, auto mode, eager, compiled or
    a static export (shape_rule_ok), not under torch.func. Prenorm without a residual stays on the kernels (torch's ops
    would hand back x itself as s)."""
    if not torch.is_grad_enabled():  # (first: inference pays one check)
        return False
    f32 = torch.float32
    if not x.is_cpu or x.dtype != f32 or (residual is None and prenorm) or any(
            t is not None and t.dtype != f32 for t in (residual, weight, bias)):
        return False
    if not shape_rule_ok(x):  # (before any test of the sizes: under a dynamic export it would guard them)
        return False
    if x.shape[-1] > NATIVE_MAX_COLS and x.numel() > NATIVE_MAX_ELEMENTS:
        return False
    if not any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        return False
    return not forced_backend_name() and not is_transformed(x, residual, weight, bias)


def shape_rule_ok(x: Tensor) -> bool:
    """Whether a call may leave fastattn's ops for torch's by its shapes (the CPU rules of add_norm, cross_entropy):
    eager, under torch.compile (which then traces torch's ops: a compiled program computes what eager computes, bit
    for bit under aot_eager; dynamo guards on the shapes) and torch.export of a static x. Not under jit.trace, whose
    graphs keep fastattn's ops, nor for an export with x's shape dynamic (a rule on it would specialize the shape).
    Under torch.compile a forced backend cannot be read (forced_backend_name): the rule applies there regardless."""
    if torch.jit.is_tracing():
        return False
    if torch.compiler.is_exporting():
        return all(type(n) is int for n in x.shape)
    return True


def _native_layer_norm(x, residual, weight, bias, eps, prenorm):
    """add_norm_ref(..., upcast=True) of a LayerNorm on float32 tensors (x, residual, weight, bias all float32), where
    its casts are no-ops: the same torch calls without them (~1.4 us of host time each)."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (x.shape[-1],), weight, bias, eps)
    return (y, s) if prenorm else y


def _add_norm(x, residual, weight, bias, eps, is_rms, prenorm, residual_in_fp32):
    _validate(x, residual, weight, bias, eps)
    s_dtype = norm_residual_dtype(x, residual, residual_in_fp32)
    if residual is not None and x.dtype == torch.float64 and residual.dtype != torch.float64:
        residual = residual.double()  # kernels take a residual of x's dtype or float32 (s is float64 here)
    if has_torch_function_subclass(x, residual, weight, bias) or forward_ad_active():
        debug("fastattn.add_norm: a tensor subclass (%s) or forward-mode AD: the reference (torch ops)",
              ", ".join(type(t).__name__ for t in (x, residual, weight, bias) if t is not None))
        return add_norm_ref(x, residual, weight, bias, eps, is_rms=is_rms, prenorm=prenorm,
                            residual_in_fp32=residual_in_fp32, upcast=True)
    if not is_rms and native_faster(x, residual, weight, bias, prenorm):
        return _native_layer_norm(x, residual, weight, bias, float(eps), prenorm)
    # the kernels read weight and bias as contiguous vectors (a strided or expanded view: a copy, its gradient kept)
    weight, bias = (None if p is None else p.contiguous() for p in (weight, bias))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias))
    args = (x, residual, weight, bias, float(eps), is_rms, bool(prenorm), s_dtype, forced_backend_name(), needs_grad)
    if torch.compiler.is_compiling() or is_transformed(x, residual, weight, bias):
        # torch.export keeps no autograd.Function's backward (strict: none at all), the op's own formula records
        fn = AddNormFunction.forward if torch.compiler.is_exporting() else AddNormFunction.apply
        y, s, _, _ = fn(*args)
    elif needs_grad:
        y, s, _, _ = AddNormFunctionEager.apply(*args)
    else:  # nothing to differentiate (inference, decode): no autograd node, no apply() host time
        y, s, _, _ = AddNormFunction.forward(*args)
    return (y, s) if prenorm else y


def add_norm_rows_nograd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, prenorm: bool = False):
    """add_layer_norm(x, residual, weight, bias, eps, prenorm=prenorm) without its checks, for a caller that asks no
    gradient and hands plain contiguous 2-D rows, residual and parameters of x's dtype and device, outside autocast,
    torch.compile, jit and torch.func (see plain_rows): one call into the dispatched backend's forward. For the
    Transformer layers' inference, where add_layer_norm's checks cost as much host time as a small kernel."""
    y, s, _, _ = _dispatch.select(_request(x), forced_backend_name()).fwd(x, residual, weight, bias, float(eps), False,
                                                                          prenorm, False)
    return (y, s) if prenorm else y


def plain_rows(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> bool:
    """Whether add_norm_rows_nograd may take x, residual (or None), weight, bias and eps (see there)."""
    if torch.is_grad_enabled() or type(x) is not Tensor or x.dim() != 2 or not x.is_contiguous() \
            or not 0 < x.shape[-1] <= MAX_COLS or type(eps) is not float or not 0 <= eps < float("inf") \
            or x.device.type not in ("cpu", "cuda"):
        return False
    if residual is not None and (type(residual) is not Tensor or residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device or not residual.is_contiguous()):
        return False
    for p in (weight, bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device or p.shape != x.shape[-1:]
                              or not p.is_contiguous()):
            return False
    return direct_call_ok(x.device.type, x, residual, weight, bias)


def bind_rows(weight: Optional[Tensor], bias: Optional[Tensor], eps: float, is_rms: bool, prenorm: bool,
              dtype: torch.dtype, device: torch.device) -> Callable:
    """add+norm with these parameters on contiguous 2-D rows (x of ``dtype``, residual of ``dtype`` or None), as one
    call into the backend chosen now (the forced one, if any), checked once here and not per call; inference only
    (no autograd node). Returns f(x, residual) -> (y, s) when ``prenorm``, else -> y. For a decode step, which calls
    the same norm on a few rows every token, where the per-call checks cost more host time than the kernel."""
    if weight is None and bias is None:
        raise ValueError("weight, bias: bind_rows needs at least one of them (it fixes the row width)")
    N = (weight if weight is not None else bias).shape[-1]
    _validate(torch.empty(0, N, dtype=dtype, device=device), None, weight, bias, eps)
    if has_torch_function_subclass(weight, bias):
        raise ValueError("weight, bias: a tensor subclass cannot be bound to a kernel (use add_layer_norm)")
    fwd, eps = _dispatch.select(NormRequest(torch.device(device).type, dtype, N)).fwd, float(eps)
    if prenorm:
        def pre(x: Tensor, residual: Optional[Tensor]):
            y, s, _, _ = fwd(x, residual, weight, bias, eps, is_rms, True, False)
            return y, s
        return pre

    def post(x: Tensor, residual: Optional[Tensor]) -> Tensor:
        return fwd(x, residual, weight, bias, eps, is_rms, False, False)[0]
    return post


def add_layer_norm(x: Tensor, residual: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *, prenorm: bool = False,
                   residual_in_fp32: bool = False):
    """s = x + residual; y = LayerNorm(s) * weight + bias over the last dimension.

    Returns y (x's dtype), or (y, s) when ``prenorm``. s is float32 when ``residual_in_fp32`` or the residual is
    float32, else x's dtype. weight/bias: (N,) of x's dtype or float32, or None. Statistics are float32.
    """
    return _add_norm(x, residual, weight, bias, eps, False, prenorm, residual_in_fp32)


def add_rms_norm(x: Tensor, residual: Optional[Tensor] = None, weight: Optional[Tensor] = None, eps: float = 1e-6,
                 *, prenorm: bool = False, residual_in_fp32: bool = False):
    """s = x + residual; y = s / sqrt(mean(s^2) + eps) * weight. Returns y, or (y, s) when ``prenorm``."""
    return _add_norm(x, residual, weight, None, eps, True, prenorm, residual_in_fp32)
