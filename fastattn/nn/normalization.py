"""LayerNorm / RMSNorm modules on the fused kernels. Parameters and state_dict keys match torch.nn.LayerNorm and
torch.nn.RMSNorm exactly, so ``load_state_dict`` works both ways; a normalized_shape of several dims is flattened
into one row."""
import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError
from ..ops.add_norm import _validate, add_layer_norm, add_rms_norm, native_faster
from ._torchscript import refuse_script

_Shape = Union[int, Tuple[int, ...], torch.Size]
_HALF = (torch.float16, torch.bfloat16)


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def autocast_fp32(x: Tensor, *params: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """(x, *params) as torch's autocast hands them to layer_norm / rms_norm: CUDA autocast runs both in float32
    (float16 / bfloat16 tensors upcast, the output float32); CPU autocast leaves them as they are."""
    if x.device.type != "cuda" or x.dtype == torch.float64 or not torch.is_autocast_enabled("cuda"):
        return (x,) + params
    return tuple(t.float() if t is not None and t.dtype in _HALF else t for t in (x,) + params)


_RMS_AUTOCAST_DTYPE = {}


def _torch_rms_autocast_dtype(x: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    """The dtype torch's own rms_norm returns for x under CUDA autocast: float32 in some torch versions, x's dtype
    (computed in float32, rounded back) in others (2.11); asked of torch once per dtype pair."""
    key = (x.dtype, None if weight is None else weight.dtype)
    if key not in _RMS_AUTOCAST_DTYPE:
        probe = torch.ones(1, 2, device=x.device, dtype=x.dtype)
        w = None if weight is None else torch.ones(2, device=x.device, dtype=weight.dtype)
        _RMS_AUTOCAST_DTYPE[key] = torch.nn.functional.rms_norm(probe, (2,), w).dtype
    return _RMS_AUTOCAST_DTYPE[key]


def _default_rms_eps(dtype: torch.dtype) -> float:
    """torch's rms_norm eps for eps=None: the machine epsilon of the computation's dtype (float32 for a half input,
    not the input's own, which is ~1e4 times larger for bfloat16)."""
    return torch.finfo(torch.float32 if dtype in _HALF else dtype).eps


def layer_norm(input: Tensor, normalized_shape: Tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> Tensor:
    """torch's F.layer_norm on fastattn's kernels (LayerNorm's forward; a leaf of torch.fx traces, as torch's
    LayerNorm is one)."""
    if input.is_nested and input.layout == torch.strided:  # (a jagged one is a subclass: the reference takes it)
        return F.layer_norm(input, normalized_shape, weight, bias, eps)  # torch's encoder layers hand one over
    k = len(normalized_shape)
    if tuple(input.shape[input.dim() - k:]) != tuple(normalized_shape):
        raise ArgumentError(f"input: trailing shape {tuple(input.shape[input.dim() - k:])} does not match "
                            f"normalized_shape {tuple(normalized_shape)}")
    input, weight, bias = autocast_fp32(input, weight, bias)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype != input.dtype and not (input.dtype in _HALF and p.dtype == torch.float32):
            raise ArgumentError(f"{name}: dtype {p.dtype} with an input of {input.dtype} (torch's layer_norm "
                                f"takes parameters of the input's dtype, or float32 for a half input)")
    if k == 1 and native_faster(input, None, weight, bias, False):
        _validate(input, None, weight, bias, eps)  # (add_layer_norm's checks: its errors, not torch's NaN)
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    x = input.flatten(-k) if k > 1 else input
    y = add_layer_norm(x, None, _flat(weight), _flat(bias), eps)
    return y if k == 1 else y.view(input.shape)


def rms_norm(x: Tensor, normalized_shape: Tuple[int, ...], weight: Optional[Tensor], eps: Optional[float]) -> Tensor:
    """torch's F.rms_norm on fastattn's kernels (RMSNorm's forward; a leaf of torch.fx traces)."""
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != tuple(normalized_shape):
        raise ArgumentError(f"x: trailing shape {tuple(x.shape[x.dim() - k:])} does not match "
                            f"normalized_shape {tuple(normalized_shape)}")
    given, given_weight = x, weight
    x, weight = autocast_fp32(x, weight)
    if weight is not None and weight.dtype not in (x.dtype, torch.float32):
        weight = weight.float()  # the kernels take a weight of x's dtype or float32; torch takes any
    eps = _default_rms_eps(x.dtype) if eps is None else eps
    y = add_rms_norm(x.flatten(-k) if k > 1 else x, None, _flat(weight), eps)
    y = y if k == 1 else y.view(x.shape)
    if x is not given:  # upcast by autocast: return the dtype this torch's rms_norm returns
        y = y.to(_torch_rms_autocast_dtype(given, given_weight))
    return y


# torch.fx.symbolic_trace records these as calls (their shape checks are Python control flow, which a trace cannot
# follow): a model holding fastattn's norms traces as one holding torch's, whose modules fx keeps as leaves
torch.fx.wrap("layer_norm")
torch.fx.wrap("rms_norm")


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm on fastattn's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    __prepare_scriptable__ = refuse_script


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm on fastattn's kernels (eps=None means the machine epsilon of the computation's dtype,
    float32 for a half input, as in torch; the output has the input's dtype whatever the weight's, as in torch)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)

    __prepare_scriptable__ = refuse_script


class AddLayerNorm(nn.LayerNorm):
    """LayerNorm(x + residual); returns y, or (y, x + residual) when ``prenorm`` (the pre-norm Transformer's
    residual stream). State_dict keys are torch.nn.LayerNorm's; the normalized shape is one dimension."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 prenorm: bool = False, residual_in_fp32: bool = False, device=None, dtype=None):
        if not isinstance(normalized_shape, numbers.Integral):
            raise ValueError(f"normalized_shape: AddLayerNorm takes one int, got {normalized_shape!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.prenorm, self.residual_in_fp32 = prenorm, residual_in_fp32

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, prenorm=self.prenorm,
                              residual_in_fp32=self.residual_in_fp32)

    __prepare_scriptable__ = refuse_script

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"


class AddRMSNorm(nn.RMSNorm):
    """RMSNorm(x + residual); returns y, or (y, x + residual) when ``prenorm``."""

    def __init__(self, normalized_shape: int, eps: Optional[float] = None, elementwise_affine: bool = True,
                 prenorm: bool = False, residual_in_fp32: bool = False, device=None, dtype=None):
        if not isinstance(normalized_shape, numbers.Integral):
            raise ValueError(f"normalized_shape: AddRMSNorm takes one int, got {normalized_shape!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.prenorm, self.residual_in_fp32 = prenorm, residual_in_fp32

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        eps = _default_rms_eps(x.dtype) if self.eps is None else self.eps
        return add_rms_norm(x, residual, self.weight, eps, prenorm=self.prenorm,
                            residual_in_fp32=self.residual_in_fp32)

    __prepare_scriptable__ = refuse_script

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"


class HFRMSNorm(nn.Module):
    """HF transformers' Llama-style RMSNorm (``LlamaRMSNorm``, and the 140-odd classes of transformers that run its
    forward: Mistral, Qwen2 / 3, Phi-3, DeepSeek, GLM, Granite, ...) on fastattn's kernel, for ``fastattn.convert``:
    the same parameter (``weight``), attribute (``variance_epsilon``) and result, ``weight * (x / rms(x)).to(x.dtype)``
    with the rms in float32; a weight of another dtype than x promotes the output, as there. Gemma's ``(1 + weight)``
    and T5's norms compute something else and are not this."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.shape[-1:] != self.weight.shape:
            raise ValueError(f"hidden_states: last dim {hidden_states.shape[-1]}, but the weight has "
                             f"{self.weight.shape[0]}")
        if self.weight.dtype == hidden_states.dtype:  # one kernel: y = x * rstd * weight, rounded once
            return add_rms_norm(hidden_states, None, self.weight, self.variance_epsilon)
        return self.weight * add_rms_norm(hidden_states, None, None, self.variance_epsilon)

    __prepare_scriptable__ = refuse_script

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
