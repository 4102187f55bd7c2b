"""Int8Linear (inference: W8A8 dynamic or static, or weight-only W8A16) and QATLinear (fake quantization with a
straight-through estimator for quantization-aware training)."""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.int8 import (X_DTYPES, dequantized_input_grad, mm_rows, quantize_per_channel, quantize_per_token,
                        quantize_rows, w8a16_kernel, w8a16_rows)
from ..ops.batching import forward_ad_active, is_transformed
from ._fx import fx_leaf

MODES = ("w8a8", "w8a8_static", "w8a16")
_KEPT_DTYPE = ("weight_scale", "input_scale", "smooth", "bias")  # Int8Linear's float buffers: not cast with the model


def reads_linear_weights(layer: nn.Module) -> bool:
    """Whether layer is torch's TransformerEncoderLayer (its forward), whose inference fast path hands its Linears'
    weights to a fused kernel directly: those Linears must stay float (fastattn.quantize / convert(int8=...))."""
    return type(layer).forward is nn.TransformerEncoderLayer.forward


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A float vector as the kernels take it (float32, contiguous); no copy when it already is one."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):  # the usual case: no torch call
        return t
    return t.to(torch.float32).contiguous()


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (out_features, in_features) and a float32 scale per output channel.

    mode "w8a8": x is quantized per token on the fly (fused absmax/scale/round) and multiplied on the int8 path;
    "w8a8_static": x uses a calibrated per-tensor ``input_scale``; "w8a16": only the weight is int8 (for
    memory-bound decoding). ``smooth`` (in_features,) divides x's columns before quantization (SmoothQuant, when no
    preceding op absorbs it). Buffers: weight, weight_scale, bias (optional), input_scale, smooth (optional).
    ``dtype`` is the bias buffer's (default float32, the epilogue's own: no conversion per call). The int8 weight
    is frozen (a buffer: train it with QATLinear, then convert), but the gradient flows to x, that of x W^T with W
    the dequantized weight (w8a8's rounding of x passed straight through): adapters, prompts or layers before it
    train over an int8 base, QLoRA-style.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 smooth: bool = False, device=None, dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        dtype = dtype or torch.float32
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)

    def _apply(self, fn, recurse=True):
        """model.half() / .to(bfloat16) keep the scales, smooth and bias in their dtype (float32: the epilogue's, as
        from_pretrained(dtype=...) and torch.ao's quantized Linear keep them); device moves still move them."""
        kept = {n: b for n in _KEPT_DTYPE if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return self

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "w8a8", smooth: Optional[Tensor] = None,
                   input_scale: Optional[float] = None) -> "Int8Linear":
        """Quantize a float nn.Linear (per output channel). ``smooth`` must already be folded into the weight
        (W[:, k] * smooth[k]); ``input_scale`` is needed for w8a8_static."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        if mode == "w8a8_static" and input_scale is None:
            raise ValueError("input_scale: w8a8_static needs a calibrated input scale (fastattn.quantize with "
                             "calib_data computes it)")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, smooth is not None,
                device=w.device)
        m.train(linear.training)
        if w.is_meta:  # a model built on the meta device (shapes only): an Int8Linear of the same shapes there
            return m
        q, s = quantize_per_channel(w.float() if w.dtype == torch.float64 else w)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        if smooth is not None:
            m.smooth.copy_(smooth)
        if mode == "w8a8_static":
            m.input_scale.fill_(float(input_scale))
        return m

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:  # (nn.Linear's name: callers may pass it by keyword)
        x = input
        if not isinstance(x, Tensor) or x.dtype not in X_DTYPES:
            raise TypeError(f"input: expected a tensor of {X_DTYPES}, got {getattr(x, 'dtype', type(x).__name__)}")
        if not x.dim() or x.shape[-1] != self.in_features:
            raise ValueError(f"input: shape {tuple(x.shape)}, expected (..., in_features={self.in_features})")
        if x.device != self.weight.device:
            raise ValueError(f"input: on {x.device}, but the layer's weight is on {self.weight.device}")
        flat = x.dim() == 2  # no reshape / view either way (~0.7 us of host time each)
        x2 = (x if flat else x.reshape(-1, self.in_features)).contiguous()
        if is_transformed(x2) or forward_ad_active():
            # torch.func (grad, jacrev, vmap, jvp) and forward AD: the kernels' value, x's gradient and tangent through
            # the dequantized weight
            out = self._rows(x2.detach()) + self._tangent_path(x2)
        elif torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            # (compiling: dynamo reads a torch.func.grad input as not requiring grad; traced without grad, the
            # Function is its forward)
            out = _InputGrad.apply(x2, self)
        else:
            out = self._rows(x2)
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if isinstance(w, Tensor) and w.is_floating_point():  # (copy_ would truncate it into the int8 buffer: zeros)
            error_msgs.append(f"{prefix}weight: a float weight ({w.dtype}) for an Int8Linear: load the float "
                              f"checkpoint into the float model, then quantize it")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def dequantized_weight(self) -> Tensor:
        """The float32 (out_features, in_features) weight this layer computes with: the int8 weight times its
        per-channel scale, SmoothQuant's factor taken back out of the columns."""
        w = self.weight.to(torch.float32) * self.weight_scale.to(torch.float32)[:, None]
        return w if self.smooth is None else w / self.smooth.to(torch.float32)

    def _tangent_path(self, x2: Tensor) -> Tensor:
        """Zero, with the gradient and tangent of x W^T through the dequantized weight (w8a8's rounding of x passed
        straight through, as _InputGrad's gradient): what the kernels' value lacks under torch.func."""
        lin = F.linear(x2.float(), self.dequantized_weight())
        return (lin - lin.detach()).to(x2.dtype)

    def _rows(self, x2: Tensor) -> Tensor:
        """forward on contiguous, checked (T, in_features) rows."""
        w_scale, bias, smooth = _f32(self.weight_scale), _f32(self.bias), _f32(self.smooth)
        w = self.weight if self.weight.is_contiguous() else self.weight.contiguous()
        if self.mode == "w8a16":
            return w8a16_rows(x2 if smooth is None else (x2 / smooth.to(x2.dtype)).contiguous(), w, w_scale, bias)
        if self.mode == "w8a8":
            q, s = quantize_rows(x2, smooth)
        else:
            xf = x2.float() if smooth is None else x2.float() / smooth
            q = torch.round(xf / self.input_scale).clamp_(-127, 127).to(torch.int8)  # beyond the range: clamped
            s = self.input_scale.to(torch.float32).reshape(1).expand(x2.shape[0])
            # a row with inf or NaN gives NaN, as in the w8a8 mode (not a clamped or garbage int8 value)
            s = torch.where(torch.isfinite(xf).all(-1), s, float("nan"))
        return mm_rows(q, w, s, w_scale, bias, x2.dtype)

    def bind_rows(self, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """This layer on contiguous 2-D rows of ``dtype``, forward's checks and conversions done once here and the
        kernel chosen now (the forced backend, if any): for a decode step, which calls it on a few rows every token.
        w8a16 without smoothing: the kernel itself; w8a8: the quantize and GEMM calls; w8a8_static: forward."""
        if dtype not in X_DTYPES:
            raise TypeError(f"dtype: expected one of {X_DTYPES}, got {dtype}")
        w_scale, bias, smooth = _f32(self.weight_scale), _f32(self.bias), _f32(self.smooth)
        w = self.weight.contiguous()
        if self.mode == "w8a16" and smooth is None:
            fwd = w8a16_kernel(w.device, dtype, self.in_features)
            return lambda x: fwd(x, w, w_scale, bias)
        if self.mode == "w8a8":
            def w8a8(x: Tensor) -> Tensor:
                q, s = quantize_rows(x, smooth)
                return mm_rows(q, w, s, w_scale, bias, dtype)
            return w8a8
        return self.forward

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, smooth={self.smooth is not None}")


class _InputGrad(torch.autograd.Function):
    """Int8Linear on rows x with the gradient to x of x W^T, W = weight * weight_scale (/ smooth's columns): the
    quantization of x (w8a8) passed straight through; none to the int8 weight or the bias buffer."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._rows(x)

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        dx = dequantized_input_grad(dy, layer.weight, layer.weight_scale)
        return (dx if layer.smooth is None else dx / layer.smooth.to(dy.dtype)), None


def _rounded_rows(x: Tensor) -> Tensor:
    """x with each row quantized to int8 (per token) and back."""
    q, s = quantize_per_token(x)
    return (q.to(torch.float32) * s[..., None]).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize rows in the forward; pass the gradient straight through in the backward."""

    @staticmethod
    def forward(ctx, x):
        return _rounded_rows(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize_rows(x: Tensor) -> Tensor:
    """x with each row rounded to its int8 grid (per-token for activations, per-channel for weights); identity
    gradient (straight-through estimator). Under torch.func or forward AD the same as x + (rounded - x) with the
    difference detached (the Function is eager autograd's shortcut)."""
    xf = x.float() if x.dtype == torch.float64 else x
    if is_transformed(xf) or forward_ad_active():
        d = xf.detach()
        return (xf + (_rounded_rows(d) - d)).to(x.dtype)
    return _FakeQuantSTE.apply(xf).to(x.dtype)


class QATLinear(nn.Linear):
    """nn.Linear that trains through int8 fake quantization of its weight (per channel) and input (per token)."""

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(fake_quantize_rows(input), fake_quantize_rows(self.weight), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QATLinear":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias  # shared parameters
        m.train(linear.training)
        return m
