"""Scaled dot-product attention: validation, backend dispatch, custom ops and the autograd.Function.

Every backend implements the same pair on (B, H, L, E) tensors whose last dimension is contiguous:

  fwd(q, k, v, mask, alibi, p: AttnParams) -> (out (B, H, L, Ev) q.dtype, lse (B, H, L) float32)
  bwd(dout, q, k, v, out, lse, mask, alibi, p) -> (dq, dk, dv)       (dk, dv summed over each GQA group)

k, v have Hk heads, H % Hk == 0. mask is None or a (B, H, L, S) view (broadcast dims have stride 0: never
materialized) of dtype bool (True = take part) or float (added to the scores). alibi is None or (B, H) float32.
lse is the natural-log logsumexp of each row's scaled scores, +inf for a row with no key left (so exp(s - lse) = 0
there and its output and gradients are 0). Dropout keeps entry (b, h, i, j) when the Philox uniform at counter
``p.offset + ((b * H + h) * L + i) * S + j`` under key ``p.seed`` is >= dropout_p, identically in fwd and bwd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..backends import Dispatcher, Impl, forced_backend_name, triton_op
from ..reference import attention_diag_offset, attention_ref, attention_scores

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttnParams:
    scale: float
    causal: bool = False
    diag_offset: int = 0  # query i's diagonal is key i + diag_offset (0 top-left, S - L bottom-right)
    window_left: int = -1  # keys j >= i + diag_offset - window_left take part (-1: no limit)
    window_right: int = -1  # keys j <= i + diag_offset + window_right take part (-1: no limit)
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0


class AttnRequest(NamedTuple):
    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    mask: Optional[str]  # None, "bool" or "float"
    mask_grad: bool
    gqa: bool
    causal: bool
    window: bool
    alibi: bool
    softcap: bool
    dropout: bool


def _lse_public(lse: Tensor) -> Tensor:
    return lse.masked_fill(lse == float("inf"), float("-inf"))


# ---- reference backend -------------------------------------------------------------------------------------
def ref_dropout_mask(p: AttnParams, B: int, H: int, L: int, S: int, device) -> Tensor:
    """The reference backend's keep mask: torch's generator seeded by p.seed (reproducible, not Philox-equal)."""
    g = torch.Generator(device=device).manual_seed(p.seed + p.offset)
    return torch.rand(B, H, L, S, generator=g, device=device) >= p.dropout_p


def _ref_call(q, k, v, mask, alibi, p: AttnParams, return_lse=True):
    B, H, L, _ = q.shape
    S = k.shape[2]
    # AttnParams come from _params(): diag_offset is 0 or S - L, and S - L whenever not causal
    causal = ("top_left" if p.diag_offset == 0 else "bottom_right") if p.causal else None
    window = (p.window_left, p.window_right)
    dmask = ref_dropout_mask(p, B, H, L, S, q.device) if p.dropout_p > 0 else None
    return attention_ref(q, k, v, mask, causal=causal, scale=p.scale, window=window, alibi_slopes=alibi,
                         softcap=p.softcap, dropout_p=p.dropout_p, dropout_mask=dmask, return_lse=return_lse)


def _ref_fwd(q, k, v, mask, alibi, p):
    out, lse = _ref_call(q, k, v, mask, alibi, p)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


def _ref_bwd(dout, q, k, v, out, lse, mask, alibi, p):
    """The closed-form attention backward in torch ops on the reference's scores (recomputed: no autograd, so it
    also runs inside a custom op, and float64 stays float64)."""
    B, H, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, do = q.to(cdt), k.to(cdt), v.to(cdt), dout.to(cdt)
    if Hk != H:
        kc, vc = kc.repeat_interleave(H // Hk, dim=1), vc.repeat_interleave(H // Hk, dim=1)
    causal = ("top_left" if p.diag_offset == 0 else "bottom_right") if p.causal else None
    scores, capped = attention_scores(qc, kc, mask, causal=causal, scale=p.scale, window=(p.window_left,
                                      p.window_right), alibi_slopes=alibi, softcap=p.softcap)
    row_max = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - row_max.masked_fill(row_max == float("-inf"), 0.0))
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)  # (B, H, L, S); 0 for empty rows
    keep = ref_dropout_mask(p, B, H, L, S, q.device).to(cdt) / (1 - p.dropout_p) if p.dropout_p > 0 else 1.0
    dv = (probs * keep).transpose(-1, -2) @ do
    dp = (do @ vc.transpose(-1, -2)) * keep
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    if capped is not None:
        ds = ds * (1 - capped.square())
    dq = (ds @ kc) * p.scale
    dk = (ds.transpose(-1, -2) @ qc) * p.scale
    if Hk != H:  # sum each GQA group's gradients into its shared K/V head
        dk = dk.view(B, Hk, H // Hk, S, -1).sum(2)
        dv = dv.view(B, Hk, H // Hk, S, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _compiled(name):
    """A fastattn._C attention op: the AttnParams (last argument) go in as plain scalars."""
    def call(*args):
        return getattr(_ext._C, name)(*args[:-1], *_flat(args[-1]))
    return call


def _no_mask_grad(req: AttnRequest):
    return ["attn_mask requires grad (only the reference computes its gradient)"] if req.mask_grad else []


def _triton_check(req: AttnRequest):
    reasons = _no_mask_grad(req)
    if max(req.head_dim, req.head_dim_v) > 256:
        reasons.append(f"head dim {max(req.head_dim, req.head_dim_v)} > 256")
    return reasons


def _cpu_check(req: AttnRequest):
    reasons = _no_mask_grad(req)
    if not hasattr(_ext._C, "attention_fwd_cpu"):
        reasons.append("fastattn._C has no CPU attention kernel")
    return reasons


def _cuda_check(req: AttnRequest):
    reasons = _no_mask_grad(req)
    if not hasattr(_ext._C, "attention_fwd_cuda"):
        return reasons + ["fastattn._C has no CUDA attention kernel"]
    if req.head_dim not in (32, 64, 128) or req.head_dim_v != req.head_dim:
        reasons.append(f"head dims ({req.head_dim}, {req.head_dim_v}) (supports 32, 64, 128 with Ev == E)")
    if req.mask == "float":
        reasons.append("float attn_mask (supports bool masks)")
    for feature in ("window", "alibi", "softcap", "dropout"):
        if getattr(req, feature):
            reasons.append(f"{feature} is not implemented in the CUDA C++ kernel")
    return reasons


# On GPU, Triton first: faster than the CUDA C++ kernel in both directions on an H100 (run 1 and the CUDA kernel's
# own H100 check, 2026-11-26); the CUDA kernel serves when forced or without Triton.
_dispatch = Dispatcher("attention", [
    Impl("cuda", _compiled("attention_fwd_cuda"), _compiled("attention_bwd_cuda"), ("cuda",),
         (torch.float16, torch.bfloat16), _cuda_check),
    Impl("triton", triton_op("attention", "attention_fwd"), triton_op("attention", "attention_bwd"), ("cuda",),
         _FLOATS, _triton_check),
    Impl("cpu", _compiled("attention_fwd_cpu"), _compiled("attention_bwd_cpu"), ("cpu",),
         _FLOATS + (torch.float64,), _cpu_check),
    Impl("reference", _ref_fwd, _ref_bwd, ("cpu", "cuda"), _FLOATS + (torch.float64,)),
], priority={"cuda": ("triton", "cuda", "reference")})


def _request(q, k, v, mask, alibi, p: AttnParams) -> AttnRequest:
    return AttnRequest(q.device.type, q.dtype, q.shape[-1], v.shape[-1],
                       None if mask is None else "bool" if mask.dtype == torch.bool else "float",
                       mask is not None and mask.requires_grad, k.shape[1] != q.shape[1], p.causal,
                       (p.window_left, p.window_right) != (-1, -1), alibi is not None, p.softcap > 0,
                       p.dropout_p > 0)


def select_backend(q, k, v, mask=None, alibi=None, p: Optional[AttnParams] = None, backend=None) -> str:
    p = p or AttnParams(scale=1.0)
    return _dispatch.select(_request(q, k, v, mask, alibi, p), backend).backend


def _fwd(q, k, v, mask, alibi, p: AttnParams, backend: Optional[str]):
    impl = _dispatch.select(_request(q, k, v, mask, alibi, p), backend)
    return impl.fwd(q, k, v, mask, alibi, p)


def _bwd(dout, q, k, v, out, lse, mask, alibi, p: AttnParams, backend: Optional[str]):
    impl = _dispatch.select(_request(q, k, v, mask, alibi, p), backend)
    return impl.bwd(dout, q, k, v, out, lse, mask, alibi, p)


def dropout_mask(backend: str, p: AttnParams, B: int, H: int, L: int, S: int, device) -> Tensor:
    """The (B, H, L, S) keep mask that backend draws for p (for tests: the kernels never materialize it)."""
    if backend == "reference":
        return ref_dropout_mask(p, B, H, L, S, device)
    if backend == "triton":
        from ..kernels import attention as k
        return k.dropout_mask(p, B, H, L, S, device)
    return getattr(_ext._C, f"attention_dropout_mask_{backend}")(B, H, L, S, p.dropout_p, p.seed, p.offset)


# Custom ops for torch.compile (eager calls skip this layer). AttnParams travel as plain scalars.
def _params(scale, causal, diag_offset, window_left, window_right, softcap, dropout_p, seed, offset):
    return AttnParams(scale, causal, diag_offset, window_left, window_right, softcap, dropout_p, seed, offset)


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], alibi: Optional[Tensor],
                     scale: float, causal: bool, diag_offset: int, window_left: int, window_right: int,
                     softcap: float, dropout_p: float, seed: int, offset: int, backend: str) -> Tuple[Tensor, Tensor]:
    p = _params(scale, causal, diag_offset, window_left, window_right, softcap, dropout_p, seed, offset)
    out, lse = _fwd(q, k, v, mask, alibi, p, backend or None)
    return out, lse


@attention_fwd_op.register_fake
def _(q, k, v, mask, alibi, *args):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                     alibi: Optional[Tensor], scale: float, causal: bool, diag_offset: int, window_left: int,
                     window_right: int, softcap: float, dropout_p: float, seed: int, offset: int,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    p = _params(scale, causal, diag_offset, window_left, window_right, softcap, dropout_p, seed, offset)
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, mask, alibi, p, backend or None)
    return dq, dk, dv


@attention_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flat(p: AttnParams):
    return (p.scale, p.causal, p.diag_offset, p.window_left, p.window_right, p.softcap, p.dropout_p, p.seed, p.offset)


class AttentionFunction(torch.autograd.Function):
    # AttnParams travel as plain scalars (*flat): torch.compile traces those through an autograd.Function
    @staticmethod
    def forward(ctx, q, k, v, mask, alibi, backend: str, *flat):
        if torch.compiler.is_compiling():
            out, lse = attention_fwd_op(q, k, v, mask, alibi, *flat, backend)
        else:
            out, lse = _fwd(q, k, v, mask, alibi, _params(*flat), backend or None)
        ctx.save_for_backward(q, k, v, out, lse, mask, alibi)
        ctx.flat, ctx.backend = flat, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, alibi = ctx.saved_tensors
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        if torch.compiler.is_compiling():
            dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, mask, alibi, *ctx.flat, ctx.backend)
        else:
            dq, dk, dv = _bwd(dout, q, k, v, out, lse, mask, alibi, _params(*ctx.flat), ctx.backend or None)
        return (dq, dk, dv, None, None, None) + (None,) * len(ctx.flat)


_CAUSAL = (None, "top_left", "bottom_right")


def _check_qkv(q, k, v, enable_gqa: bool):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS + (torch.float64,):
            raise TypeError(f"{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32, float64)")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected (..., seq_len, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key, value: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key, value: devices must match, got {q.device}, {k.device}, {v.device}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"query, key, value: must have the same number of dims, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"key: head dim {k.shape[-1]} != query's {q.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"value: shape {tuple(v.shape)} does not match key {tuple(k.shape)} except the last dim")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"key: batch dims {tuple(k.shape[:-3])} != query's {tuple(q.shape[:-3])}")
    hq = q.shape[-3] if q.dim() >= 3 else 1
    hk = k.shape[-3] if k.dim() >= 3 else 1
    if hq != hk and (not enable_gqa or hq % hk != 0):
        raise ValueError(f"key: {hk} heads vs query's {hq}: "
                         + ("query heads must be a multiple of key heads" if enable_gqa else "pass enable_gqa=True "
                            "for grouped-query attention"))


def _as_bhld(t: Tensor) -> Tensor:
    """(..., H, L, D) -> (B, H, L, D) with a contiguous last dim (a view when possible)."""
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[:, None]
    elif t.dim() > 4:
        t = t.reshape(-1, *t.shape[-3:])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_mask(attn_mask, q: Tensor, S: int, key_padding_mask, B: int, H: int, L: int) -> Optional[Tensor]:
    """Bool / float mask broadcast to (B, H, L, S) as a view (stride-0 broadcast dims), or None."""
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: dtype {attn_mask.dtype} must be bool (True = take part) or floating")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: on {attn_mask.device}, query on {q.device}")
        target = (*q.shape[:-1], S)
        try:
            mask = attn_mask.expand(target)
        except RuntimeError:
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to {target}") from None
        mask = mask.reshape(B, H, L, S) if mask.dim() != 4 else mask
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask: expected a bool ({B}, {S}) tensor (True = take part), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask[:, None, None, :].expand(B, H, L, S)
        if mask is None:
            mask = kpm
        elif mask.dtype == torch.bool:
            mask = mask & kpm
        else:
            mask = mask.masked_fill(~kpm, float("-inf"))
    if mask is not None and mask.stride(-1) != 1 and mask.stride(-1) != 0:
        mask = mask.contiguous()
    return mask


def _as_float(name: str, v) -> float:
    """A Python / numpy / 0-d tensor number as a float; anything else is refused naming the argument."""
    try:
        if not isinstance(v, (str, bytes)):
            return float(v)
    except (TypeError, ValueError, RuntimeError):
        pass
    raise TypeError(f"{name}: expected a float, got {type(v).__name__}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: Optional[str] = None, attn_mask: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0, scale: Optional[float] = None,
              window: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
              return_lse: bool = False, enable_gqa: bool = True):
    """Attention with what torch's SDPA signature cannot say. q (..., H, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev).

    causal: None, "top_left" (torch's is_causal) or "bottom_right" (the last query sees the last key: KV-cache
    decoding). attn_mask: bool (True = take part) or additive float, broadcastable to (..., H, L, S).
    key_padding_mask: bool (B, S), True = a real key. window=(left, right): keys within left before and right after
    the diagonal (-1 = unbounded), aligned as causal (bottom-right when causal is None). alibi_slopes: (H,) or (B, H).
    softcap > 0: scores become softcap * tanh(scores / softcap). A row with no key left gives 0, never NaN.
    Returns out (..., H, L, Ev), and lse (..., H, L) float32 (-inf for empty rows) when return_lse.
    """
    _check_qkv(q, k, v, enable_gqa)
    if causal not in _CAUSAL:
        raise ValueError(f"causal: expected one of {_CAUSAL}, got {causal!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")
    if len(window) != 2 or any(int(w) < -1 for w in window):
        raise ValueError(f"window: expected (left, right) with -1 for unbounded, got {window!r}")
    if softcap < 0:
        raise ValueError(f"softcap: expected >= 0, got {softcap}")
    out_shape = (*q.shape[:-1], v.shape[-1])
    qb, kb, vb = _as_bhld(q), _as_bhld(k), _as_bhld(v)
    B, H, L, E = qb.shape
    S = kb.shape[2]
    mask = _check_mask(attn_mask, q, S, key_padding_mask, B, H, L)
    alibi = None
    if alibi_slopes is not None:
        if alibi_slopes.shape not in ((H,), (B, H)):
            raise ValueError(f"alibi_slopes: shape {tuple(alibi_slopes.shape)}, expected ({H},) or ({B}, {H})")
        alibi = alibi_slopes.to(device=q.device, dtype=torch.float32).expand(B, H).contiguous()
    scale = E ** -0.5 if scale is None else _as_float("scale", scale)
    seed = offset = 0
    if dropout_p > 0:
        # from torch's default generator, so torch.manual_seed reproduces the mask; offsets stay far from 2**63
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        offset = int(torch.randint(0, 2**40, (1,), device="cpu"))
    p = AttnParams(scale, causal is not None,
                   attention_diag_offset(L, S, causal if causal is not None else "bottom_right"),
                   int(window[0]), int(window[1]), float(softcap), float(dropout_p), seed, offset)
    backend = forced_backend_name()
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        _dispatch.select(_request(qb, kb, vb, mask, alibi, p), backend or None)  # raises if a kernel was forced
        out, lse = _ref_call(qb, kb, vb, mask, alibi, p)  # autograd through the reference gives the mask gradient
    else:
        out, lse = AttentionFunction.apply(qb, kb, vb, mask, alibi, backend, *_flat(p))
        lse = _lse_public(lse)
    out = out.reshape(out_shape)
    return (out, lse.reshape(out_shape[:-1])) if return_lse else out


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature and semantics), except that a
    row whose keys are all masked gives 0 (and 0 gradients) instead of NaN. Like torch, it refuses an attn_mask
    together with is_causal=True (fastattn.attention combines a mask with either causal alignment)."""
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask: must be None when is_causal=True (as in torch's scaled_dot_product_attention); "
                         "fastattn.attention(q, k, v, causal='top_left', attn_mask=...) applies both")
    return attention(query, key, value, causal="top_left" if is_causal else None, attn_mask=attn_mask,
                     dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
