"""LayerNorm / RMSNorm modules on the fused kernels. Parameters and state_dict keys match torch.nn.LayerNorm and
torch.nn.RMSNorm exactly, so ``load_state_dict`` works both ways; a normalized_shape of several dims is flattened
into one row."""
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.add_norm import add_layer_norm, add_rms_norm

_Shape = Union[int, Tuple[int, ...], torch.Size]


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm on fastattn's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(input.shape[input.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"input: trailing shape {tuple(input.shape[input.dim() - k:])} does not match "
                             f"normalized_shape {tuple(self.normalized_shape)}")
        x = input.flatten(-k) if k > 1 else input
        y = add_layer_norm(x, None, _flat(self.weight), _flat(self.bias), self.eps)
        return y.view(input.shape)


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm on fastattn's kernels (eps=None means torch.finfo(input.dtype).eps, as in torch)."""

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"x: trailing shape {tuple(x.shape[x.dim() - k:])} does not match "
                             f"normalized_shape {tuple(self.normalized_shape)}")
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        y = add_rms_norm(x.flatten(-k) if k > 1 else x, None, _flat(self.weight), eps)
        return y.view(x.shape)


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
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return add_rms_norm(x, residual, self.weight, eps, prenorm=self.prenorm,
                            residual_in_fp32=self.residual_in_fp32)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"
