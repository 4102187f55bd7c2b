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


def attention_diag_offset(L: int, S: int, align: str) -> int:
    """Query i's diagonal is key i + offset: 0 when aligned top-left (torch's is_causal), S - L bottom-right."""
    return 0 if align == "top_left" else S - L


def attention_scores(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, *,
                     causal: Optional[str] = None, scale: Optional[float] = None, window=(-1, -1),
                     alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0):
    """The (B, H, L, S) scores of :func:`attention_ref` in q's dtype (-inf where masked), and tanh(x / softcap)
    (the softcap's derivative is 1 - tanh^2; None without softcap). k has the same number of heads as q."""
    B, H, L, E = q.shape
    S = k.shape[2]
    scale = E ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, L, S)
    capped = None
    if softcap > 0:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    offset = attention_diag_offset(L, S, "top_left" if causal == "top_left" else "bottom_right")
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(q.dtype).reshape(-1 if alibi_slopes.dim() == 2 else 1, H, 1, 1)
        scores = scores - slopes * (i + offset - j).abs().to(q.dtype)
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal is not None:
        keep &= j <= i + attention_diag_offset(L, S, causal)
    if window[0] >= 0:
        keep &= j >= i + offset - window[0]
    if window[1] >= 0:
        keep &= j <= i + offset + window[1]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            scores = scores + attn_mask.to(q.dtype)
    return scores.masked_fill(~keep, float("-inf")), capped


def _softmax(scores: torch.Tensor, with_lse: bool = False):
    """(probabilities, has_key (..., 1) bool, logsumexp (..., 1) or None) of scores (..., S) over the last dim.
    torch.softmax subtracts each row's max (exp(s - logsumexp) in float32 was 1 for every key of a row of scores ~1e9,
    whose logsumexp loses log(S): the row summed to S), and its output is all autograd keeps of it. A row with no key
    (all -inf) comes out uniform with has_key False: the caller zeroes what it gives (lse -inf there)."""
    with torch.no_grad():
        row_max = scores.amax(-1, keepdim=True) if scores.shape[-1] else scores.new_full((*scores.shape[:-1], 1),
                                                                                          float("-inf"))
        has_key = row_max != float("-inf")
        shift = row_max.masked_fill(~has_key, 0.0)
        lse = shift + torch.exp(scores - shift).sum(-1, keepdim=True).log() if with_lse else None
    return torch.softmax(scores.masked_fill(~has_key, 0.0), -1), has_key, lse


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, *,
                  causal: Optional[str] = None, scale: Optional[float] = None, window=(-1, -1),
                  alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0,
                  dropout_p: float = 0.0, dropout_mask: Optional[torch.Tensor] = None,
                  upcast: bool = True, return_lse: bool = False):
    """softmax(mask(softcap(q k^T * scale) + alibi)) v for q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev).

    attn_mask: bool (True = take part) or additive float, broadcastable to (B, H, L, S). causal: None, "top_left"
    or "bottom_right"; window (left, right) keys around the diagonal (-1 = unbounded), aligned bottom-right unless
    causal == "top_left". alibi_slopes (H,) or (B, H) add -slope * |i + offset - j|. Heads of k/v are shared by
    H // Hk query heads (GQA). A row with no key left gives 0. dropout_mask (B, H, L, S) bool keeps entries (scaled
    by 1 / (1 - dropout_p)). Returns out (B, H, L, Ev) in q's dtype, and lse (B, H, L) float32 when return_lse
    (+inf for a row with no key, so that exp(s - lse) = 0 there: the kernels' convention, and flash-attn's).
    """
    H, Hk = q.shape[1], k.shape[1]
    cdt = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hk != H:
        kc, vc = kc.repeat_interleave(H // Hk, dim=1), vc.repeat_interleave(H // Hk, dim=1)
    scores, _ = attention_scores(qc, kc, attn_mask, causal=causal, scale=scale, window=window,
                                 alibi_slopes=alibi_slopes, softcap=softcap)
    p, has_key, lse = _softmax(scores, return_lse)
    if dropout_p > 0:
        p = p * dropout_mask / (1 - dropout_p)
    out = ((p @ vc) * has_key).to(q.dtype)  # (rows with no key: 0)
    if not return_lse:
        return out
    return out, lse.squeeze(-1).float().masked_fill(lse.squeeze(-1) == float("-inf"), float("inf"))


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None, *,
                         scale: Optional[float] = None, softcap: float = 0.0, causal: bool = True,
                         upcast: bool = True, return_lse: bool = False):
    """Decode attention as :func:`attention_ref` with a mask: q (B, H, L, E) against the caches (B, Hk, S, E|Ev);
    sequence b has cache_seqlens[b] keys (all S when None) and its L query rows are its last L positions (causal:
    query i sees keys j <= i + len_b - L). keep (B, S) bool: False = that key is ignored. Cache entries past a
    sequence's length and masked keys are zeroed first, so whatever they hold (NaN) never reaches the result."""
    B, L, S = q.shape[0], q.shape[2], k_cache.shape[2]
    j = torch.arange(S, device=q.device)
    lens = torch.full((B,), S, device=q.device) if cache_seqlens is None else cache_seqlens.to(q.device).long()
    valid = j[None, :] < lens[:, None]  # (B, S)
    if keep is not None:
        valid = valid & keep
    k_cache = k_cache.masked_fill(~valid[:, None, :, None], 0)
    v_cache = v_cache.masked_fill(~valid[:, None, :, None], 0)
    mask = valid[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        i = torch.arange(L, device=q.device)
        mask = mask & (j[None, None, :] <= i[None, :, None] + (lens - L)[:, None, None])[:, None]  # (B, 1, L, S)
    return attention_ref(q, k_cache, v_cache, mask, scale=scale, softcap=softcap, upcast=upcast,
                         return_lse=return_lse)


def attention_bwd_ref(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: Optional[torch.Tensor] = None, *, causal: Optional[str] = None,
                      scale: Optional[float] = None, window=(-1, -1), alibi_slopes: Optional[torch.Tensor] = None,
                      softcap: float = 0.0, dropout_p: float = 0.0, dropout_mask: Optional[torch.Tensor] = None):
    """dq, dk, dv of :func:`attention_ref` for the output gradient dout, in closed form on recomputed scores (no
    autograd: it also runs inside a custom op). Computed in float32 (float64 stays float64), returned in the
    inputs' dtypes; dk, dv are summed over each GQA group."""
    B, H, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, do = q.to(cdt), k.to(cdt), v.to(cdt), dout.to(cdt)
    if Hk != H:
        kc, vc = kc.repeat_interleave(H // Hk, dim=1), vc.repeat_interleave(H // Hk, dim=1)
    scores, capped = attention_scores(qc, kc, attn_mask, causal=causal, scale=scale, window=window,
                                      alibi_slopes=alibi_slopes, softcap=softcap)
    probs, has_key, _ = _softmax(scores)
    probs = probs * has_key  # (B, H, L, S); 0 for rows with no key
    keep = dropout_mask.to(cdt) / (1 - dropout_p) if dropout_p > 0 else 1.0
    dv = (probs * keep).transpose(-1, -2) @ do
    dp = (do @ vc.transpose(-1, -2)) * keep
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    if capped is not None:
        ds = ds * (1 - capped.square())
    dq = (ds @ kc) * scale
    dk = (ds.transpose(-1, -2) @ qc) * scale
    if Hk != H:  # sum each GQA group's gradients into its shared K/V head
        dk = dk.view(B, Hk, H // Hk, S, dk.shape[-1]).sum(2)
        dv = dv.view(B, Hk, H // Hk, S, dv.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def int8_matmul_ref(a: torch.Tensor, b: torch.Tensor, a_scale: Optional[torch.Tensor] = None,
                    b_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """a int8 (M, K) @ b int8 (N, K)^T accumulated exactly, then out = acc * a_scale[m] * b_scale[n] + bias[n]
    in float32, cast to out_dtype. out_dtype=torch.int32 returns the accumulator (no scales, no bias). Leading batch
    dims, on every argument alike, are batched."""
    # exact in float64 (every partial sum is an integer below 2**53; CUDA has no int64 matmul): |acc| < 2**31
    # for K < 2**17
    acc = (a.to(torch.float64) @ b.to(torch.float64).transpose(-1, -2)).to(torch.int64)
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.to(torch.float32)  # the kernels' epilogue rounds the int32 accumulator to float32 the same way
    if a_scale is not None:
        out = out * _per_row(a_scale.to(torch.float32))
    if b_scale is not None:
        out = out * _per_col(b_scale.to(torch.float32))
    if bias is not None:
        out = out + _per_col(bias.to(torch.float32))
    return out.to(out_dtype)


def _per_row(t: torch.Tensor) -> torch.Tensor:  # (..., M) -> (..., M, 1); a scalar stays one
    return t[..., :, None] if t.dim() else t


def _per_col(t: torch.Tensor) -> torch.Tensor:  # (..., N) -> (..., 1, N); a scalar stays one
    return t[..., None, :] if t.dim() else t


def quantize_rows_ref(x: torch.Tensor, smooth: Optional[torch.Tensor] = None):
    """Symmetric int8 quantization of each row of x (..., K), after dividing column k by smooth[k]: scale = absmax /
    127, q = round_half_even(x / scale) in [-127, 127]. Returns (q int8 (..., K), scale float32 (...)); a zero row
    gets scale 0 and q 0."""
    def div(a, b):  # IEEE-rounded float32 division on every device (CUDA turns `tensor / scalar` into a multiply by
        return (a.double() / b).float()  # the reciprocal); float64 then float32 rounds correctly (53 >= 2 * 24 + 2)

    xf = x.to(torch.float32)
    if smooth is not None:
        xf = div(xf, smooth.double())
    scale = div(xf.abs().amax(-1), 127.0)
    inv = torch.where(scale > 0, div(torch.ones_like(scale), scale.double()), torch.zeros_like(scale))
    q = torch.round(xf * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The few-row linear: x (M, K) @ w (N, K)^T (+ bias[n]), torch's own (float32 sums for float32 operands)."""
    return torch.nn.functional.linear(x, w, bias)


def w8a16_matmul_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int8: (x @ w^T) * w_scale[n] (+ bias[n]) computed in float32, cast to x's dtype. x is (M, K) or
    batched (..., M, K) with the weights batched alike."""
    out = (x.to(torch.float32) @ w.to(torch.float32).transpose(-1, -2)) * _per_col(w_scale.to(torch.float32))
    if bias is not None:
        out = out + _per_col(bias.to(torch.float32))
    return out.to(x.dtype)


def linear_cross_entropy_ref(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                             reduction: str = "mean", upcast: bool = False) -> torch.Tensor:
    """cross_entropy(input @ weight.T + bias, target) over the last dim, the logits in float32 (float64 stays);
    ``upcast`` also runs the linear in float32. The unfused expression of fastattn.linear_cross_entropy."""
    if upcast:
        cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
        input, weight = input.to(cdt), weight.to(cdt)
        bias = None if bias is None else bias.to(cdt)
    logits = F.linear(input, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction).reshape(
        target.shape if reduction == "none" else ())
