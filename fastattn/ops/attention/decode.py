"""Split-KV decode attention (flash-decoding): ``fastattn.decode_attention``, its backends and custom op, and the
route by which ``fastattn.attention`` hands it short queries against a long cache.

Every backend implements, forward only (inference):

  fwd(q, k, v, seqlens, keep, scale, softcap, causal) -> (out (B, H, L, Ev) q.dtype, lse (B, H, L) float32)

q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) with a unit last-dim stride (other strides free), H % Hk == 0:
query head h reads kv head h // (H // Hk), and each K/V head is read once for its whole group. seqlens: None or
(B,) int32, sequence b's number of keys (clamped to [0, S]; keys >= seqlens[b] are never read). keep: None or
(B, S) bool read through its strides, False = the key is ignored (its V row is never read either). causal: the L
query rows are the last L positions of each sequence (bottom-right): query i sees keys j <= i + len_b - L.
Scores are q k^T * scale, then softcap * tanh(s / softcap) when softcap > 0. lse is the natural-log logsumexp of
each row, +inf for a row with no key (its output is 0), as for attention.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ... import _ext
from ...backends import (REFERENCE_DEVICES, BackendNotSupported, Dispatcher, Impl, compiled_has, debug,
                         forced_backend_name, triton_op)
from ...errors import ArgumentError
from ...reference import decode_attention_ref
from ..batching import graph_capture, is_transformed
from .params import AttnParams
from .validation import check_float_tensors, check_softcap, softmax_scale

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_QUERIES = 16  # fastattn.attention routes queries up to this long ...
# ... against at least this many keys (per device type). CPU: the routed call beat the flash path at every cache
# length measured, 16 to 4096 keys, L 1 and 16 (fp32, D 64, one thread; benchmarks/bench_decode.py --route; at
# short caches the flash path's extra per-call cost dominates, at long ones the skipped padding blocks). GPU: not
# measured yet (no GPU in this session); 512 until benchmarks/bench_decode.py --route runs on one.
MIN_KEYS = {"cpu": 32, "cuda": 512}


class DecodeRequest(NamedTuple):
    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int


def _forward_only(*args):
    raise NotImplementedError("decode attention is forward-only (inference); use fastattn.attention for gradients")


def _ref_fwd(q, k, v, seqlens, keep, scale, softcap, causal):
    return decode_attention_ref(q, k, v, seqlens, keep, scale=scale, softcap=softcap, causal=causal,
                                return_lse=True)


def _cpu_fwd(q, k, v, seqlens, keep, scale, softcap, causal):
    return tuple(_ext._C.decode_attention_cpu(q, k, v, seqlens, keep, scale, softcap, causal))


def _triton_check(req: DecodeRequest):
    dims = max(req.head_dim, req.head_dim_v)
    return [f"head dim {dims} > 256"] if dims > 256 else []


dispatcher = Dispatcher("decode_attention", [
    Impl("triton", triton_op("decode", "decode_fwd"), _forward_only, ("cuda",), FLOATS, _triton_check),
    Impl("cpu", _cpu_fwd, _forward_only, ("cpu",), FLOATS, compiled_has("decode_attention_cpu")),
    Impl("reference", _ref_fwd, _forward_only, REFERENCE_DEVICES, FLOATS + (torch.float64,)),
], priority={"cuda": ("triton", "reference")})


def fwd(q, k, v, seqlens, keep, scale: float, softcap: float, causal: bool, backend: Optional[str]):
    req = DecodeRequest(q.device.type, q.dtype, q.shape[-1], v.shape[-1])
    return dispatcher.select(req, backend).fwd(q, k, v, seqlens, keep, scale, softcap, causal)


@torch.library.custom_op("fastattn::decode_attention", mutates_args=())
def decode_op(q: Tensor, k: Tensor, v: Tensor, seqlens: Optional[Tensor], keep: Optional[Tensor], scale: float,
              softcap: float, causal: bool, backend: str) -> tuple[Tensor, Tensor]:
    """What torch.compile traces (static shapes: a compiled decode step keeps one launch configuration)."""
    out, lse = fwd(q, k, v, seqlens, keep, scale, softcap, causal, backend or None)
    return out, lse


@decode_op.register_fake
def _(q, k, v, seqlens, keep, scale, softcap, causal, backend):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


def _call(q, k, v, seqlens, keep, scale, softcap, causal, backend: str):
    if graph_capture():
        return decode_op(q, k, v, seqlens, keep, scale, softcap, causal, backend)
    return fwd(q, k, v, seqlens, keep, scale, softcap, causal, backend or None)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Optional[Tensor] = None, *,
                     scale: Optional[float] = None, softcap: float = 0.0, causal: bool = True,
                     key_padding_mask: Optional[Tensor] = None, return_lse: bool = False):
    """Attention of a few query rows per sequence against a KV cache, the cache's keys split across threads /
    programs and the partial results merged by their logsumexps (flash-decoding). Forward only (inference).

    q (B, H, L, E) (L small: 1 to 16), k_cache (B, Hk, S, E), v_cache (B, Hk, S, Ev); GQA / MQA when Hk divides H
    (K/V are never repeated). cache_seqlens: None (every sequence has S keys) or (B,) int, sequence b's number of
    keys: keys >= cache_seqlens[b] are ignored and never read (they may hold anything). causal (default): the L
    query rows are each sequence's last L positions, bottom-right aligned to its own length (query i sees keys
    j <= i + len - L); causal=False lets every query see all len keys. key_padding_mask: None or (B, S) bool,
    torch's meaning (True = padding, ignored). softcap > 0: scores become softcap * tanh(scores / softcap).
    A row with no key gives 0. Returns out (B, H, L, Ev), and lse (B, H, L) float32 when return_lse.
    """
    check_float_tensors((("q", q), ("k_cache", k_cache), ("v_cache", v_cache)), 4, "4 dims")
    B, H, L, E = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != E:
        raise ArgumentError(f"k_cache: shape {tuple(k_cache.shape)}, expected (B={B}, Hk, S, E={E}) for q of shape "
                            f"{tuple(q.shape)}")
    if tuple(v_cache.shape[:3]) != (B, Hk, S):
        raise ArgumentError(f"v_cache: shape {tuple(v_cache.shape)}, expected (B={B}, Hk={Hk}, S={S}, Ev)")
    if Hk == 0 or H % Hk:
        raise ArgumentError(f"k_cache: {Hk} kv heads must divide the query's {H} heads")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ArgumentError("q, k_cache, v_cache: decode_attention is forward-only (inference) and an input requires "
                            "grad; run it under torch.no_grad() / torch.inference_mode(), or use fastattn.attention")
    seqlens = None
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise ArgumentError(f"cache_seqlens: expected an int32 / int64 tensor of shape ({B},), got "
                                f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)}")
        if tuple(cache_seqlens.shape) != (B,):
            raise ArgumentError(f"cache_seqlens: shape {tuple(cache_seqlens.shape)}, expected ({B},)")
        if cache_seqlens.device != q.device:
            raise ArgumentError(f"cache_seqlens: on {cache_seqlens.device}, q on {q.device}")
        if (not torch.compiler.is_compiling() and cache_seqlens.device.type == "cpu" and B
                and not ((cache_seqlens >= 0) & (cache_seqlens <= S)).all()):
            raise ArgumentError(f"cache_seqlens: values must be in [0, S={S}], got {cache_seqlens.tolist()}")
        seqlens = cache_seqlens.to(torch.int32).contiguous()
    keep = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ArgumentError("key_padding_mask: expected a bool tensor (True = padding)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ArgumentError(f"key_padding_mask: shape {tuple(key_padding_mask.shape)}, expected (B={B}, S={S})")
        if key_padding_mask.device != q.device:
            raise ArgumentError(f"key_padding_mask: on {key_padding_mask.device}, q on {q.device}")
        keep = ~key_padding_mask
    softcap = check_softcap(softcap)
    scale = softmax_scale(scale, E)
    out, lse = _call(_unit_last(q), _unit_last(k_cache), _unit_last(v_cache), seqlens, keep, scale, softcap,
                     bool(causal), forced_backend_name())
    return (out, lse) if return_lse else out


# ---- the route from fastattn.attention -----------------------------------------------------------------------
@functools.lru_cache(maxsize=256)  # outside: dynamo looks through the cache to the constant-result function
@torch.compiler.assume_constant_result
def _route_backend(device: str, dtype: torch.dtype, E: int, Ev: int, forced: str) -> str:
    """The decode backend fastattn.attention hands calls of this kind to, or "" to keep them on the flash kernels:
    when the decode kernel (not its reference) can run them. Decided once per kind (a constant under torch.compile;
    no sizes among its arguments, which may be symbolic there)."""
    req = DecodeRequest(device, dtype, E, Ev)
    try:
        impl = dispatcher.select(req, forced or None)
    except BackendNotSupported:
        return ""
    if impl.backend == "reference":
        return ""
    debug("fastattn.attention: the split-KV decode kernel (%s) runs short queries against long caches (%s, E=%d)",
          impl.backend, dtype, E)
    return impl.backend


def route(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], alibi: Optional[Tensor], p: AttnParams,
          forced: str):
    """(out, lse) from the decode kernel when the call fits it, else None. q (B, H, L, E), k/v (B, Hk, S, E|Ev) and
    mask (B, H, L, S) as attention's kernels take them. Fits: L <= MAX_QUERIES queries against S >= MIN_KEYS keys,
    no gradient, no dropout / ALiBi / window, causal None or bottom-right, and a mask that is None or a per-key bool
    mask (the same for every head and query: a key_padding_mask)."""
    B, H, L, E = q.shape
    S = k.shape[2]
    if torch.compiler.is_exporting():  # sizes may be symbolic: a guard on them would narrow an exported dim
        fits = (L > 0, L <= MAX_QUERIES, S >= MIN_KEYS.get(q.device.type, 1 << 62))
        if not all(statically_known_true(c) for c in fits):
            return None
    elif not (0 < L <= MAX_QUERIES and S >= MIN_KEYS.get(q.device.type, 1 << 62)):
        return None  # most calls: decided before the checks below (route_for repeats it for binders)
    if torch.compiler.is_compiling() and not (statically_known_true(E <= 256) and
                                              statically_known_true(v.shape[-1] <= 256)):
        return None  # a head dim made symbolic (dynamic=True) cannot key the cached backend choice: flash kernels
    if p.dropout_p > 0 or alibi is not None or (p.window_left, p.window_right) != (-1, -1):
        return None
    if p.causal and p.diag_offset != S - L:
        return None
    if q.numel() == 0 or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask))):
        return None
    if not torch.compiler.is_compiling() and is_transformed(q, k, v, mask):
        # torch.func: AttentionFunction's vmap rule and backward handle those (dynamo cannot trace this check)
        return None
    keep = None
    if mask is not None:
        if mask.dtype != torch.bool or (H > 1 and mask.stride(1) != 0) or (L > 1 and mask.stride(2) != 0):
            return None
        keep = mask[:, 0, 0, :]  # (B, S), a view
    backend = route_backend(q, k, v, forced)
    if not backend:
        return None
    return _call(q, k, v, None, keep, p.scale, p.softcap, p.causal, backend)


def route_backend(q: Tensor, k: Tensor, v: Tensor, forced: str) -> str:
    """The decode kernel that takes q (B, H, L, E) against k / v (B, Hk, S, E|Ev) by shape, device and dtype, or ""
    (too many queries, too few keys, a forced backend it lacks, or only its reference would run)."""
    return route_for(q.device.type, q.dtype, q.shape[-1], v.shape[-1], q.shape[2], k.shape[2], forced)


def route_for(device: str, dtype: torch.dtype, E: int, Ev: int, L: int, S: int, forced: str) -> str:
    """route_backend by the numbers alone (for a caller that binds the kernel once, ahead of the tensors)."""
    if not (0 < L <= MAX_QUERIES and S >= MIN_KEYS.get(device, 1 << 62)) or forced == "cuda":
        return ""
    return _route_backend(device, dtype, E, Ev, forced)


def routed_kernel(device: str, dtype: torch.dtype, E: int, Ev: int, L: int, S: int, forced: str):
    """The backend fwd(q, k, v, seqlens, keep, scale, softcap, causal) -> (out, lse) that fastattn.attention would hand
    L queries against S keys of this kind, or None when it keeps them on the flash kernels."""
    name = route_for(device, dtype, E, Ev, L, S, forced)
    return dispatcher.impls[name].fwd if name else None
