"""The pure-PyTorch reference of every fastattn op: one per op, shared by the tests, the benchmarks and the
``reference`` backend (the fallback). ``upcast=True`` computes in float32 (float64 stays float64); with
``upcast=False`` it runs the same torch calls a user would write, in the input dtype."""
from typing import Optional

import torch
import torch.nn.functional as F


def norm_residual_dtype(x: torch.Tensor, residual: Optional[torch.Tensor], residual_in_fp32: bool) -> torch.dtype:
    """dtype of s = x + residual: the promotion of x, residual and (if residual_in_fp32) float32."""
    dt = x.dtype
    if residual is not None:
        dt = torch.promote_types(dt, residual.dtype)
    if residual_in_fp32:
        dt = torch.promote_types(dt, torch.float32)
    return dt


def add_norm_ref(x: torch.Tensor, residual: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, is_rms: bool = False,
                 prenorm: bool = False, residual_in_fp32: bool = False, upcast: bool = False):
    """s = x + residual; y = norm(s) * weight + bias over the last dim; returns y, or (y, s) when prenorm.

    LayerNorm when ``is_rms`` is False, RMSNorm otherwise (bias must then be None). y has x's dtype; s has
    :func:`norm_residual_dtype`. The norm is computed from s rounded to its dtype, as the kernels do.
    """
    s_dtype = norm_residual_dtype(x, residual, residual_in_fp32)
    if upcast:
        cdt = torch.float64 if s_dtype == torch.float64 else torch.float32
        s = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)
        s = s.to(s_dtype)
    else:
        cdt = s_dtype
        s = x.to(s_dtype) if residual is None else x.to(s_dtype) + residual.to(s_dtype)
    sc = s.to(cdt)
    n = (x.shape[-1],)
    w = None if weight is None else weight.to(cdt)
    if is_rms:
        if bias is not None:
            raise ValueError("bias: RMSNorm takes no bias")
        y = F.rms_norm(sc, n, w, eps)
    else:
        y = F.layer_norm(sc, n, w, None if bias is None else bias.to(cdt), eps)
    y = y.to(x.dtype)
    return (y, s) if prenorm else y
