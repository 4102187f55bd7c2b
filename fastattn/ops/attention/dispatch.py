"""The attention backends: what each supports, the dispatch table, and the custom ops torch.compile and torch.func
see.

Every backend implements the same pair on (B, H, L, E) tensors whose last dimension is contiguous (other dims may
have any stride, stride 0 included):

  fwd(q, k, v, mask, alibi, p: AttnParams) -> (out (B, H, L, Ev) q.dtype, lse (B, H, L) float32)
  bwd(dout, q, k, v, out, lse, mask, alibi, p) -> (dq, dk, dv)       (dk, dv summed over each GQA group)

out and the gradients may have any layout with a unit last-dim stride: the CPU and Triton backends lay each out in
its input's dimension order (q read as the transposed view of a (B, L, H, D) projection gives a (B, L, H, D)-laid-out
out and dq, so the way back to (B, L, H * D) is a view, as with torch's flash CPU kernel); the CUDA one's out is
contiguous and its gradients empty_like their inputs. The custom ops below return them contiguous.

k, v have Hk heads, H % Hk == 0. mask is None or a (B, H, L, S) view (broadcast dims have stride 0: never
materialized) of dtype bool (True = take part) or float (added to the scores). alibi is None or (B, H) float32.
lse is the natural-log logsumexp of each row's scaled scores, +inf for a row with no key left (so exp(s - lse) = 0
there and its output and gradients are 0); the public API returns it the same way. Dropout keeps entry
(b, h, i, j) when the uniform of logical counter ``p.offset + ((b * H + h) * L + i) * S4 + j`` under key ``p.seed``
is >= dropout_p, identically in fwd and bwd (word counter % 4 of Philox4x32-10 at counter // 4: kernels/dropout.py).
S4 is S rounded up to a multiple of 4: with an offset that is one too (the API's are), every row starts a Philox
block, so a kernel draws four keys' uniforms from one Philox evaluation.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ... import _ext
from ...backends import Dispatcher, Impl, REFERENCE_DEVICES, triton_op
from ...reference import attention_bwd_ref, attention_ref
from ..batching import grads_with_graph
from ..dropout import seeded_uniform
from .params import GRID_YZ, AttnParams, AttnRequest, grid_reasons, params_schema, request

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# ---- reference backend -------------------------------------------------------------------------------------
def ref_dropout_mask(p: AttnParams, B: int, H: int, L: int, S: int, device) -> Tensor:
    """The reference backend's keep mask: torch's generator seeded by p.seed (reproducible, not Philox-equal)."""
    return seeded_uniform((B, H, L, S), p.seed + p.offset, device) >= p.dropout_p


def ref_kwargs(q, k, mask, alibi, p: AttnParams) -> dict:
    B, H, L, _ = q.shape
    dmask = ref_dropout_mask(p, B, H, L, k.shape[2], q.device) if p.dropout_p > 0 else None
    return dict(causal=p.causal_align, scale=p.scale, window=(p.window_left, p.window_right), alibi_slopes=alibi,
                softcap=p.softcap, dropout_p=p.dropout_p, dropout_mask=dmask)


def ref_fwd(q, k, v, mask, alibi, p: AttnParams):
    return attention_ref(q, k, v, mask, return_lse=True, **ref_kwargs(q, k, mask, alibi, p))


def ref_bwd(dout, q, k, v, out, lse, mask, alibi, p: AttnParams):
    return attention_bwd_ref(dout, q, k, v, mask, **ref_kwargs(q, k, mask, alibi, p))


# ---- compiled and Triton backends ---------------------------------------------------------------------------
def _compiled(name):
    """A fastattn._C attention op: the AttnParams (last argument) go in as plain scalars."""
    def call(*args):
        return getattr(_ext._C, name)(*args[:-1], *args[-1].flat())
    return call


def _kernel_reasons(req: AttnRequest):
    """What no kernel backend runs: gradients of a mask or ALiBi slopes; heads past a GPU grid's axis y."""
    reasons = ["attn_mask or alibi_slopes requires grad (only the reference computes its gradient)"] \
        if req.mask_grad else []
    return reasons + grid_reasons(req.big_heads)


def _triton_check(req: AttnRequest):
    reasons = _kernel_reasons(req)
    if max(req.head_dim, req.head_dim_v) > 256:
        reasons.append(f"head dim {max(req.head_dim, req.head_dim_v)} > 256")
    if min(req.head_dim, req.head_dim_v) == 0:  # (an empty output's lse is still the scores')
        reasons.append("head dim 0")
    return reasons


def _cpu_check(req: AttnRequest):
    reasons = _kernel_reasons(req)
    if not hasattr(_ext._C, "attention_fwd_cpu"):
        reasons.append("fastattn._C has no CPU attention kernel")
    return reasons


def _cuda_check(req: AttnRequest):
    reasons = _kernel_reasons(req)
    if not hasattr(_ext._C, "attention_fwd_cuda"):
        return reasons + ["fastattn._C has no CUDA attention kernel"]
    if req.head_dim not in (32, 64, 128) or req.head_dim_v != req.head_dim:
        reasons.append(f"head dims ({req.head_dim}, {req.head_dim_v}) (supports 32, 64, 128 with Ev == E)")
    if req.mask == "float":
        reasons.append("float attn_mask (supports bool masks)")
    for feature in ("window", "alibi", "softcap", "dropout"):
        if getattr(req, feature):
            reasons.append(f"{feature} is not implemented in the CUDA C++ kernel")
    if req.big_batch:  # (Triton launches such a batch in chunks)
        reasons.append(f"batch > {GRID_YZ} (the CUDA C++ kernel's grid axis z)")
    return reasons


# On GPU, Triton first: it is faster than the CUDA C++ kernel both ways on an H100; CUDA C++ serves when forced, without
# Triton, and first for small calls (params.SMALL_FLOP), where host time outweighs the kernels' difference.
dispatcher = Dispatcher("attention", [
    Impl("cuda", _compiled("attention_fwd_cuda"), _compiled("attention_bwd_cuda"), ("cuda",),
         (torch.float16, torch.bfloat16), _cuda_check),
    Impl("triton", triton_op("attention", "attention_fwd"), triton_op("attention", "attention_bwd"), ("cuda",),
         FLOATS, _triton_check),
    Impl("cpu", _compiled("attention_fwd_cpu"), _compiled("attention_bwd_cpu"), ("cpu",),
         FLOATS + (torch.float64,), _cpu_check),
    Impl("reference", ref_fwd, ref_bwd, REFERENCE_DEVICES, FLOATS + (torch.float64,)),
], priority={"cuda": lambda req: ("cuda", "triton", "reference") if req.small else ("triton", "cuda", "reference")})


def last_dim_unit(t: Optional[Tensor], broadcast_ok: bool = False) -> Optional[Tensor]:
    """t with the unit last-dim stride every backend needs (a mask may also broadcast its last dim: stride 0)."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 or (broadcast_ok and t.stride(-1) == 0):
        return t
    if t.numel() == 0:  # (contiguous() keeps an empty tensor's strides: an expanded gradient's are 0)
        return t.new_empty(t.shape)
    return t.contiguous()


def select_backend(q, k, v, mask=None, alibi=None, p: Optional[AttnParams] = None, backend=None) -> str:
    p = p or AttnParams(scale=1.0)
    return dispatcher.select(request(q, k, v, mask, alibi, p), backend).backend


def fwd(q, k, v, mask, alibi, p: AttnParams, backend: Optional[str]):
    return dispatcher.select(request(q, k, v, mask, alibi, p), backend).fwd(q, k, v, mask, alibi, p)


def bwd(dout, q, k, v, out, lse, mask, alibi, p: AttnParams, backend: Optional[str]):
    impl = dispatcher.select(request(q, k, v, mask, alibi, p), backend)
    return impl.bwd(dout, q, k, v, out, lse, mask, alibi, p)


def bwd_with_graph(dout, inputs, split, mask, alibi, p: AttnParams, backend: Optional[str]):
    """The gradients of ``inputs`` (q, k, v, or the one tensor that ``split`` cuts them from) for a backward under
    create_graph=True (a double backward: gradient penalties, MAML, Hessian-vector products), with a graph of their
    own: the reference's forward recomputed, with the dropout mask the forward's backend drew, and differentiated by
    autograd. The kernels' gradients have no graph: returned as the answer, they would give a silently wrong (or
    missing) second derivative."""
    def forward(*leaves):
        q, k, v = split(*leaves)
        impl = dispatcher.select(request(q, k, v, mask, alibi, p), backend or None)
        kw = ref_kwargs(q, k, mask, alibi, dataclasses.replace(p, dropout_p=0.0))
        if p.dropout_p > 0:
            B, H, L, _ = q.shape
            kw.update(dropout_p=p.dropout_p, dropout_mask=dropout_mask(impl.backend, p, B, H, L, k.shape[2], q.device))
        return attention_ref(q, k, v, mask, **kw)

    return grads_with_graph(forward, inputs, dout)


def _cpu_bwd_into(grads, dout, q, k, v, out, lse, mask, alibi, p):
    _ext._C.attention_bwd_cpu(dout, q, k, v, out, lse, mask, alibi, *p.flat(), *grads)


def _triton_bwd_into(grads, *args):
    dispatcher.impls["triton"].bwd(*args, into=grads)


# the backends whose backward writes dq, dk, dv into given tensors (bwd_into copies the others' results in)
_BWD_INTO = {"cpu": _cpu_bwd_into, "triton": _triton_bwd_into}


def bwd_into(grads, dout, q, k, v, out, lse, mask, alibi, p: AttnParams, backend: Optional[str]) -> None:
    """bwd with its (dq, dk, dv) written into ``grads``: three views with a unit last stride, such as the slices of
    one packed gradient (PackedQKVAttention)."""
    impl = dispatcher.select(request(q, k, v, mask, alibi, p), backend)
    into = _BWD_INTO.get(impl.backend)
    if into is not None:
        into(grads, dout, q, k, v, out, lse, mask, alibi, p)
        return
    for g, r in zip(grads, impl.bwd(dout, q, k, v, out, lse, mask, alibi, p)):
        g.copy_(r)


def dropout_mask(backend: str, p: AttnParams, B: int, H: int, L: int, S: int, device) -> Tensor:
    """The (B, H, L, S) keep mask that backend draws for p (for tests: the kernels never materialize it)."""
    if backend == "reference":
        return ref_dropout_mask(p, B, H, L, S, device)
    if backend == "triton":
        from ...kernels import attention as k
        return k.dropout_mask(p, B, H, L, S, device)
    return getattr(_ext._C, f"attention_dropout_mask_{backend}")(B, H, L, S, p.dropout_p, p.seed, p.offset)


@torch.library.custom_op("fastattn::attention_dropout_mask", mutates_args=(), schema="(int B, int H, int L, int S, "
                         "float dropout_p, SymInt seed, SymInt offset, str backend, Device device) -> Tensor")
def dropout_mask_op(B, H, L, S, dropout_p, seed, offset, backend, device):
    """dropout_mask as an op torch.compile traces (MultiheadAttention's returned weights under dropout)."""
    p = AttnParams(1.0, False, 0, dropout_p=dropout_p, seed=seed, offset=offset)
    return dropout_mask(backend, p, B, H, L, S, device)


@dropout_mask_op.register_fake
def _(B, H, L, S, dropout_p, seed, offset, backend, device):
    return torch.empty(B, H, L, S, dtype=torch.bool, device=device)


# ---- custom ops ----------------------------------------------------------------------------------------------
# What torch.compile traces (eager calls skip this layer: its dispatch costs microseconds). AttnParams travel as
# their flat fields; backend "" is auto.
_TENSORS_FWD = "Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi"


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=(),
                         schema=f"({_TENSORS_FWD}, {params_schema()}, str backend) -> (Tensor, Tensor)")
def attention_fwd_op(q, k, v, mask, alibi, *flat_and_backend):
    *flat, backend = flat_and_backend
    out, lse = fwd(q, k, v, mask, alibi, AttnParams(*flat), backend or None)
    return out.contiguous(), lse.contiguous()  # as the fake (the CPU backend's out follows q's layout)


@attention_fwd_op.register_fake
def _(q, k, v, mask, alibi, *args):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=(),
                         schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
                                f"Tensor? alibi, {params_schema()}, str backend) -> (Tensor, Tensor, Tensor)")
def attention_bwd_op(dout, q, k, v, out, lse, mask, alibi, *flat_and_backend):
    *flat, backend = flat_and_backend
    dq, dk, dv = bwd(dout, q, k, v, out, lse, mask, alibi, AttnParams(*flat), backend or None)
    # contiguous, as the fake promises: the backends' gradients take the layout of q / k / v, and a traced graph that
    # views a gradient laid out otherwise fails at run time
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

