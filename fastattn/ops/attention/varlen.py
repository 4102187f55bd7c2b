"""Attention over packed variable-length sequences (flash-attn's ``flash_attn_varlen_func``): the public
``fastattn.attention_varlen``, its backends, custom ops and autograd.Function.

B sequences lie packed along the first dim of q (Tq, H, E), k (Tk, Hk, E) and v (Tk, Hk, Ev): sequence b is rows
[cu_q[b], cu_q[b + 1]) of q and rows [cu_k[b], cu_k[b + 1]) of k and v, and attends only within itself. No padding
is stored or computed. Every backend implements

  fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p, bottom_right) -> (out (Tq, H, Ev), lse (B, H, max_q) float32)
  bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, p, bottom_right) -> (dq, dk, dv), packed like q, k, v

cu_q, cu_k: (B + 1,) int32 on q's device, 0 first, non-decreasing, Tq (Tk) last; max_q, max_k >= every sequence's
length. Sequence b is ``attention`` (dispatch.py's contract) of its own Lb queries and Sb keys: causal and window
bounds aligned per sequence, top-left (diagonal 0) or, with bottom_right, bottom-right (diagonal Sb - Lb);
p.diag_offset is 0. lse and the dropout counters use the padded (B, H, max_q, max_k) geometry: lse[b, h, i] for
i < Lb, +inf past it; entry (b, h, i, j) is dropped exactly when dense attention over (B, H, max_q, max_k) with the
same p drops it. So this op equals dense attention over the zero-padded batch with a key padding mask, row for row
(tests/test_attention_varlen.py checks it).

Backends: triton (one launch per kernel; each program reads its sequence's bounds: kernels/attention.py's VARLEN),
cpu (each sequence a batch of one on the CPU kernels, through views: csrc/cpu/attention_varlen_api.cpp), reference
(per sequence, attention_ref). The CUDA C++ kernel has no varlen path: on GPUs Triton runs this op.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ... import _ext
from ...backends import REFERENCE_DEVICES, Dispatcher, Impl, compiled_has, debug, forced_backend_name, triton_op
from ...errors import ArgumentError
from ...reference import attention_bwd_ref, attention_ref
from ..batching import grads_with_graph, graph_capture, has_torch_function_subclass, is_transformed
from ..dropout import dropout_rng
from .dispatch import FLOATS, dropout_mask, ref_dropout_mask
from .function import DroppedAttention
from .params import GRID_YZ, AttnParams, bias_grad, grid_reasons, params_schema
from .validation import (CAUSAL, as_float, autocast_qkv, check_alibi, check_float_tensors, check_softcap,
                         check_window, softmax_scale)


class VarlenRequest(NamedTuple):
    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    slopes_grad: bool = False  # ALiBi slopes that require grad, grad enabled (only the reference differentiates them)
    big_heads: bool = False  # on a GPU, heads past GRID_YZ (grid axis y; Triton launches many sequences in chunks)


# ---- reference backend ---------------------------------------------------------------------------------------
def _sequences(cu_q: Tensor, cu_k: Tensor):
    """(b, query rows, key rows) of each sequence, as slices."""
    oq, ok = cu_q.tolist(), cu_k.tolist()
    return [(b, slice(oq[b], oq[b + 1]), slice(ok[b], ok[b + 1])) for b in range(len(oq) - 1)]


def _ref_seq_kwargs(p: AttnParams, bottom_right: bool, dmask: Optional[Tensor], b: int, Lb: int, Sb: int, alibi):
    causal = ("bottom_right" if bottom_right else "top_left") if p.causal else None
    return dict(causal=causal, scale=p.scale, window=(p.window_left, p.window_right), softcap=p.softcap,
                alibi_slopes=None if alibi is None else alibi[b:b + 1], dropout_p=p.dropout_p,
                dropout_mask=None if dmask is None else dmask[b:b + 1, :, :Lb, :Sb])


def _bhld(t: Tensor, rows: slice) -> Tensor:
    return t[rows].transpose(0, 1).unsqueeze(0)  # (1, heads, rows, dim)


def ref_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p: AttnParams, bottom_right: bool, dmask=None):
    """Each sequence on attention_ref; differentiable (torch ops) when its inputs require grad. On the meta device
    (shapes only) the outputs' shapes. ``dmask``: the padded (B, H, max_q, max_k) keep mask (default: this
    backend's draw for p)."""
    B, H = cu_q.shape[0] - 1, q.shape[1]
    if q.device.type == "meta":
        return q.new_empty(q.shape[0], H, v.shape[2]), q.new_empty(B, H, max_q, dtype=torch.float32)
    if dmask is None and p.dropout_p > 0:
        dmask = ref_dropout_mask(p, B, H, max_q, max_k, q.device)
    outs, lse = [], torch.full((B, H, max_q), math.inf, dtype=torch.float32, device=q.device)
    for b, qs, ks in _sequences(cu_q, cu_k):
        Lb, Sb = qs.stop - qs.start, ks.stop - ks.start
        if Lb == 0:
            continue
        out, lse_b = attention_ref(_bhld(q, qs), _bhld(k, ks), _bhld(v, ks), None, return_lse=True,
                                   **_ref_seq_kwargs(p, bottom_right, dmask, b, Lb, Sb, alibi))
        outs.append(out[0].transpose(0, 1))
        lse[b, :, :Lb] = lse_b[0]
    out = torch.cat(outs) if outs else q.new_zeros(0, H, v.shape[2])
    return out, lse


def ref_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, p: AttnParams, bottom_right: bool):
    if q.device.type == "meta":
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    B, H = cu_q.shape[0] - 1, q.shape[1]
    dmask = ref_dropout_mask(p, B, H, max_q, max_k, q.device) if p.dropout_p > 0 else None
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, qs, ks in _sequences(cu_q, cu_k):
        Lb, Sb = qs.stop - qs.start, ks.stop - ks.start
        if Lb == 0 or Sb == 0:
            continue
        grads = attention_bwd_ref(_bhld(dout, qs), _bhld(q, qs), _bhld(k, ks), _bhld(v, ks), None,
                                  **_ref_seq_kwargs(p, bottom_right, dmask, b, Lb, Sb, alibi))
        for g, t, rows in zip(grads, (dq, dk, dv), (qs, ks, ks)):
            t[rows] = g[0].transpose(0, 1)
    return dq, dk, dv


# ---- CPU and Triton backends -----------------------------------------------------------------------------------
def _cpu_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p: AttnParams, bottom_right: bool):
    return _ext._C.attention_varlen_fwd_cpu(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p.scale, p.causal,
                                            bottom_right, p.window_left, p.window_right, p.softcap, p.dropout_p,
                                            p.seed, p.offset)


def _cpu_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, p: AttnParams, bottom_right: bool):
    return _ext._C.attention_varlen_bwd_cpu(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, p.scale,
                                            p.causal, bottom_right, p.window_left, p.window_right, p.softcap,
                                            p.dropout_p, p.seed, p.offset)


def _kernel_reasons(req: VarlenRequest):
    """What no kernel backend runs: gradients of ALiBi slopes; heads past a GPU grid's axis y."""
    reasons = ["alibi_slopes requires grad (only the reference computes its gradient)"] if req.slopes_grad else []
    return reasons + grid_reasons(req.big_heads)


def _triton_check(req: VarlenRequest):
    d = max(req.head_dim, req.head_dim_v)
    return ([f"head dim {d} > 256"] if d > 256 else []) + _kernel_reasons(req)


def _cpu_check(req: VarlenRequest):
    return compiled_has("attention_varlen_fwd_cpu")(req) + _kernel_reasons(req)


dispatcher = Dispatcher("attention_varlen", [
    Impl("triton", triton_op("attention", "attention_varlen_fwd"), triton_op("attention", "attention_varlen_bwd"),
         ("cuda",), FLOATS, _triton_check),
    Impl("cpu", _cpu_fwd, _cpu_bwd, ("cpu",), FLOATS + (torch.float64,), _cpu_check),
    Impl("reference", ref_fwd, ref_bwd, REFERENCE_DEVICES, FLOATS + (torch.float64,)),
])


def _request(q: Tensor, v: Tensor, slopes_grad: bool = False) -> VarlenRequest:
    device = q.device.type
    return VarlenRequest(device, q.dtype, q.shape[-1], v.shape[-1], slopes_grad,
                         device == "cuda" and q.shape[1] > GRID_YZ)


# ---- custom ops, differentiable (eager and torch.compile alike; an autograd.Function would refuse, under dynamo,
# the same tensor passed twice: cu_seqlens_q is cu_seqlens_k in self-attention) ------------------------------------
_ARGS = "Tensor cu_q, Tensor cu_k, SymInt max_q, SymInt max_k, Tensor? alibi"


@torch.library.custom_op("fastattn::attention_varlen_fwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_ARGS}, bool bottom_right, {params_schema()}, "
                                f"str backend) -> (Tensor, Tensor)")
def varlen_fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, alibi, bottom_right, *flat_and_backend):
    *flat, backend = flat_and_backend
    impl = dispatcher.select(_request(q, v), backend or None)
    out, lse = impl.fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, AttnParams(*flat), bottom_right)
    return out.contiguous(), lse.contiguous()


@varlen_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, alibi, *args):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[2]),
            q.new_empty(cu_q.shape[0] - 1, q.shape[1], max_q, dtype=torch.float32))


@torch.library.custom_op("fastattn::attention_varlen_bwd", mutates_args=(),
                         schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_ARGS}, "
                                f"bool bottom_right, {params_schema()}, str backend) -> (Tensor, Tensor, Tensor)")
def varlen_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, bottom_right, *flat_and_backend):
    *flat, backend = flat_and_backend
    impl = dispatcher.select(_request(q, v), backend or None)
    grads = impl.bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, AttnParams(*flat),
                     bottom_right)
    return tuple(g.contiguous() for g in grads)


@varlen_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi, bottom_right, *flat, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    ctx.args = (max_q, max_k, bottom_right, tuple(flat), backend)
    ctx.mark_non_differentiable(lse)


def _grads_with_graph(dout, q, k, v, cu_q, cu_k, max_q, max_k, alibi, p: AttnParams, bottom_right: bool, backend):
    """(dq, dk, dv) with a graph of their own, for a backward under create_graph=True (a double backward): the
    reference's forward recomputed with the dropout mask the forward's backend drew, differentiated by autograd."""
    B, H = cu_q.shape[0] - 1, q.shape[1]
    used = dispatcher.select(_request(q, v), backend or None).backend
    dmask = dropout_mask(used, p, B, H, max_q, max_k, q.device) if p.dropout_p > 0 else None
    return grads_with_graph(lambda q, k, v: ref_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p, bottom_right,
                                                    dmask)[0], (q, k, v), dout)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    max_q, max_k, bottom_right, flat, backend = ctx.args
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True: a double backward
        grads = _grads_with_graph(dout, q, k, v, cu_q, cu_k, max_q, max_k, alibi, AttnParams(*flat), bottom_right,
                                  backend)
        return grads + (None,) * (7 + len(flat))
    dq, dk, dv = varlen_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, bottom_right, *flat, backend)
    return (dq, dk, dv) + (None,) * (7 + len(flat))  # the gradient of lse is none (it is not differentiable)


varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public API ------------------------------------------------------------------------------------------
def _check_tensors(q, k, v) -> None:
    check_float_tensors((("q", q), ("k", k), ("v", v)), 3, "3-D (total rows, heads, head dim)")
    if k.shape[2] != q.shape[2]:
        raise ArgumentError(f"k: head dim {k.shape[2]} != q's {q.shape[2]}")
    if v.shape[:2] != k.shape[:2]:
        raise ArgumentError(f"v: rows and heads {tuple(v.shape[:2])} != k's {tuple(k.shape[:2])}")
    H, Hk = q.shape[1], k.shape[1]
    if Hk == 0 or H % Hk:
        raise ArgumentError(f"k, v: {Hk} heads must divide q's {H} (grouped-query attention)")


def _offsets(name: str, cu, rows: int, max_len, q: Tensor, validate: bool) -> Tuple[Tensor, int]:
    """cu_seqlens as int32 on q's device, checked (its values too when ``validate``), and the max length (max_len,
    or the longest sequence)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ArgumentError(f"{name}: expected a 1-D int32 or int64 tensor of batch + 1 offsets, got shape "
                            f"{tuple(cu.shape)} dtype {cu.dtype}")
    if cu.device != q.device:
        raise ArgumentError(f"{name}: device {cu.device} != q's {q.device}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, torch.SymInt))
                                or max_len < 0):
        raise ArgumentError(f"max_seqlen{name[10:]}: expected an int >= 0, got {max_len!r}")
    if cu.device.type == "meta":  # shapes only: nothing to read, nothing to check
        return cu.to(torch.int32), 0 if max_len is None else max_len
    if graph_capture() or not validate:  # the offsets are not read: the caller's max length is taken as given
        if max_len is None:
            raise ArgumentError(f"max_seqlen{name[10:]}: required under torch.compile / tracing, and with "
                                "validate=False (the offsets are not read there)")
        return cu.to(torch.int32).contiguous(), max_len
    off = cu.tolist()
    lengths = [b - a for a, b in zip(off, off[1:])]
    if off[0] != 0 or off[-1] != rows or min(lengths, default=0) < 0:
        raise ArgumentError(f"{name}: expected non-decreasing offsets from 0 to the {rows} packed rows, got "
                            f"{off if len(off) <= 8 else off[:4] + ['...'] + off[-2:]}")
    longest = max(lengths, default=0)
    if max_len is not None and max_len < longest:
        raise ArgumentError(f"max_seqlen{name[10:]}: {max_len} < the longest sequence's {longest} rows")
    return cu.to(torch.int32).contiguous(), longest if max_len is None else int(max_len)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                     causal: Union[None, bool, str] = None, dropout_p: float = 0.0, scale: Optional[float] = None,
                     window: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                     softcap: float = 0.0, return_lse: bool = False, validate: bool = True):
    """Attention over B variable-length sequences packed without padding (flash-attn's flash_attn_varlen_func).

    q (Tq, H, E), k (Tk, Hk, E), v (Tk, Hk, Ev), Hk dividing H (grouped-query attention): sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v, and attends only
    within itself. cu_seqlens_*: (B + 1,) int32 or int64 on q's device, from 0 to Tq (Tk), non-decreasing.
    max_seqlen_*: the longest sequence (read from the offsets when None; required under torch.compile).
    causal: None, "top_left", "bottom_right" (each sequence's last query sees its last key), or a bool (True is
    flash-attn's bottom-right). window, alibi_slopes ((H,) or (B, H)), softcap, dropout_p and scale as in
    :func:`fastattn.attention`, per sequence. Returns out (Tq, H, Ev), and lse (Tq, H) float32 when return_lse.
    Equal to ``fastattn.attention`` of each sequence alone; one kernel launch for the whole batch on GPU (Triton).
    validate: read the offsets on the host and check them (0 first, non-decreasing, the row count last, no sequence
    longer than max_seqlen_*): one device-to-host copy a call on a GPU. validate=False (and torch.compile, which
    cannot read them) trusts the caller, as flash-attn does: wrong offsets there give wrong rows on the GPU (the CPU
    kernels check them anyway).
    """
    q, k, v = autocast_qkv(q, k, v)
    _check_tensors(q, k, v)
    cu_q, max_q = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q, validate)
    cu_k, max_k = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q, validate)
    B, H = cu_q.shape[0] - 1, q.shape[1]
    if cu_k.shape[0] != B + 1:
        raise ArgumentError(f"cu_seqlens_k: {cu_k.shape[0] - 1} sequences != cu_seqlens_q's {B}")
    if isinstance(causal, bool):
        causal = "bottom_right" if causal else None
    if causal not in CAUSAL:
        raise ArgumentError(f"causal: expected one of {CAUSAL} or a bool, got {causal!r}")
    dropout_p = as_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"dropout_p: expected a probability in [0, 1], got {dropout_p}")
    softcap = check_softcap(softcap)
    window = check_window(window)
    alibi = None
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, B, H)
        alibi = alibi_slopes.to(device=q.device, dtype=torch.float32).expand(B, H).contiguous()
    scale = softmax_scale(scale, q.shape[2])
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q, k, v))
    if dropout_p == 1.0 and not return_lse:
        return DroppedAttention.apply(q, k, v)
    seed, offset = dropout_rng() if 0 < dropout_p < 1 else (0, 0)
    p = AttnParams(scale, causal is not None, 0, int(window[0]), int(window[1]), softcap,
                   dropout_p if dropout_p < 1 else 0.0, seed, offset)
    bottom_right = causal != "top_left"
    backend = forced_backend_name()
    slopes_grad = bias_grad(None, alibi)
    if has_torch_function_subclass(q, k, v) or is_transformed(q, k, v) or slopes_grad:
        dispatcher.select(_request(q, v, slopes_grad), backend or None)  # raises if a kernel was forced
        debug("fastattn.attention_varlen: a tensor subclass, torch.func transform or ALiBi slopes that require "
              "grad: the reference")
        out, lse = ref_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, p, bottom_right)
    else:
        out, lse = varlen_fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, alibi, bottom_right, *p.flat(), backend)
    if dropout_p == 1.0:  # the lse was asked for: it does not depend on dropout
        out = DroppedAttention.apply(q, k, v)
    if not return_lse:
        return out
    return out, _packed_lse(lse, cu_q, q.shape[0])


def cu_seqlens_of_starts(starts: Tensor) -> Tuple[Tensor, int]:
    """The int32 offsets (over the B * L tokens, row by row) and the longest of the sequences that begin where
    ``starts`` (B, L) bool is True (each row's first token one of them). Reads the starts on the host."""
    first = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([first, first.new_full((1,), starts.numel())]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def cu_seqlens_of_lengths(lens: List[int], device) -> Tensor:
    """The int32 offsets of sequences of these lengths: 0, lens[0], lens[0] + lens[1], ..."""
    return torch.tensor([0] + list(lens), device=device).cumsum(0).to(torch.int32)


def _packed_lse(lse: Tensor, cu_q: Tensor, rows: int) -> Tensor:
    """(B, H, max_q) padded lse -> (Tq, H): row t of sequence b is lse[b, :, t - cu_q[b]]."""
    t = torch.arange(rows, device=lse.device)
    b = torch.searchsorted(cu_q.to(torch.int64), t, right=True) - 1
    return lse[b, :, t - cu_q.to(torch.int64)[b]]
