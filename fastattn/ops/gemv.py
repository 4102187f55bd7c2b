"""Few-row linear (GEMV): out = x @ w^T (+ bias) for up to MAX_ROWS rows of x against a float32 weight that streams
from memory once, one row at a time: a decode step's projections on CPU, which read the whole weight for a token or
a few. Inference only (no autograd); models/decode_step.py binds it. Contract of every backend:

  fwd(x (M, K), w (N, K), bias (N,) or None) -> out (M, N), all contiguous float32, M <= MAX_ROWS

Backends: cpu (the w8a16 kernel's GEMV body with float loads, csrc/cpu/w8a16_kernel.cpp), reference (torch's
F.linear). Elsewhere (GPU, other dtypes) torch's own GEMV is the path: the reference.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import BackendNotSupported, Dispatcher, Impl, REFERENCE_DEVICES, compiled_has, compiled_op, log
from ..reference import gemv_ref

MAX_ROWS = 16


class GemvRequest(NamedTuple):
    device: str
    dtype: torch.dtype
    rows: int


def _rows_check(req: GemvRequest):
    return [f"{req.rows} rows > {MAX_ROWS}"] if req.rows > MAX_ROWS else []


def _cpu_check(req: GemvRequest):
    return compiled_has("gemv_f32_cpu")(req) + _rows_check(req)


dispatcher = Dispatcher("gemv", [
    Impl("cpu", compiled_op("gemv_f32_cpu"), None, ("cpu",), (torch.float32,), _cpu_check),
    Impl("reference", gemv_ref, None, REFERENCE_DEVICES, (torch.float16, torch.bfloat16, torch.float32)),
])


def gemv_kernel(device: torch.device, dtype: torch.dtype, rows: int) -> Optional[Callable]:
    """The fwd of the backend chosen for ``rows`` rows of ``dtype`` on ``device`` (the forced backend, if any), or
    None when only the reference would run (the caller then keeps torch's own linear)."""
    try:
        impl = dispatcher.select(GemvRequest(torch.device(device).type, dtype, rows))
    except BackendNotSupported as e:  # a forced backend without a GEMV: torch's linear, as for the reference
        log.debug("%s", e)
        return None
    return None if impl.backend == "reference" else impl.fwd


def gemv(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (M, K) @ w (N, K)^T (+ bias (N,)) for M <= MAX_ROWS, on the backend dispatch chooses; forward only."""
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x: {x.shape[0]} rows; gemv takes at most {MAX_ROWS} (use torch.nn.functional.linear)")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: shape {tuple(w.shape)} does not match x's K={x.shape[1]}")
    if w.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"w, bias: dtypes must be x's {x.dtype}, got {w.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    if w.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"w, bias: must be on x's device {x.device}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({w.shape[0]},)")
    impl = dispatcher.select(GemvRequest(x.device.type, x.dtype, x.shape[0]))
    return impl.fwd(x.contiguous(), w.contiguous(), None if bias is None else bias.contiguous())
