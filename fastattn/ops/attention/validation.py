"""Argument checks of the public attention API and the translation of its inputs into the kernels' form: q, k, v as
(B, H, L, E) views of the broadcast batch, masks as (B, H, L, S) strided views (broadcast dims have stride 0, never
materialized). Errors name the argument and raise :class:`fastattn.ArgumentError` where torch raises RuntimeError."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ...errors import ArgumentError
from ..batching import autocast_on, has_torch_function_subclass
from .dispatch import FLOATS

CAUSAL = (None, "top_left", "bottom_right")
_DTYPES = FLOATS + (torch.float64,)


class Layout(NamedTuple):
    """The broadcast shape of one call: out is (*lead, L, Ev); the kernels see (B, H, L, E) with B = prod(batch)."""
    batch: Tuple[int, ...]  # leading dims of the output other than the heads
    H: int
    Hk: int
    L: int
    S: int
    has_heads: bool = True  # False: 2-D inputs (L, E), seen as one head

    @property
    def B(self) -> int:
        return math.prod(self.batch)

    @property
    def lead(self) -> Tuple[int, ...]:
        return (*self.batch, self.H) if self.has_heads else self.batch


def _broadcast(name: str, *shapes) -> Tuple[int, ...]:
    if all(s == shapes[0] for s in shapes[1:]):  # the common case; torch.broadcast_shapes costs ~25 us a call
        return tuple(shapes[0])
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ArgumentError(f"{name}: batch dims {', '.join(str(tuple(s)) for s in shapes)} do not broadcast") \
            from None


def autocast_qkv(q, k, v) -> Tuple[Tensor, Tensor, Tensor]:
    """Under autocast (for q's device type), q, k and v in autocast's dtype, as autocast casts torch's SDPA inputs
    (float64 is left alone, as there); else unchanged. A model may hand over mixed dtypes there (Llama's RoPE gives
    float32 q and k beside a bfloat16 v)."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return q, k, v  # check_qkv names the argument
    device = q.device.type
    if not autocast_on(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype in FLOATS else t for t in (q, k, v))


def check_float_tensors(named, ndim: int, shape_desc: str) -> None:
    """Each (name, t) of named a Tensor of ndim dims and a supported float dtype, all of one dtype and one device;
    errors name the argument (``shape_desc``: what ndim dims mean, for the message)."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ArgumentError(f"{name}: expected {shape_desc}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ArgumentError(f"{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32, float64)")
    names, ts = ", ".join(n for n, _ in named), [t for _, t in named]
    if len({t.dtype for t in ts}) > 1:
        raise ArgumentError(f"{names}: dtypes must match, got {', '.join(str(t.dtype) for t in ts)}")
    if len({t.device for t in ts}) > 1:
        raise ArgumentError(f"{names}: devices must match, got {', '.join(str(t.device) for t in ts)}")


def check_qkv(q, k, v, enable_gqa: bool) -> Layout:
    """Checks query, key, value as torch's SDPA does and returns the broadcast layout: every dim but the last two
    broadcasts; with enable_gqa the heads (dim -3) of key and value each divide the query's instead."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES and min(len(qs), len(ks), len(vs)) >= 2):
        _refuse_dtypes_dims(q, k, v)
    if not (q.device == k.device == v.device):
        raise ArgumentError(f"query, key, value: devices must match, got {q.device}, {k.device}, {v.device}")
    if qs[-1] != ks[-1]:
        raise ArgumentError(f"key: head dim {ks[-1]} != query's {qs[-1]}")
    if ks[-2] != vs[-2]:
        raise ArgumentError(f"value: {vs[-2]} keys (shape {tuple(vs)}) != key's {ks[-2]} (shape {tuple(ks)})")
    L, S = qs[-2], ks[-2]
    if len(qs) == len(ks) == len(vs) == 4 and qs[:2] == ks[:2] == vs[:2]:  # (B, H, seq, dim) each, same B and H
        return Layout(qs[:1], qs[1], qs[1], L, S)
    hq, hk, hv = (s[-3] if len(s) >= 3 else 1 for s in (qs, ks, vs))
    if enable_gqa and min(len(qs), len(ks), len(vs)) >= 3 and not hq == hk == hv:
        if hq % hk or hq % hv:
            raise ArgumentError(f"key, value: {hk} and {hv} heads must each divide the query's {hq} for "
                                "grouped-query attention")
        batch = _broadcast("query, key, value", qs[:-3], ks[:-3], vs[:-3])
        return Layout(batch, hq, max(hk, hv), L, S)
    lead = _broadcast("query, key, value" + ("" if enable_gqa else " (pass enable_gqa=True for grouped-query "
                                                                     "attention)"),
                      qs[:-2], ks[:-2], vs[:-2])
    return Layout(lead[:-1], lead[-1], lead[-1], L, S) if lead else Layout((), 1, 1, L, S, has_heads=False)


def _refuse_dtypes_dims(q: Tensor, k: Tensor, v: Tensor):
    """check_qkv's error for an unsupported or mismatched dtype or too few dims, naming the argument."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dtype not in _DTYPES:
            raise ArgumentError(f"{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32, float64)")
        if t.dim() < 2:
            raise ArgumentError(f"{name}: expected (..., seq_len, head_dim), at least 2 dims, got shape "
                                f"{tuple(t.shape)}")
    raise ArgumentError(f"query, key, value: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")


def as_bhld(t: Tensor, lay: Layout, heads: int) -> Tensor:
    """t broadcast to (*batch, heads, seq, dim) and viewed as (B, heads, seq, dim) with a contiguous last dim: a view
    unless two batch dims must be merged across a broadcast one. GQA with k and v head counts that differ (one
    divides the other) repeats the smaller one's heads."""
    if t.dim() == 4 and t.shape[:2] == (lay.B, heads) and len(lay.batch) == 1:  # already (B, heads, seq, dim)
        return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
    if t.dim() >= 3 and t.shape[-3] not in (1, heads):
        t = t.repeat_interleave(heads // t.shape[-3], dim=-3)
    t = t.expand(*lay.batch, heads, *t.shape[-2:])
    t = t.reshape(lay.B, heads, *t.shape[-2:]) if t.dim() != 4 else t
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def causal_bias_alignment(attn_mask) -> Optional[str]:
    """torch.nn.attention.bias.CausalBias -> its causal alignment ("top_left" or "bottom_right"), else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # torch without causal biases
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    return "top_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _plain_tensor(name: str, t, q: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if has_torch_function_subclass(t):  # a subclass that overrides torch functions: never read it raw
        raise ArgumentError(f"{name}: tensor subclass {type(t).__name__} is not supported as a mask; pass a plain "
                            "bool or float tensor (torch.nn.attention.bias.CausalBias maps to causal=...)")
    if t.dtype != torch.bool and not t.is_floating_point():
        raise ArgumentError(f"{name}: dtype {t.dtype} must be bool or floating")
    if t.device != q.device:
        raise ArgumentError(f"{name}: on {t.device}, query on {q.device}")
    return t


def build_mask(attn_mask, key_padding_mask, q: Tensor, lay: Layout) -> Optional[Tensor]:
    """attn_mask (bool: True = take part, or additive float; broadcastable to (*batch, H, L, S)) and key_padding_mask
    (torch's meaning: bool True = padding, ignored; or float added; broadcastable to (*batch, S)) as one (B, H, L, S)
    strided view, or None. The two are combined at their own broadcast shape, never at (B, H, L, S)."""
    mask = None if attn_mask is None else _plain_tensor("attn_mask", attn_mask, q)
    if key_padding_mask is not None:
        kpm = _plain_tensor("key_padding_mask", key_padding_mask, q)
        want = (*lay.batch, lay.S)
        if kpm.shape != want:
            try:  # broadcast to it, not only with it: (2, S) for batch (1,) or (1, S) unbatched are refused
                fits = torch.broadcast_shapes(kpm.shape, want) == want
            except RuntimeError:
                fits = False
            if not fits:
                raise ArgumentError(f"key_padding_mask: shape {tuple(kpm.shape)} does not broadcast to (batch, S) = "
                                    f"{want}")
        kpm = kpm[..., None, None, :]  # (*batch, 1, 1, S)
        if mask is None:
            mask = ~kpm if kpm.dtype == torch.bool else kpm
        elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
            mask = mask & ~kpm
        elif kpm.dtype == torch.bool:
            mask = mask.masked_fill(kpm, float("-inf"))
        elif mask.dtype == torch.bool:
            mask = kpm.masked_fill(~mask, float("-inf"))
        else:
            mask = mask + kpm
    if mask is None:
        return None
    target = (*lay.lead, lay.L, lay.S)
    try:
        mask = mask.expand(target)
    except RuntimeError:
        what = "attn_mask" if key_padding_mask is None else "attn_mask with key_padding_mask"
        raise ArgumentError(f"{what}: shape {tuple(mask.shape)} does not broadcast to {target}") from None
    if mask.dim() != 4:
        mask = mask.reshape(lay.B, lay.H, lay.L, lay.S)
    if mask.stride(-1) not in (0, 1):
        mask = mask.contiguous()
    return mask


def as_float(name: str, v) -> float:
    """A Python / numpy / 0-d tensor number as a float; anything else is refused naming the argument."""
    try:
        if not isinstance(v, (str, bytes)):
            return float(v)
    except (TypeError, ValueError, RuntimeError):
        pass
    raise TypeError(f"{name}: expected a float, got {type(v).__name__}")


def check_softcap(softcap) -> float:
    softcap = as_float("softcap", softcap)
    if not 0 <= softcap < math.inf:  # (not math.isfinite: dynamo cannot trace it on a symbolic float)
        raise ArgumentError(f"softcap: expected a finite number >= 0 (0: off), got {softcap}")
    return softcap


def check_window(window) -> Tuple[int, int]:
    if type(window) is tuple and len(window) == 2 and type(window[0]) is int and type(window[1]) is int and \
            -1 <= window[0] < 2 ** 62 and -1 <= window[1] < 2 ** 62:  # plain ints: no ABC checks (~5 us a call)
        return window
    if not isinstance(window, (tuple, list)) or len(window) != 2 or \
            any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window):
        raise ArgumentError(f"window: expected (left, right) ints >= -1 (-1: unbounded), got {window!r}")
    return tuple(min(int(w), 2 ** 62) for w in window)  # (wider than any sequence: the kernels' int64 holds it)


def check_alibi(alibi_slopes, B: int, H: int) -> None:
    if not isinstance(alibi_slopes, Tensor) or tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ArgumentError(f"alibi_slopes: expected a tensor of shape ({H},) or ({B}, {H}), got "
                            f"{type(alibi_slopes).__name__} {tuple(getattr(alibi_slopes, 'shape', ()))}")


def softmax_scale(scale, head_dim: int) -> float:
    """The scores' scale: head_dim ** -0.5 by default (1 for head_dim 0, whose scores are all 0: every key weighs
    the same, as in torch's SDPA), else the caller's, which must be finite."""
    if scale is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    scale = as_float("scale", scale)
    if not -math.inf < scale < math.inf:
        raise ArgumentError(f"scale: expected a finite number, got {scale}")
    return scale
