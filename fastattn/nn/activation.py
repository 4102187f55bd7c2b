"""MultiheadAttention on fastattn's fused attention: torch.nn.MultiheadAttention's constructor, forward, parameters
and state_dict keys (it subclasses it), with the attention itself in one fused kernel call.

torch's masks say True = "masked out" (attn_mask, key_padding_mask); the kernel's bool masks say True = "takes
part". The translation happens once, in :func:`kernel_mask`, which also keeps a key padding mask at (B, 1, 1, S)
(or (B, 1, L, S) merged with a 2-D attn_mask): the kernel reads masks through their strides, never expanded.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import forced_backend
from ..ops.attention import AttnParams, attention, dropout_mask, select_backend
from ..ops.attention.api import attention_fwd_nograd, attention_packed, attention_seeded
from ..ops.attention.dispatch import dropout_mask_op
from ..ops.dropout import dropout_rng
from ..ops.batching import autocast_on, direct_call_ok, grads_with_graph, is_transformed
from ..reference import attention_scores
from ._fx import fx_leaf
from ._torchscript import refuse_script


# ---- argument checks: torch's exception types (AssertionError / RuntimeError), clearer messages ----------------
def _fail(exc, msg: str):
    raise exc(f"MultiheadAttention: {msg}")


class ShapeMismatch(AssertionError, RuntimeError):
    """A wrong feature size or key_padding_mask shape: torch raises AssertionError for it in its general path and
    RuntimeError on its fused inference path (eval, no grad); this is both, so either ``except`` catches it."""


def _check_mask_dtype(name: str, mask: Optional[Tensor]) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        _fail(AssertionError, f"{name} must be bool (True = masked out) or floating (added to the scores), got "
                              f"dtype {mask.dtype}")


def check_inputs(mha: "nn.MultiheadAttention", query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> bool:
    """Validates shapes the way torch's multi_head_attention_forward does; returns whether the input is batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            _fail(TypeError, f"{name} must be a Tensor, got {type(t).__name__}")
        if t.is_nested:
            _fail(AssertionError, f"{name} is a NestedTensor: pass a padded tensor and a key_padding_mask")
    _check_mask_dtype("key_padding_mask", key_padding_mask)
    _check_mask_dtype("attn_mask", attn_mask)
    if query.dim() not in (2, 3):
        _fail(AssertionError, f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        _fail(AssertionError, f"for a {query.dim()}-D query, key and value must be {query.dim()}-D, got "
                              f"{key.dim()}-D and {value.dim()}-D")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        _fail(AssertionError, f"key_padding_mask must be {'(N, S)' if batched else '(S,)'} for a "
                              f"{query.dim()}-D query, got shape {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        _fail(AssertionError, f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got shape "
                              f"{tuple(attn_mask.shape)}")
    if query.shape[-1] != mha.embed_dim:
        _fail(ShapeMismatch, f"query has {query.shape[-1]} features, expected embed_dim={mha.embed_dim}")
    if key.shape[:-1] != value.shape[:-1] or (mha._qkv_same_embed_dim and key.shape != value.shape):
        _fail(AssertionError, f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape"
                              + ("" if mha._qkv_same_embed_dim else " but for their features"))
    if key.shape[-1] != mha.kdim or value.shape[-1] != mha.vdim:
        # torch: a shape assertion on the separate projection weights, a matmul error on the packed one
        _fail(RuntimeError if mha._qkv_same_embed_dim else AssertionError,
              f"key / value have {key.shape[-1]} / {value.shape[-1]} features, expected kdim={mha.kdim} / "
              f"vdim={mha.vdim}")
    bdim = (0 if mha.batch_first else 1) if batched else None
    ldim = (1 if mha.batch_first else 0) if batched else 0
    B = query.shape[bdim] if batched else 1
    L, S = query.shape[ldim], key.shape[ldim]
    if batched and key.shape[bdim] != B:
        _fail(RuntimeError, f"key has batch size {key.shape[bdim]}, query {B}")
    if attn_mask is not None:
        want = (L, S) if attn_mask.dim() == 2 else (B * mha.num_heads, L, S)
        if tuple(attn_mask.shape) != want:
            exc = RuntimeError if batched or attn_mask.dim() == 2 else AssertionError
            _fail(exc, f"attn_mask has shape {tuple(attn_mask.shape)}, expected {want} "
                       f"({'(L, S)' if len(want) == 2 else '(N * num_heads, L, S)'})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((B, S) if batched else (S,)):
        _fail(ShapeMismatch, f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                              f"{(B, S) if batched else (S,)}")
    return batched


# ---- masks: torch's convention in, the kernel's out -------------------------------------------------------------
def kernel_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int,
                S: int) -> Optional[Tensor]:
    """torch's attn_mask ((L, S) or (B * H, L, S); bool True = masked out, or float added) and key_padding_mask
    ((B, S); bool True = padding, or float added) as one mask for the kernel: bool True = takes part, or float added,
    broadcastable to (B, H, L, S) and no larger than its inputs need: (1, 1, L, S), (B, 1, 1, S), (B, 1, L, S) or
    (B, H, L, S). A bool mask beside a float one becomes 0 / -inf of the float one's dtype, as in torch."""
    am = pm = None
    if attn_mask is not None:
        am = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S)
    if key_padding_mask is not None:
        pm = key_padding_mask.view(B, 1, 1, S)
    if am is None and pm is None:
        return None
    if am is None or pm is None:
        m = am if pm is None else pm
        return m.logical_not() if m.dtype == torch.bool else m
    if am.dtype == torch.bool and pm.dtype == torch.bool:
        return (am | pm).logical_not()  # (B, 1, L, S) or (B, H, L, S)
    fdt = torch.promote_types(am.dtype, pm.dtype) if am.is_floating_point() and pm.is_floating_point() else \
        (am.dtype if am.is_floating_point() else pm.dtype)  # two float masks add in their promoted dtype, as in torch
    am = am.to(fdt) if am.is_floating_point() else torch.zeros(am.shape, dtype=fdt, device=am.device).masked_fill_(
        am, float("-inf"))
    return am + (pm.to(fdt) if pm.is_floating_point() else pm.to(fdt).masked_fill_(pm, float("-inf")))


def _pad_keys(mask: Optional[Tensor], n: int) -> Optional[Tensor]:
    """Appends n key columns that take part (bias_k / zero-attention keys)."""
    if mask is None or n == 0:
        return mask
    if mask.dtype == torch.bool:
        return F.pad(mask, (0, n), value=True)
    return F.pad(mask, (0, n), value=0.0)


# ---- attention weights from the kernel's log-sum-exp -----------------------------------------------------------
def _probs(q: Tensor, k: Tensor, mask: Optional[Tensor], lse: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) from the kernel's log-sum-exp: exp(scores - lse) needs no max pass and
    cannot overflow, and one row sum renormalizes away lse's float32 rounding (at scores of magnitude 40 that
    rounding alone is ~2e-6 on the largest weight; torch's softmax is ~10x closer). A row with no key left
    (lse = +inf) gives 0, as the kernel's output does."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q, k.transpose(-1, -2)).to(cdt).mul_(scale)  # (B, H, L, S)
    if mask is not None and mask.dtype != torch.bool:
        s = s.add_(mask.to(cdt))
    lse = lse.to(cdt).masked_fill(lse == float("-inf"), float("inf"))
    p = s.sub_(lse[..., None]).exp_()
    if mask is not None and mask.dtype == torch.bool:
        p = p.masked_fill_(~mask, 0.0)
    return p.div_(p.sum(-1, keepdim=True).clamp_min_(torch.finfo(cdt).tiny))


class _AttnWeights(torch.autograd.Function):
    """The attention probabilities (times the dropout keep mask / (1 - p)), differentiable in q, k and a float mask:
    the softmax backward dS = P * (dP - rowsum(dP * P)) (lse carries no gradient of its own here). Returns (weights,
    P), P for the backward only. torch ops throughout, so torch.func batches it by running it on batched tensors
    (generate_vmap_rule)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, mask, lse, scale, keep, dropout_p):
        p = _probs(q, k, mask, lse, scale)
        w = (p if keep is None else p * keep / (1.0 - dropout_p)).to(q.dtype)
        return w, p.detach() if w is p else p  # a P that is w itself: an alias, so that w stays differentiable

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, mask, lse, scale, keep, dropout_p = inputs
        ctx.save_for_backward(q, k, mask, output[1], keep)
        ctx.mark_non_differentiable(output[1])
        ctx.scale, ctx.dropout_p = scale, dropout_p

    @staticmethod
    def backward(ctx, dw, _):
        q, k, mask, p, keep = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a double backward follows
            return _weights_grads_with_graph(ctx, dw, q, k, mask, keep) + (None,) * 4
        dp = dw.to(p.dtype)
        if keep is not None:
            dp = dp * keep / (1.0 - ctx.dropout_p)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # (B, H, L, S)
        dq = dk = dmask = None
        if ctx.needs_input_grad[0]:
            dq = (torch.matmul(ds, k.to(ds.dtype)) * ctx.scale).to(q.dtype)
        if ctx.needs_input_grad[1]:
            dk = (torch.matmul(ds.transpose(-1, -2), q.to(ds.dtype)) * ctx.scale).to(k.dtype)
        if ctx.needs_input_grad[2]:
            dmask = ds.sum_to_size(mask.shape).to(mask.dtype)
        return dq, dk, dmask, None, None, None, None


def _weights_grads_with_graph(ctx, dw: Tensor, q: Tensor, k: Tensor, mask: Optional[Tensor],
                              keep: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """_AttnWeights' gradients of q, k, mask with a graph of their own (a backward under create_graph=True): the
    weights recomputed by torch ops (the saved P has none) and differentiated by autograd."""
    return grads_with_graph(lambda q, k, mask: _weights_by_ops(q, k, mask, ctx.scale, keep, ctx.dropout_p),
                            (q, k, mask), dw)


def _weights_by_ops(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, keep: Optional[Tensor],
                    dropout_p: float) -> Tensor:
    """_AttnWeights' weights by differentiable torch ops (a row with no key: 0): for a double backward, and under
    torch.export, whose tracing differentiates the ops it records (strict export's trace of _AttnWeights gave wrong
    gradients; non-strict export's, a failed backward over its in-place ops)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s, _ = attention_scores(q.to(cdt), k.to(cdt), mask, scale=scale)
    lse = torch.logsumexp(s, -1, keepdim=True)
    w = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0))
    return (w if keep is None else w * keep / (1.0 - dropout_p)).to(q.dtype)


def _attention_with_keep(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float):
    """fastattn.attention's output and lse with dropout, and the (B, H, L, S) keep mask its kernel drew, so that
    the returned weights carry the dropout the output had: the Philox seed and offset drawn here (one draw from
    torch's generator, as attention() makes) serve both."""
    B, H, L, E = q.shape
    S = k.shape[2]
    if dropout_p >= 1.0:  # every probability dropped: out = 0, weights = 0
        out, lse = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, return_lse=True)
        return out, lse, torch.zeros(B, H, L, S, dtype=torch.bool, device=q.device)
    seed, offset = dropout_rng("MultiheadAttention with need_weights=True")
    out, lse = attention_seeded(q, k, v, (seed, offset), attn_mask=mask, dropout_p=dropout_p, return_lse=True)
    p = AttnParams(E ** -0.5, False, S - L, dropout_p=float(dropout_p), seed=seed, offset=offset)
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        backend = "reference"  # attention() runs a mask that needs a gradient on the reference
    else:
        backend = select_backend(q, k, v, mask, None, p, forced_backend() or None)
    if torch.compiler.is_compiling():
        return out, lse, dropout_mask_op(B, H, L, S, p.dropout_p, seed, offset, backend, q.device)
    return out, lse, dropout_mask(backend, p, B, H, L, S, q.device)


# ---- layouts ---------------------------------------------------------------------------------------------------
def _to_heads(t: Tensor, n: int, H: int, layout: str) -> Tuple[Tensor, ...]:
    """A projection (*lead, n * H * D) as n (B, H, L, D) views (no copy; the kernel reads them through strides).
    layout: "bld" (batch_first), "lbd" (sequence first) or "ld" (unbatched)."""
    *lead, width = t.shape
    x = t.view(*lead, n, H, width // (n * H))  # one permute and one unbind: each op costs host time
    if layout == "bld":
        return x.permute(2, 0, 3, 1, 4).unbind(0)  # n x (B, H, L, D)
    if layout == "lbd":
        return x.permute(2, 1, 3, 0, 4).unbind(0)
    return x.permute(1, 2, 0, 3).unsqueeze(1).unbind(0)


def _cross_heads(x: Tensor, kv: Tensor, w: Tensor, b: Optional[Tensor], H: int, layout: str) -> Tuple[Tensor, ...]:
    """q, k, v heads of x (queries) and kv (keys and values) through the packed (3E, E) projection w, b: one matmul
    for Q, one for K and V."""
    E = w.shape[0] // 3
    q, = _to_heads(_linear(x, w[:E], None if b is None else b[:E]), 1, H, layout)
    k, v = _to_heads(_linear(kv, w[E:], None if b is None else b[E:]), 2, H, layout)
    return q, k, v


def _from_heads(out: Tensor, layout: str) -> Tensor:
    """(B, H, L, D) back to the caller's row order with the heads concatenated: (T, E) rows ordered as the
    query's (B, L), (L, B) or (L,) leading dims."""
    B, H, L, D = out.shape
    if layout == "bld":
        return out.transpose(1, 2).reshape(B * L, H * D)
    if layout == "lbd":
        return out.permute(2, 0, 1, 3).reshape(L * B, H * D)
    return out[0].transpose(0, 1).reshape(L, H * D)


class _RowLinear(torch.autograd.Function):
    """F.linear on 2-D rows, whose backward takes the bias gradient on the CPU as a matrix-vector product: torch's
    column sum (AddmmBackward's grad.sum(0)) ran ~15 ms on a (4096, 512) gradient on our 2-core CPUs, the GEMV ~0.2
    ms (torch 2.14: 0.24-0.43 against 0.16-0.33 ms). On a GPU the column sum, as torch's: one launch, not two."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.mm(weight) if ctx.needs_input_grad[0] else None
        dw = dy.t().mm(x) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.needs_input_grad[2]:
            db = torch.mv(dy.t(), dy.new_ones(dy.shape[0])) if dy.device.type == "cpu" else dy.sum(0)
        return dx, dw, db


def linear_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear on (T, K) rows (a tensor of its own, (T, N)); under autograd through :class:`_RowLinear`, except
    under torch.func transforms (F.linear itself: they batch and differentiate it) and torch.export (which keeps no
    autograd.Function's backward)."""
    # (autocast: F.linear's own backward casts back)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)) and not is_transformed(x, weight, bias) \
            and not autocast_on(x.device.type) and not torch.compiler.is_exporting():
        return _RowLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear on the rows of x, returned (*x.shape[:-1], N) as a view of one 2-D result."""
    return linear_rows(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on fastattn's fused attention kernel: same constructor, forward, outputs,
    parameters and state_dict keys (load_state_dict works both ways).

    Self-attention (query is key is value) projects Q, K and V in one matmul; the heads are read through strides
    (no transposes); bool and float masks of every shape torch accepts are translated once into the kernel's form
    and read through their strides, a key_padding_mask at (B, 1, 1, S). Dropout runs inside the kernel in training.
    With need_weights=True the kernel still computes the output, and the weights are rebuilt from its
    log-sum-exp (one extra QK^T); they are differentiable, and under dropout they carry the kernel's dropout mask.
    is_causal is the hint torch takes it for: it needs an attn_mask, and the kernel runs causal (ignoring the mask)
    exactly when torch's SDPA would, i.e. without a key_padding_mask and with need_weights=False. Inference calls
    (no gradient) with key is value and no mask but that causal one go straight from the projections to the
    kernel, as torch's fused fast path does in C++: the same results, a fraction of the host time.

    **One difference from torch:** a query whose keys are all masked out attends to nothing: its attention output is
    0 (so the module's output there is out_proj.bias), its weights 0 and its gradients 0, as everywhere in fastattn.
    torch gives the same on the CPU with need_weights=False in its general path, but NaN with need_weights=True and
    on its inference fast path. A NestedTensor input (strided) runs where torch's fast path takes one (inference,
    self-attention, batch_first, no mask; also with an odd head count or bias=False, which torch's refuses): each
    sequence on attention_varlen, a NestedTensor out (and the weights padded as torch's are); elsewhere it raises
    torch's AssertionError.
    """

    @fx_leaf
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if isinstance(query, Tensor) and query.is_nested:  # torch's inference fast path takes one
            from .packed import mha_nested
            return mha_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights)
        out, weights = mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        return out.view(*query.shape[:-1], self.embed_dim), weights

    __prepare_scriptable__ = refuse_script


def _plain_inference(mha: nn.MultiheadAttention, x: Tensor, kv: Tensor) -> Optional[Tuple[Tensor, ...]]:
    """The projections' (in weight, in bias, out weight, out bias) when attention of x on kv may take the short way
    (_attention_rows), else None: no gradient, no dropout, one packed projection held as plain parameters (none
    swapped or parametrized) and no extra keys, plain (un)batched x and kv of the weights' dtype and device, no
    autocast, torch.compile, jit or torch.func around it. What the general path checks call by call instead cost
    ~80 us of host time on our CPUs, against kernels of tens of us at small sizes (torch's fast path: one C++ call)."""
    if torch.is_grad_enabled() or (mha.training and mha.dropout > 0) or not mha._qkv_same_embed_dim \
            or mha.add_zero_attn:
        return None
    ps, out_ps = mha._parameters, mha.out_proj._parameters  # (nn.Module.__getattr__ costs ~0.5 us a name)
    w = ps.get("in_proj_weight")
    if w is None or "weight" not in out_ps or "bias" not in out_ps:  # a swapped or wrapped projection
        return None
    if mha.bias_k is not None or type(x) is not Tensor or x.is_nested or x.dim() not in (2, 3) \
            or x.shape[-1] != mha.embed_dim or x.dtype != w.dtype or x.device != w.device \
            or x.device.type not in ("cpu", "cuda"):
        return None
    if kv is not x and (type(kv) is not Tensor or kv.is_nested or kv.dtype != x.dtype or kv.device != x.device):
        return None
    params = (w, ps.get("in_proj_bias"), out_ps["weight"], out_ps["bias"])
    return params if direct_call_ok(x.device.type, x, kv, *params) else None


def _attention_rows(mha: nn.MultiheadAttention, x: Tensor, kv: Tensor, params: Tuple[Tensor, ...],
                    causal: bool) -> Tensor:
    """mha_forward's output for attention of x on kv (validated) without masks (or causal), with params =
    _plain_inference(mha, x, kv): the projections, the kernel on their heads and the output projection, the same
    calls as the general path's."""
    w, b, ow, ob = params
    H = mha.num_heads
    layout = ("bld" if mha.batch_first else "lbd") if x.dim() == 3 else "ld"
    q, k, v = _to_heads(_linear(x, w, b), 3, H, layout) if kv is x else _cross_heads(x, kv, w, b, H, layout)
    return linear_rows(_from_heads(attention_fwd_nograd(q, k, v, causal), layout), ow, ob)


def mha_forward(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """MultiheadAttention.forward with the output flat: (T, E) rows in query's layout (T = query.numel() // E),
    a tensor of its own (not a view), so a caller may modify it in place (the Transformer layers' dropout)."""
    if key is value and not need_weights and key_padding_mask is None and (attn_mask is not None) == is_causal:
        params = _plain_inference(mha, query, key)
        if params is not None:  # no mask, or a causal one that the kernel runs as causal (as below)
            if is_causal or query is not key:
                check_inputs(mha, query, key, value, None, attn_mask)
            return _attention_rows(mha, query, key, params, is_causal), None
    batched = check_inputs(mha, query, key, value, key_padding_mask, attn_mask)
    if is_causal and attn_mask is None:
        raise RuntimeError("MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask and "
                           "needs that attn_mask (Transformer.generate_square_subsequent_mask builds one)")
    layout = ("bld" if mha.batch_first else "lbd") if batched else "ld"
    H = mha.num_heads
    E = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    packed = None  # self-attention: the projection Q, K and V are the heads of, and how to split it
    if mha._qkv_same_embed_dim and query is key and key is value:
        packed = (_linear(query, w, b), lambda t: _to_heads(t, 3, H, layout))  # one matmul for Q, K and V
        q, k, v = packed[1](packed[0])
    elif mha._qkv_same_embed_dim and key is value:
        q, k, v = _cross_heads(query, key, w, b, H, layout)
    else:
        bq, bk, bv = (None,) * 3 if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        wq, wk, wv = ((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight) if w is None
                      else (w[:E], w[E:2 * E], w[2 * E:]))
        q, = _to_heads(_linear(query, wq, bq), 1, H, layout)
        k, = _to_heads(_linear(key, wk, bk), 1, H, layout)
        v, = _to_heads(_linear(value, wv, bv), 1, H, layout)
    B, _, L, D = q.shape
    S = k.shape[2]

    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None if causal else kernel_mask(attn_mask, None if key_padding_mask is None else
                                           key_padding_mask.view(B, S), B, H, L, S)
    extra = 0
    if mha.bias_k is not None and mha.bias_v is not None or mha.add_zero_attn:
        packed = None  # keys and values beyond the projection's
    if mha.bias_k is not None and mha.bias_v is not None:
        k = torch.cat([k, mha.bias_k.view(1, H, 1, D).expand(B, H, 1, D)], dim=2)
        v = torch.cat([v, mha.bias_v.view(1, H, 1, D).expand(B, H, 1, D)], dim=2)
        extra += 1
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
        v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
        extra += 1
    mask = _pad_keys(mask, extra)
    dropout_p = mha.dropout if mha.training else 0.0

    weights = None
    if not need_weights and packed is not None:  # the projection's gradient as one tensor (no stack of three)
        out = attention_packed(*packed, causal="top_left" if causal else None, attn_mask=mask, dropout_p=dropout_p)
    elif not need_weights:
        out = attention(q, k, v, causal="top_left" if causal else None, attn_mask=mask, dropout_p=dropout_p)
    else:
        keep = None
        if dropout_p > 0:
            out, lse, keep = _attention_with_keep(q, k, v, mask, dropout_p)
        else:
            out, lse = attention(q, k, v, attn_mask=mask, return_lse=True)
        if torch.compiler.is_exporting():
            weights = _weights_by_ops(q, k, mask, D ** -0.5, keep, dropout_p)
        else:
            weights = _AttnWeights.apply(q, k, mask, lse.detach(), D ** -0.5, keep, dropout_p)[0]  # (B, H, L, S')
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    out = linear_rows(_from_heads(out, layout), mha.out_proj.weight, mha.out_proj.bias)  # (T, E)
    return out, weights
