"""INT8 matmul (W8A8, int32 accumulation, fused dequant epilogue) and row-wise int8 quantization: validation,
backend dispatch and custom ops. No autograd: these are inference ops (QAT trains through fake quantization).

Backend contract, on 2-D row-major tensors:
  mm(a int8 (M, K), b int8 (N, K), a_scale f32 (M,) | None, b_scale f32 (N,) | None, bias f32 (N,) | None, out_dtype)
     -> out (M, N) = acc * a_scale[m] * b_scale[n] + bias[n] computed in float32 (acc rounded to float32 first),
        cast to out_dtype; out_dtype=torch.int32 returns the exact int32 accumulator (scales and bias None).
     A backend with an int32 accumulator declares K <= MAX_K_INT32 (dispatch falls back past it).
  quantize(x float (M, K), smooth f32 (K,) | None) -> (q int8 (M, K), scale f32 (M,)): see quantize_rows_ref.
Scales and bias arrive contiguous (a scalar scale is expanded by the caller).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import Dispatcher, Impl, REFERENCE_DEVICES, compiled_has, compiled_op, triton_op
from ..reference import int8_matmul_ref, quantize_rows_ref, w8a16_matmul_ref
from .batching import fold, forward_ad_active, front, graph_capture, is_transformed, unfold

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int32)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


DECODE_M = 16  # rows up to which a call counts as decode-sized
# The largest K whose int32 accumulator cannot overflow: K products of int8s, each up to (-128)**2 = 2**14
MAX_K_INT32 = (2 ** 31 - 1) // 2 ** 14  # 131071


class Int8Request(NamedTuple):
    device: str
    dtype: torch.dtype  # out_dtype for mm, x.dtype for quantize
    K: int
    decode: bool = False  # M <= DECODE_M
    torch_gemm: bool = False  # w8a16: a shape where torch's float32 GEMM beats the CPU kernel (see _w8a16_request)


def _ref_mm(a, b, a_scale, b_scale, bias, out_dtype):
    return int8_matmul_ref(a, b, a_scale, b_scale, bias, out_dtype)


def _int32_acc_check(has: Optional[Callable] = None) -> Callable:
    """An Impl check for a kernel with an int32 accumulator: K <= MAX_K_INT32 (and the op compiled, if ``has``)."""
    def check(req: Int8Request) -> List[str]:
        k = [f"K={req.K} > {MAX_K_INT32} (int32 accumulator)"] if req.K > MAX_K_INT32 else []
        return (has(req) if has else []) + k
    return check


def _gpu_order(req: Int8Request):
    """The faster GEMM on an H100 (benchmarks/results/2026-11-26-h100-run3): Triton's at large M; the CUDA C++
    kernels at decode sizes (a pybind call launches faster than Triton, and their small-M kernel is the faster one)."""
    return ("cuda", "triton", "reference") if req.decode else ("triton", "cuda", "reference")


_GPU_ORDER = {"cuda": _gpu_order}
# Quantization, a memory-bound row pass, at every size on the CUDA C++ kernel (vectorized row loads, bit-exact like
# Triton's): about twice as fast as Triton's on an H100, at one row and at thousands (2026-11-26-h100-run3).
_QUANT_ORDER = {"cuda": ("cuda", "triton", "reference")}
_mm = Dispatcher("int8_matmul", [
    Impl("cuda", compiled_op("int8_mm_cuda"), None, ("cuda",), OUT_DTYPES,
         _int32_acc_check(compiled_has("int8_mm_cuda"))),
    Impl("triton", triton_op("int8", "int8_mm"), None, ("cuda",), OUT_DTYPES, _int32_acc_check()),
    Impl("cpu", compiled_op("int8_mm_cpu"), None, ("cpu",), OUT_DTYPES, _int32_acc_check(compiled_has("int8_mm_cpu"))),
    Impl("reference", _ref_mm, None, REFERENCE_DEVICES, OUT_DTYPES),
], priority=_GPU_ORDER)
_quant = Dispatcher("quantize_per_token", [
    Impl("cuda", compiled_op("quantize_rows_cuda"), None, ("cuda",), X_DTYPES, compiled_has("quantize_rows_cuda")),
    Impl("triton", triton_op("int8", "quantize_rows"), None, ("cuda",), X_DTYPES),
    Impl("cpu", compiled_op("quantize_rows_cpu"), None, ("cpu",), X_DTYPES, compiled_has("quantize_rows_cpu")),
    Impl("reference", quantize_rows_ref, None, REFERENCE_DEVICES, X_DTYPES),
], priority=_QUANT_ORDER)


def _w8a16_ref_rows(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """w8a16_matmul_ref on the backend contract's 2-D rows: its operations in its order (float32 GEMM on the widened
    weight, then * w_scale, then + bias, rounded to x's dtype), the epilogue in place (no (M, N) temporaries; the
    same bits)."""
    out = torch.mm(x.to(torch.float32), w.to(torch.float32).t()).mul_(w_scale)  # (M, N)
    return (out if bias is None else out.add_(bias)).to(x.dtype)


# CPU w8a16 with a float32 x of at least W8A16_TORCH_MIN_M rows and at most W8A16_TORCH_MAX_K columns: the reference
# (torch's float32 GEMM on the weight widened per call, N x K x 4 bytes: at most N x 512 here) runs faster than the
# kernel's GEMM path, whose per-output work outside the GEMM (x transposed per pass, the panels widened, a scalar
# transposed epilogue) is not amortized over so short a K. Int8Linear(mode="w8a16") against nn.Linear, interleaved,
# one thread, 2-core Zen 3 (time ratio, kernel -> reference): N 768: M 128 K 64 1.96 -> 1.40, K 128 1.54 -> 1.20;
# M 512 K 64 2.11 -> 1.23, K 128 1.68 -> 1.25; N 3072: M 128 K 64 1.51 -> 1.31, K 128 1.21 -> 1.25; M 512 K 64
# 1.67 -> 1.15, K 128 1.37 -> 1.17. Outside the bounds neither wins clearly: M 64 (N 768 K 64 1.60 / 1.52, N 3072
# 1.09 / 1.11; K 128 0.96 / 1.04), K 192 (M 128: 1.41 / 1.34 at N 768, 1.03 / 1.05 at N 3072); at M 17-32 the
# kernel alone is 0.63-1.15x F.linear's time, the reference 0.96-1.73x.
W8A16_TORCH_MIN_M = 128
W8A16_TORCH_MAX_K = 128
# and at least W8A16_TORCH_MIN_N outputs: below, the kernel's small panels win (M 128 K 4-32 N 4-16: the reference
# ~55-58 us, the kernel 27-31 us; M 128 K 64 N 64 74 / 54 us)
W8A16_TORCH_MIN_N = 128


def _w8a16_request(x: Tensor, N: int) -> Int8Request:
    M, K = x.shape
    return Int8Request(x.device.type, x.dtype, K, False, x.dtype == torch.float32 and M >= W8A16_TORCH_MIN_M
                       and K <= W8A16_TORCH_MAX_K and N >= W8A16_TORCH_MIN_N)


_w8a16 = Dispatcher("w8a16_matmul", [
    Impl("triton", triton_op("int8", "w8a16_mm"), None, ("cuda",), (torch.float16, torch.bfloat16)),
    Impl("cpu", compiled_op("w8a16_mm_cpu"), None, ("cpu",), X_DTYPES, compiled_has("w8a16_mm_cpu")),
    Impl("reference", _w8a16_ref_rows, None, REFERENCE_DEVICES, X_DTYPES),
], priority={"cpu": lambda req: ("reference", "cpu") if req.torch_gemm else ("cpu", "reference")})


def _leading(n: int, in_dims, *tensors):
    """tensors with the vmapped dim in front: what the batched references take."""
    return [front(t, d, n) for t, d in zip(tensors, in_dims)]


@torch.library.custom_op("fastattn::int8_mm", mutates_args=())
def int8_mm_op(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor], bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    req = Int8Request(a.device.type, out_dtype, a.shape[1], a.shape[0] <= DECODE_M)
    return _mm.select(req).fwd(a, b, a_scale, b_scale, bias, out_dtype)


@int8_mm_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@int8_mm_op.register_vmap
def _(info, in_dims, a, b, a_scale, b_scale, bias, out_dtype):
    n = info.batch_size
    if any(d is not None for d in in_dims[1:]):  # weights or scales per sample: the exact reference, batched
        return int8_matmul_ref(*_leading(n, in_dims, a, b, a_scale, b_scale, bias), out_dtype=out_dtype), 0
    # the vmapped dim folds into the rows of a and its scales: one GEMM
    a, a_scale = fold(a, in_dims[0], n), fold(a_scale, in_dims[2], n)
    return unfold(int8_mm_op(a.contiguous(), b, a_scale, b_scale, bias, out_dtype), n), 0


@torch.library.custom_op("fastattn::quantize_rows", mutates_args=())
def quantize_rows_op(x: Tensor, smooth: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    q, s = _quant.select(Int8Request(x.device.type, x.dtype, x.shape[1], x.shape[0] <= DECODE_M)).fwd(x, smooth)
    return q, s


@quantize_rows_op.register_fake
def _(x, smooth):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@quantize_rows_op.register_vmap
def _(info, in_dims, x, smooth):
    n = info.batch_size
    if in_dims[1] is not None:  # a smoothing vector per sample
        x, smooth = _leading(n, in_dims, x, smooth)
        return quantize_rows_ref(x, smooth[:, None, :]), (0, 0)
    q, s = quantize_rows_op(fold(x, in_dims[0], n).contiguous(), smooth)
    return (unfold(q, n), unfold(s, n)), (0, 0)


def _scale_vector(name: str, s, n: int, lead, device) -> Optional[Tensor]:
    """A scale as float32 (n,): from a python number, a 0-d / 1-element tensor (broadcast) or an (n,) tensor."""
    if s is None:
        return None
    if isinstance(s, (int, float)):
        s = torch.tensor(float(s), device=device)
    if not isinstance(s, Tensor):
        raise TypeError(f"{name}: expected a float or a tensor, got {type(s).__name__}")
    if s.device != device:
        raise ValueError(f"{name}: on {s.device}, but the operands are on {device}")
    if s.dtype == torch.float32 and s.shape == (n,) and s.is_contiguous():
        return s  # already as the backends take it (the common case): no reshape / to / contiguous calls
    if not s.is_floating_point():
        raise TypeError(f"{name}: dtype {s.dtype} must be floating point")
    if s.numel() == 1:
        return s.reshape(1).to(torch.float32).expand(n).contiguous()
    if tuple(s.shape) not in ((n,), tuple(lead)):
        raise ValueError(f"{name}: shape {tuple(s.shape)}, expected a scalar or ({n},)")
    return s.reshape(n).to(torch.float32).contiguous()


def int8_matmul(a: Tensor, b: Tensor, a_scale: Union[Tensor, float, None] = None,
                b_scale: Union[Tensor, float, None] = None, bias: Optional[Tensor] = None,
                out_dtype: torch.dtype = torch.float16) -> Tensor:
    """out = (a @ b.T) * a_scale[m] * b_scale[n] (+ bias[n]) with exact int32 accumulation, cast to out_dtype.

    a: int8 (..., K) (rows flattened to M); b: int8 (N, K), the nn.Linear weight layout; a_scale: scalar, (M,) or
    a.shape[:-1]; b_scale: scalar or (N,); bias: (N,). out_dtype=torch.int32 returns the raw accumulator (K at most
    MAX_K_INT32 = 131071, where it cannot overflow; a float out_dtype takes any K).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise TypeError(f"{name}: dtype {t.dtype}, expected torch.int8 (quantize with "
                            "fastattn.quantize_per_token / quantize_per_channel)")
    if a.dim() < 1 or b.dim() != 2:
        raise ValueError(f"a: (..., K) and b: (N, K) expected, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[-1] != b.shape[1]:
        raise ValueError(f"b: K mismatch: a has K={a.shape[-1]}, b {tuple(b.shape)} has K={b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"b: on {b.device}, but a is on {a.device}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: {out_dtype} is not one of {OUT_DTYPES}")
    _refuse_grad("int8_matmul", a_scale=a_scale, b_scale=b_scale)
    lead, K, N = a.shape[:-1], a.shape[-1], b.shape[0]
    flat = a.dim() == 2  # the common case: no reshape either way (each costs ~0.7 us of host time)
    a2 = a if flat else a.reshape(lead.numel(), K)  # not -1: K may be 0
    M = a2.shape[0]
    sa = _scale_vector("a_scale", a_scale, M, lead, a.device)
    sb = _scale_vector("b_scale", b_scale, N, (N,), a.device)
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected a ({N},) tensor, got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.device != a.device:
            raise ValueError(f"bias: on {bias.device}, but a is on {a.device}")
        bias = bias.to(torch.float32).contiguous()  # the kernels read it as a vector
    if out_dtype == torch.int32 and (sa is not None or sb is not None or bias is not None):
        raise ValueError("out_dtype: torch.int32 returns the raw accumulator: pass no a_scale, b_scale or bias")
    if out_dtype == torch.int32 and K > MAX_K_INT32:
        raise ValueError(f"out_dtype: torch.int32 with K={K}: the sum of K products of int8s (each up to 2**14) can "
                         f"exceed int32 for K > {MAX_K_INT32}; use a float out_dtype (exact accumulation)")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():  # (the epilogue's sum, differentiable)
        out = (mm_rows(a2.contiguous(), b.contiguous(), sa, sb, None, torch.float32) + bias).to(out_dtype)
    else:
        out = mm_rows(a2.contiguous(), b.contiguous(), sa, sb, bias, out_dtype)
    return out if flat else out.reshape(*lead, N)


def _refuse_grad(op: str, **named) -> None:
    """A clear error for a float argument that asks for a gradient the op does not compute (its output would
    silently have none)."""
    for name, t in named.items():
        if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: requires grad, but {op} computes no gradient for it (train in floating point "
                             "or with fastattn.prepare_qat; detach it for inference)")


def mm_rows(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor], bias: Optional[Tensor],
            out_dtype: torch.dtype) -> Tensor:
    """int8_matmul on arguments already checked and in the backend contract's form (contiguous 2-D int8 a, b;
    float32 (M,) / (N,) scales and bias or None): Int8Linear's per-call path, without the re-validation."""
    if graph_capture() or is_transformed(a, b, a_scale, b_scale, bias):  # torch.compile / jit.trace, torch.func
        return int8_mm_op(a, b, a_scale, b_scale, bias, out_dtype)
    M, K = a.shape
    return _mm.select(Int8Request(a.device.type, out_dtype, K, M <= DECODE_M)).fwd(a, b, a_scale, b_scale, bias,
                                                                                  out_dtype)


def _quantize(x: Tensor, smooth: Optional[Tensor], name: str):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not one of {X_DTYPES}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: shape {tuple(x.shape)} needs a non-empty last dimension")
    K = x.shape[-1]
    if smooth is not None:
        if not isinstance(smooth, Tensor) or tuple(smooth.shape) != (K,):
            raise ValueError(f"smooth: expected a ({K},) tensor, got {getattr(smooth, 'shape', smooth)}")
        if smooth.device != x.device:
            raise ValueError(f"smooth: on {smooth.device}, but x is on {x.device}")
        smooth = smooth.to(torch.float32).contiguous()
    q, s = quantize_rows(x.reshape(-1, K).contiguous(), smooth)
    return q.view(x.shape), s.view(x.shape[:-1])


def quantize_rows(x: Tensor, smooth: Optional[Tensor]):
    """Per-row quantization of a checked contiguous (M, K) x (smooth: float32 (K,) or None), as the backends take it."""
    if graph_capture() or is_transformed(x, smooth):
        return quantize_rows_op(x, smooth)
    M, K = x.shape
    return _quant.select(Int8Request(x.device.type, x.dtype, K, M <= DECODE_M)).fwd(x, smooth)


def quantize_per_token(x: Tensor, smooth: Optional[Tensor] = None):
    """Dynamic per-token (row) int8 quantization of x (..., K), fused absmax -> scale -> round: returns
    (x_int8 (..., K), scale float32 (...)) with x ~= x_int8 * scale[..., None] (* smooth). ``smooth`` (K,) divides
    column k first (SmoothQuant)."""
    return _quantize(x, smooth, "x")


def quantize_per_channel(w: Tensor):
    """Per-output-channel int8 quantization of a weight (N, K): returns (w_int8 (N, K), scale float32 (N,))."""
    if isinstance(w, Tensor) and w.dim() != 2:
        raise ValueError(f"w: expected a 2-D (N, K) weight, got shape {tuple(w.shape)}")
    return _quantize(w, None, "w")


@torch.library.custom_op("fastattn::w8a16_mm", mutates_args=())
def w8a16_mm_op(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _w8a16.select(_w8a16_request(x, w.shape[0])).fwd(x, w, w_scale, bias)


@w8a16_mm_op.register_fake
def _(x, w, w_scale, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


@w8a16_mm_op.register_vmap
def _(info, in_dims, x, w, w_scale, bias):
    n = info.batch_size
    if any(d is not None for d in in_dims[1:]):  # weights per sample: the reference, batched
        return w8a16_matmul_ref(*_leading(n, in_dims, x, w, w_scale, bias)), 0
    return unfold(w8a16_mm_op(fold(x, in_dims[0], n).contiguous(), w, w_scale, bias), n), 0


def w8a16_matmul(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only int8 linear: (x @ w^T) * w_scale[n] (+ bias[n]) in x's dtype. x (..., K) float; w int8 (N, K);
    w_scale (N,). For memory-bound decoding (small M): the weight moves as int8."""
    if not isinstance(x, Tensor) or x.dtype not in X_DTYPES:
        raise TypeError(f"x: expected a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(w, Tensor) or w.dtype != torch.int8 or w.dim() != 2:
        raise TypeError(f"w: expected an int8 (N, K) tensor, got {getattr(w, 'dtype', type(w).__name__)} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    if not x.dim():
        raise ValueError(f"x: shape {tuple(x.shape)}, expected (..., K)")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"w: K mismatch: x has K={x.shape[-1]}, w {tuple(w.shape)} has K={w.shape[1]}")
    if x.device != w.device:
        raise ValueError(f"w: on {w.device}, but x is on {x.device}")
    if w_scale is None:
        raise TypeError("w_scale: required (the weight's scale: a float, or a (N,) tensor from quantize_per_channel)")
    _refuse_grad("w8a16_matmul", w_scale=w_scale)
    N, K = w.shape
    w_scale = _scale_vector("w_scale", w_scale, N, (N,), x.device)
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (N,) or bias.device != x.device:
            got = f"{tuple(bias.shape)} on {bias.device}" if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias: expected a ({N},) tensor on {x.device}, got {got}")
        bias = bias.to(torch.float32).contiguous()
    x2, w = x.reshape(x.shape[:-1].numel(), K).contiguous(), w.contiguous()  # not -1: K may be 0
    if is_transformed(x2, bias) or forward_ad_active():  # torch.func, forward AD: the kernel's value, the gradients
        # (and tangents) of _W8A16Grad by torch ops
        y = w8a16_rows(x2.detach(), w, w_scale, None if bias is None else bias.detach())
        lin = F.linear(x2.float(), w.float() * w_scale[:, None], None if bias is None else bias.float())
        return (y + (lin - lin.detach()).to(y.dtype)).reshape(*x.shape[:-1], N)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _W8A16Grad.apply(x2, w, w_scale, bias).reshape(*x.shape[:-1], N)
    return w8a16_rows(x2, w, w_scale, bias).reshape(*x.shape[:-1], N)


class _W8A16Grad(torch.autograd.Function):
    """w8a16_rows with the gradients of x (through the dequantized weight, as Int8Linear's) and of the bias."""

    @staticmethod
    def forward(ctx, x, w, w_scale, bias):
        ctx.save_for_backward(w, w_scale)
        return w8a16_rows(x, w, w_scale, bias)

    @staticmethod
    def backward(ctx, dy):
        w, w_scale = ctx.saved_tensors
        dx = dequantized_input_grad(dy, w, w_scale) if ctx.needs_input_grad[0] else None
        return dx, None, None, dy.sum(0) if ctx.needs_input_grad[3] else None


def dequantized_input_grad(dy: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """The gradient of x in x W^T for the output gradient dy (..., N), W = w (N, K) int8 * w_scale (N,) per row, in
    dy's dtype: what the int8 layers hand back to their input."""
    return (dy * w_scale.to(dy.dtype)) @ w.to(dy.dtype)


def w8a16_kernel(device: torch.device, dtype: torch.dtype, K: int):
    """The w8a16 backend's fwd(x, w, w_scale, bias) for x of ``dtype`` with K columns, chosen now (the forced backend,
    if any): what w8a16_rows would call, for a caller that binds it once (a decode step)."""
    return _w8a16.select(Int8Request(torch.device(device).type, dtype, K)).fwd


def w8a16_rows(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """w8a16_matmul on checked contiguous 2-D x, w and float32 (N,) w_scale / bias (or None)."""
    if forward_ad_active():  # x's tangent: through the reference's torch ops
        return w8a16_matmul_ref(x, w, w_scale, bias)
    if graph_capture() or is_transformed(x, w, w_scale, bias):
        return w8a16_mm_op(x, w, w_scale, bias)
    return _w8a16.select(_w8a16_request(x, w.shape[0])).fwd(x, w, w_scale, bias)
