"""The public attention API: ``fastattn.attention`` (everything the kernels can do) and
``fastattn.scaled_dot_product_attention`` (torch's signature and semantics)."""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ...backends import debug, forced_backend_name
from ...errors import ArgumentError
from ...reference import attention_diag_offset, attention_ref
from .decode import route as decode_route
from .dispatch import attention_fwd_op, dispatcher, fwd, ref_kwargs
from ..batching import forward_ad_active, graph_capture, has_torch_function_subclass, is_transformed
from .function import AttentionFunction, AttentionFunctionEager, DroppedAttention, PackedQKVAttention
from ..dropout import dropout_rng
from .params import AttnParams, bias_grad, request
from .validation import (CAUSAL, as_bhld, as_float, autocast_qkv, build_mask, causal_bias_alignment, check_alibi,
                         check_qkv, check_softcap, check_window, softmax_scale)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: Optional[str] = None, attn_mask: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0, scale: Optional[float] = None,
              window: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
              return_lse: bool = False, enable_gqa: bool = True):
    """Attention with what torch's SDPA signature cannot say. q (..., H, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev);
    dims before the last two broadcast as in torch (heads by grouped-query attention when Hk divides H).

    causal: None, "top_left" (torch's is_causal) or "bottom_right" (the last query sees the last key: KV-cache
    decoding). attn_mask: bool (True = take part), additive float, or torch's CausalBias, broadcastable to
    (..., H, L, S). key_padding_mask: torch's meaning, bool (..., S) True = padding (that key is ignored), or a float
    (..., S) added to the scores. window=(left, right): keys within left before and right after the diagonal
    (-1 = unbounded), aligned as causal (bottom-right when causal is None). alibi_slopes: (H,) or (B, H).
    softcap > 0: scores become softcap * tanh(scores / softcap). A row with no key left gives 0, never NaN.
    Returns out (..., H, L, Ev), and lse (..., H, L) float32 when return_lse (the natural-log logsumexp of each
    row's scores; +inf for a row with no key, so that exp(score - lse) = 0 there). lse carries no gradient (it does
    not require grad, as flash-attn's softmax_lse): a loss built from it gets none through it.

    Up to 16 queries against a long cache (no gradient, dropout, ALiBi or window; causal None or "bottom_right"; no
    mask or a per-key bool mask such as key_padding_mask) run on the split-KV decode kernel
    (:func:`fastattn.decode_attention`); a debug log line says so. Under autocast q, k and v run in autocast's dtype
    (float64 excepted), as torch's SDPA does.
    """
    return _attention(q, k, v, None, causal, attn_mask, key_padding_mask, dropout_p, scale, window, alibi_slopes,
                      softcap, return_lse, enable_gqa)


def attention_packed(packed: Tensor, split: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]], **kwargs):
    """attention(*split(packed), **kwargs) for q, k, v that are three views tiling one tensor (each element of packed
    in exactly one of them), such as the heads of a self-attention's (B, L, 3 * H * D) projection: in eager training
    the gradient reaches packed as one tensor that the backward writes dq, dk and dv into, instead of three that
    autograd stacks back (a copy of the projection). Anywhere else (no gradient, autocast casts, torch.compile,
    torch.func, a mask that needs its gradient) it is attention(*split(packed), **kwargs)."""
    unknown = kwargs.keys() - _ATTENTION_KWARGS.keys()
    if unknown:
        raise TypeError(f"attention_packed: unexpected keyword arguments {sorted(unknown)}")
    return _attention(*split(packed), (packed, split), *{**_ATTENTION_KWARGS, **kwargs}.values())


def attention_seeded(q: Tensor, k: Tensor, v: Tensor, rng: Tuple[int, int], **kwargs):
    """attention(q, k, v, **kwargs) with its dropout mask's Philox (seed, offset) given instead of drawn from torch's
    generator (nn.MultiheadAttention draws them once and rebuilds the same mask for the weights it returns)."""
    unknown = kwargs.keys() - _ATTENTION_KWARGS.keys()
    if unknown:
        raise TypeError(f"attention_seeded: unexpected keyword arguments {sorted(unknown)}")
    return _attention(q, k, v, None, *{**_ATTENTION_KWARGS, **kwargs}.values(), rng=rng)


def attention_qkvpacked(qkv: Tensor, *, causal: Optional[str] = None, attn_mask: Optional[Tensor] = None,
                        key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                        scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1),
                        alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0, return_lse: bool = False):
    """Self-attention on a packed (B, L, 3, H, E) q / k / v tensor (flash-attn's qkvpacked layout, a projection's
    ``view(B, L, 3, H, E)``): :func:`attention` on its three (B, H, L, E) views, with the same keyword arguments,
    returning out (B, L, H, E) (and lse (B, H, L)). In training the gradient of qkv comes back as one tensor that
    the backward writes dq, dk and dv into, not three that autograd stacks back."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ArgumentError(f"qkv: expected (B, L, 3, H, E), got shape {tuple(qkv.shape)}")
    res = attention_packed(qkv, _qkvpacked_heads, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           dropout_p=dropout_p, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                           return_lse=return_lse, enable_gqa=False)
    return (res[0].transpose(1, 2), res[1]) if return_lse else res.transpose(1, 2)


def attention_fwd_nograd(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """attention(q, k, v, causal="top_left" if causal else None) for a caller that built q, k, v itself and asks no
    gradient: (B, H, L, E) / (B, Hk, S, E|Ev) plain tensors of one floating dtype and device, unit last-dim stride
    (the heads of its own projection), no autocast, torch.compile, jit or torch.func around the call. Nothing is
    checked and no autograd node is made: the dispatched backend's forward (or the decode route) straight away,
    for modules whose calls are small enough that attention()'s checks would cost as much host time as the kernel."""
    L, S = q.shape[2], k.shape[2]
    p = AttnParams(q.shape[-1] ** -0.5, causal, 0 if causal else S - L)
    backend = forced_backend_name()
    routed = decode_route(q, k, v, None, None, p, backend)
    return routed[0] if routed is not None else fwd(q, k, v, None, None, p, backend)[0]


def _qkvpacked_heads(qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, L, E) views


# attention()'s keyword arguments and their defaults, in _attention's order
_ATTENTION_KWARGS = {name: p.default for name, p in inspect.signature(attention).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _attention(q, k, v, packed, causal, attn_mask, key_padding_mask, dropout_p, scale, window, alibi_slopes, softcap,
               return_lse, enable_gqa, rng=None):
    """attention(); packed: None or attention_packed's (packed, split), of which q, k, v are split(packed); rng: the
    dropout's (seed, offset), else drawn here."""
    q0, k0, v0 = q, k, v
    q, k, v = autocast_qkv(q, k, v)
    lay = check_qkv(q, k, v, enable_gqa)
    if causal not in CAUSAL:
        raise ArgumentError(f"causal: expected one of {CAUSAL}, got {causal!r}")
    bias_causal = None if attn_mask is None else causal_bias_alignment(attn_mask)
    if bias_causal is not None:
        if causal is not None and causal != bias_causal:
            raise ArgumentError(f"attn_mask: a CausalBias ({bias_causal}) together with causal={causal!r}")
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (lay.L, lay.S):
            raise ArgumentError(f"attn_mask: CausalBias for ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) on "
                                f"L={lay.L} queries and S={lay.S} keys")
        causal, attn_mask = bias_causal, None
    dropout_p = as_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"dropout_p: expected 0 <= dropout_p <= 1, got {dropout_p}")
    window = check_window(window)
    softcap = check_softcap(softcap)
    out_shape = (*lay.lead, lay.L, v.shape[-1])
    qb, kb, vb = as_bhld(q, lay, lay.H), as_bhld(k, lay, lay.Hk), as_bhld(v, lay, lay.Hk)  # (B, H|Hk, L|S, E)
    if torch.compiler.is_compiling() and (kb is qb or vb is qb or vb is kb):
        # attention(x, x, x): dynamo refuses one tensor as two inputs of an autograd.Function; views are distinct
        kb, vb = kb.view_as(kb) if kb is qb else kb, vb.view_as(vb) if vb is qb or vb is kb else vb
    B, H, L, E = qb.shape
    mask = build_mask(attn_mask, key_padding_mask, q, lay)
    alibi = None
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, B, H)
        alibi = alibi_slopes.to(device=q.device, dtype=torch.float32).expand(B, H).contiguous()
    scale = softmax_scale(scale, E)
    if dropout_p == 1.0 and not return_lse:  # every probability dropped
        return DroppedAttention.apply(qb, kb, vb).reshape(out_shape)
    seed, offset = (rng or dropout_rng()) if 0 < dropout_p < 1 else (0, 0)
    p = AttnParams(scale, causal is not None,
                   attention_diag_offset(L, kb.shape[2], causal if causal is not None else "bottom_right"),
                   int(window[0]), int(window[1]), softcap, dropout_p if dropout_p < 1 else 0.0, seed, offset)
    backend = forced_backend_name()
    subclass = has_torch_function_subclass(qb, kb, vb)  # e.g. DTensor: torch ops understand it, kernels cannot
    if subclass:
        debug("fastattn.attention: a tensor subclass (%s) runs on the reference (torch ops)", type(qb).__name__)
    subclass = subclass or forward_ad_active()  # (tangents: the reference's torch ops carry them)
    # short queries against a long cache, forward only: the split-KV decode kernel (decode.py says when it fits)
    routed = None if dropout_p > 0 or subclass else decode_route(qb, kb, vb, mask, alibi, p, backend)
    if routed is not None:
        out, lse = routed
    elif subclass or bias_grad(mask, alibi):
        dispatcher.select(request(qb, kb, vb, mask, alibi, p), backend or None)  # raises if a kernel was forced
        # autograd through the reference gives the mask (or the ALiBi slopes) its gradient
        out, lse = attention_ref(qb, kb, vb, mask, return_lse=True, **ref_kwargs(qb, kb, mask, alibi, p))
    elif not (torch.is_grad_enabled() and (qb.requires_grad or kb.requires_grad or vb.requires_grad)):
        if graph_capture():
            # dynamo (torch 2.14) cannot inline a setup_context-style Function that records no graph: the op itself
            out, lse = attention_fwd_op(qb, kb, vb, mask, alibi, *p.flat(), backend)
        elif is_transformed(qb, kb, vb, mask):
            out, lse = AttentionFunction.apply(qb, kb, vb, mask, alibi, backend, *p.flat())  # its vmap rule
        else:  # no gradient asked for: the kernel without the Function around it (~10 us of host time a call)
            out, lse = fwd(qb, kb, vb, mask, alibi, p, backend)  # "": auto, as read above
    elif torch.compiler.is_compiling() or is_transformed(qb, kb, vb, mask):
        out, lse = AttentionFunction.apply(qb, kb, vb, mask, alibi, backend, *p.flat())
    elif packed is not None and qb is q0 and kb is k0 and vb is v0 and not torch.jit.is_tracing():
        # the views as given: one gradient for packed (torch.jit.trace keeps recording the views' Function)
        out, lse = PackedQKVAttention.apply(*packed, mask, alibi, backend, *p.flat())
    else:
        out, lse = AttentionFunctionEager.apply(qb, kb, vb, mask, alibi, backend, *p.flat())
    if dropout_p == 1.0:  # the lse was asked for: it does not depend on dropout
        out = DroppedAttention.apply(qb, kb, vb)
    out = out.reshape(out_shape) if torch.jit.is_tracing() or out.shape != out_shape else out
    return (out, lse.reshape(out_shape[:-1])) if return_lse else out


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention: same signature, semantics and errors (an
    :class:`fastattn.ArgumentError` is the RuntimeError torch raises), batch dims broadcast, torch's CausalBias
    masks. A query row whose keys are all masked gives 0 (and 0 gradients), as torch's SDPA does on CPU in torch
    2.14 (torch.nn.MultiheadAttention gives NaN there)."""
    if causal_bias_alignment(attn_mask) is not None:
        if is_causal:
            raise ArgumentError("CausalBias should not be used with causal=True")  # torch's words
    elif is_causal and attn_mask is not None:
        raise ArgumentError("attn_mask: must be None when is_causal=True (as in torch's scaled_dot_product_attention)"
                            "; fastattn.attention(q, k, v, causal='top_left', attn_mask=...) applies both")
    elif isinstance(attn_mask, Tensor) and isinstance(query, Tensor) and attn_mask.is_floating_point() and \
            attn_mask.dtype not in (torch.float32, query.dtype):
        raise ArgumentError(f"attn_mask: a float mask of {attn_mask.dtype} with a query of {query.dtype}: torch's "
                            f"scaled_dot_product_attention takes float32 or the query's dtype")
    return attention(query, key, value, causal="top_left" if is_causal else None, attn_mask=attn_mask,
                     dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
