"""Pieces the model files share: norms that carry the residual stream, attention with a static KV cache, the MLP,
one Transformer block, the models' input checks and LM loss, and saving / loading (the config base: config.py;
positions: positions.py; sampling and the KV-cache bookkeeping of generate: generation.py).

Every module takes ``backend``: "fastattn" runs fastattn's fused ops (``fastattn.attention``, ``add_layer_norm`` /
``add_rms_norm`` with ``prenorm=True``), "torch" the same math from stock torch ops (F.scaled_dot_product_attention,
F.layer_norm / F.rms_norm, x + r), with the same parameters and state_dict keys, for A/B runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..ops.add_norm import add_layer_norm, add_rms_norm
from ..backends import forced_backend_name
from ..ops.attention import attention, attention_varlen, decode_attention
from ..ops.attention.api import attention_packed
from ..ops.attention.decode import route_backend
from ..ops.cross_entropy import linear_cross_entropy
from ..ops.dropout import dropout as fa_dropout
from ..quantization import apply_int8_layout, int8_layout
from .. import hugepages
from .checkpoint import CheckpointError, load_weights, place, read_json_object, save_weights, stored_dtype
from .packing import Packing
from .config import ModelConfig
from .positions import alibi_slopes, apply_rotary, pick_rotary


# ---- norms: the residual stream -------------------------------------------------------------------------------
class Norm(nn.Module):
    """LayerNorm or RMSNorm whose call also adds the residual. ``pre(x, residual)`` -> (norm(x + residual),
    x + residual) (residual None: (norm(x), x)); ``post(x, residual)`` -> norm(x + residual). Parameters: weight,
    bias (LayerNorm with bias only)."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool, backend: str):
        super().__init__()
        self.kind, self.eps, self.backend = kind, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def _torch_norm(self, s: Tensor) -> Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(s, s.shape[-1:], self.weight, self.bias, self.eps)
        return F.rms_norm(s, s.shape[-1:], self.weight, self.eps)

    def pre(self, x: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.backend == "torch":
            s = x if residual is None else x + residual
            return self._torch_norm(s), s
        if self.kind == "layernorm":
            return add_layer_norm(x, residual, self.weight, self.bias, self.eps, prenorm=True)
        return add_rms_norm(x, residual, self.weight, self.eps, prenorm=True)

    def post(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.backend == "torch":
            return self._torch_norm(x if residual is None else x + residual)
        if self.kind == "layernorm":
            return add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    forward = post

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.kind}, eps={self.eps}"


def pre_norm(norm: Optional[Norm], x: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """norm.pre(x, residual); without a norm (a block with ``input_norm`` False) the stream itself, twice."""
    if norm is not None:
        return norm.pre(x, residual)
    s = x if residual is None else x + residual
    return s, s


def drop(x: Tensor, p: float, training: bool, backend: str) -> Tensor:
    """Dropout: fastattn's Philox kernel (the mask regenerated in the backward, not stored), torch's for "torch"."""
    if not p or not training:
        return x
    return F.dropout(x, p, True) if backend == "torch" else fa_dropout(x, p, True)


def make_norm(cfg: ModelConfig, dim: Optional[int] = None) -> Norm:
    return Norm(dim or cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias if cfg.norm_bias is None else cfg.norm_bias,
                cfg.backend)


# ---- attention ------------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys and values (B, Hk, max_len, D), written at ``input_pos``; static shapes for decoding.
    ``bounded``: a sliding-window layer's cache that holds a run of the generation's slots only (its owner,
    CacheMixin, keeps the first one's index and passes positions relative to it), moved along by ``shift``."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device,
                 bounded: bool = False):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.bounded = bounded
        self.register_buffer("k", hugepages.zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", hugepages.zeros(shape, dtype, device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """k, v (B, Hk, L, D) written at the L positions ``input_pos`` (L,); returns the whole cache. A bounded cache
        keeps the last S of a longer write (a prompt longer than its S slots, positioned to end at slot S - 1)."""
        S = self.k.shape[2]
        if self.bounded and k.shape[2] > S:
            input_pos, k, v = input_pos[-S:], k[:, :, -S:], v[:, :, -S:]
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

    def shift(self, n: int) -> None:
        """Drop the first n slots: the others move to the front (the last n keep stale values)."""
        S = self.k.shape[2]
        self.k[:, :, :S - n] = self.k[:, :, n:].clone()
        self.v[:, :, :S - n] = self.v[:, :, n:].clone()


def window_padding(S: int, input_pos: Tensor, window: int) -> Tensor:
    """(S,) True for the cache slots a token written at ``input_pos`` (1,) does not see through a window of
    ``window`` keys (a slot's distance is its tokens': left padding comes first)."""
    return torch.arange(S, device=input_pos.device) <= input_pos - window


def _torch_attention(q, k, v, causal, key_padding_mask, dropout_p, window: Tuple[int, int] = (-1, -1), scale=None,
                     softcap=0.0, bias=None, alibi=None):
    """fastattn.attention's meaning in stock torch SDPA (a bool mask is built for causal + padding + ``window``:
    (left, right) keys around the diagonal, -1 unbounded; ``bias`` added to the scores, and ALiBi's -slope *
    distance for ``alibi`` (H,) slopes, bottom-right aligned); with a softcap, which SDPA lacks, written out in torch
    ops."""
    L, S = q.shape[-2], k.shape[-2]
    if alibi is not None:
        dist = (torch.arange(L, device=q.device)[:, None] + S - L - torch.arange(S, device=q.device)).abs()
        slope_bias = -alibi.to(q.dtype)[:, None, None] * dist.to(q.dtype)  # (H, L, S)
        bias = slope_bias if bias is None else bias + slope_bias
    mask = None
    if causal is not None or window != (-1, -1):
        i = torch.arange(L, device=q.device)[:, None] + (S - L if causal == "bottom_right" else 0)
        j = torch.arange(S, device=q.device)
        mask = i >= j if causal is not None else torch.ones(L, S, dtype=torch.bool, device=q.device)  # (L, S)
        if window[0] >= 0:
            mask = mask & (j >= i - window[0])
        if window[1] >= 0:
            mask = mask & (j <= i + window[1])
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else mask & keep
    if softcap:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))  # (float64 stays)
        s = s * (q.shape[-1] ** -0.5 if scale is None else scale)
        s = softcap * torch.tanh(s / softcap)
        if bias is not None:
            s = s + bias
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = F.dropout(torch.softmax(s, -1).nan_to_num(0.0), dropout_p, True)  # a row with no key: 0, as fastattn
        return (p.to(v.dtype) @ v)
    if bias is not None:
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention. Self-attention: one fused projection ``wqkv`` to
    [q | k | v]; cross-attention (``cross=True``): ``wq`` on the queries and ``wkv`` on the memory. Output ``wo``."""

    def __init__(self, cfg: ModelConfig, cross: bool = False, window: int = 0, rope: bool = True):
        super().__init__()
        self.rope = rope  # False: a NoPE layer (the model's rotary positions skipped here)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.backend, self.dropout, self.cross = cfg.backend, cfg.dropout, cross
        self.window = window  # keys per causal query (a sliding window), 0: all; bidirectional (BERT): W - 1 each side
        self.bidirectional = cfg.model_type == "bert"
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        if cross:
            self.wq = nn.Linear(cfg.d_model, q_dim, bias=qkv_bias)
            self.wkv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=qkv_bias)
        else:
            self.wqkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        # Qwen3: q and k normalised over each head's dims (one weight shared by the heads); OLMo 2 (qk_norm_full):
        # over all heads' q (q_dim weights) and all heads' k (kv_dim)
        self.qk_full, self.qk_after = cfg.qk_norm_full, cfg.qk_norm_after_rope
        self.q_norm = make_norm(cfg, q_dim if self.qk_full else cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, kv_dim if self.qk_full else cfg.head_dim) if cfg.qk_norm else None
        self.cache: Optional[KVCache] = None
        self.memory_kv: Optional[Tuple[Tensor, Tensor]] = None  # cross-attention K/V, computed once per generation
        # ALiBi: -slope * distance on each head's scores; float32 whatever the model's dtype (see _apply)
        self._slopes = None
        if cfg.pos == "alibi":
            self._slopes = alibi_slopes(cfg.n_head) if cfg.alibi_slopes is None else \
                torch.tensor(cfg.alibi_slopes, dtype=torch.float32)
        self.register_buffer("alibi", self._slopes, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.alibi is not None and self.alibi.dtype != torch.float32:  # model.to(bfloat16): slopes stay exact
            self.alibi = self._slopes.to(self.alibi.device)
        return self

    def memory(self, mem: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the memory (B, S, d_model): (B, Hk, S, D) each."""
        B, S, _ = mem.shape
        k, v = self.wkv(mem).view(B, S, 2, self.n_kv_head, self.head_dim).unbind(2)  # (B, S, Hk, D) each
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, *, causal: Optional[str] = None, key_padding_mask: Optional[Tensor] = None,
                rotary: Optional[Tuple[Tensor, Tensor]] = None, input_pos: Optional[Tensor] = None,
                use_cache: bool = False, memory: Optional[Tuple[Tensor, Tensor]] = None,
                attn_bias: Optional[Tensor] = None, cache_end: Optional[int] = None,
                packing: Optional[Packing] = None, packing_kv: Optional[Packing] = None) -> Tensor:
        """x (B, L, d_model). ``input_pos`` (L,): also write k, v into the cache there; ``use_cache``: attend over the
        whole cache (decode; ``key_padding_mask`` then covers the cache) instead of the keys of x (prefill), or over
        its first ``cache_end`` slots (several rows per sequence, ``causal`` bottom-right: each row sees its own
        slot and the ones before it).
        ``memory``: cross-attention keys and values (B, Hk, S, D). ``attn_bias``: added to the scores, (B | 1, H,
        L, keys) (T5's relative positions). ``packing``: several sequences a row (without a cache), each attending
        within itself (in cross-attention, to sequence n of the memory, packed as ``packing_kv`` says):
        fastattn.attention_varlen over the tokens, or (torch backend, torch.compile, a bias) a block-diagonal mask."""
        B, L, _ = x.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        packed = None  # self-attention on the fused projection's heads as they are: its gradient in one tensor
        if self.cross:
            q = self.wq(x).view(B, L, H, D)
            if self.q_norm is not None:
                q = self.q_norm(q)
            k, v = memory
        else:
            qkv, widths = self.wqkv(x), [H * D, Hk * D, Hk * D]
            if self.q_norm is None and not (rotary is not None and self.rope) and input_pos is None:
                packed = (qkv, lambda t: tuple(h.view(B, L, n, D).transpose(1, 2)  # (n, not -1: B may be 0)
                                               for h, n in zip(t.split(widths, -1), (H, Hk, Hk))))
            q, k, v = qkv.split(widths, -1)
            if self.qk_full:  # (rows of the fused projection: made contiguous for the norm kernel)
                q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
            q, k, v = q.view(B, L, H, D), k.view(B, L, Hk, D), v.view(B, L, Hk, D)
            if self.q_norm is not None and not self.qk_full and not self.qk_after:
                q, k = self.q_norm(q), self.k_norm(k)
            if rotary is not None and self.rope:
                rotary = pick_rotary(rotary, self.window)
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if self.qk_after:  # HunYuan: per head, after the rotary positions
                q, k = self.q_norm(q), self.k_norm(k)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hk, L, D)
            if input_pos is not None:
                k_all, v_all = self.cache.update(input_pos, k, v)
                if use_cache:
                    k, v = (k_all, v_all) if cache_end is None else (k_all[:, :, :cache_end], v_all[:, :, :cache_end])
        q = q.transpose(1, 2)  # (B, H, L, D), a strided view
        p = self.dropout if self.training else 0.0
        window = (-1, -1) if not self.window else (self.window - 1, 0) if causal is not None else \
            (self.window - 1, self.window - 1) if self.bidirectional else (-1, -1)
        if self.window and use_cache and causal is None:  # one row: the slots W or more behind it join the padding
            key_padding_mask = key_padding_mask | window_padding(k.shape[2], input_pos, self.window)
        keys = packing_kv if self.cross else packing
        if packing is not None and packing.cu_seqlens is not None and keys.cu_seqlens is not None \
                and attn_bias is None and self.backend != "torch":
            out = attention_varlen(*(t.transpose(1, 2).reshape(-1, t.shape[1], D) for t in (q, k, v)),
                                   packing.cu_seqlens, keys.cu_seqlens, packing.max_len, keys.max_len,
                                   causal=None if causal is None else "top_left", dropout_p=p, window=window,
                                   scale=self.scale, softcap=self.softcap, alibi_slopes=self.alibi,
                                   validate=False)  # packing_of made them: not read again in every layer
            return self.wo(out.view(B, L, H * D))
        if packing is not None:  # one sequence's keys only: a block-diagonal mask (on T5's bias, if any)
            same = packing.same_sequence(keys)
            if attn_bias is not None:
                attn_bias = attn_bias.masked_fill(~same, float("-inf"))
            else:
                attn_bias = same if self.backend != "torch" else \
                    torch.zeros(same.shape, dtype=q.dtype, device=q.device).masked_fill_(~same, float("-inf"))
            packed = None
        if self.backend == "torch":
            out = _torch_attention(q, k, v, causal, key_padding_mask, p, window,
                                   self.scale, self.softcap, attn_bias, self.alibi)
        elif use_cache and attn_bias is None and self.alibi is None and not (causal and self.window) and \
                not torch.is_grad_enabled() and route_backend(q, k, v, forced_backend_name()):
            # a decode step that fastattn.attention would route to the split-KV kernel: called directly, without
            # the general checks, which cost more host time than the kernel at these sizes
            out = decode_attention(q, k, v, causal=causal is not None, key_padding_mask=key_padding_mask,
                                   scale=self.scale, softcap=self.softcap)
        else:
            kw = dict(causal=causal, attn_mask=attn_bias, key_padding_mask=key_padding_mask, dropout_p=p,
                      window=window, scale=self.scale, softcap=self.softcap, alibi_slopes=self.alibi)
            out = attention(q, k, v, **kw) if packed is None else attention_packed(*packed, **kw)
        return self.wo(out.transpose(1, 2).reshape(B, L, H * D))


# ---- MLP ------------------------------------------------------------------------------------------------------
def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


def activation_fn(name: str):
    """The activation by its config name: module-level functions, so that a model holding one pickles
    (torch.save(model), spawned workers)."""
    return {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu, "silu": F.silu, "relu2": relu2}[name]


class MLP(nn.Module):
    """"gelu": w_out(act(w_in(x))); "swiglu" / "geglu": w_out(act(gate) * up) with [gate | up] = w_in(x) (one
    Linear), act silu / the config's activation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.act = F.silu if cfg.mlp == "swiglu" else activation_fn(cfg.activation)
        self.w_in = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.w_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(self.w_in, self.w_out, x)

    def run(self, w_in, w_out, x: Tensor) -> Tensor:
        """The MLP on x through the projections given: the module's own, or bound ones (models/decode_step.py)."""
        h = w_in(x)
        if self.gated:
            gate, up = h.chunk(2, -1)
            return w_out(self.act(gate) * up)
        return w_out(self.act(h))


# ---- one block ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; pre-norm (the residual stream carried by add+norm) or post-norm.

    Pre-norm: ``forward(h, residual)`` takes the previous block's sublayer output h and the stream so far, and returns
    (h, residual) again; the model applies its final norm to h + residual. Post-norm: residual is None in and out."""

    def __init__(self, cfg: ModelConfig, cross: bool = False, layer: int = 0):
        super().__init__()
        self.norm_first, self.dropout, self.backend = cfg.norm_first, cfg.dropout, cfg.backend
        # input_norm False (OLMo 2): no norm before the sublayers, only the sandwich norms after them
        self.norm1 = make_norm(cfg) if cfg.input_norm and (layer or cfg.first_input_norm) else None
        if getattr(cfg, "rel_pos_buckets", 0):  # DeBERTa's (disentangled.py builds on this file's Attention)
            from .disentangled import DisentangledAttention
            self.attn = DisentangledAttention(cfg)
        else:
            self.attn = Attention(cfg, window=cfg.layer_window(layer), rope=layer not in (cfg.nope_layers or ()))
        if cross:
            self.norm_x, self.cross_attn = make_norm(cfg), Attention(cfg, cross=True)
        self.parallel = cfg.parallel_block
        self.norm2 = None if self.parallel == "one_norm" or not cfg.input_norm else make_norm(cfg)
        if cfg.n_experts:
            from .moe import MoE  # (moe.py builds on this file's MLP)
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg)
        if cfg.sandwich_norm:  # Gemma 2: each sublayer's output normalised before the residual add
            self.post_norm1, self.post_norm2 = make_norm(cfg), make_norm(cfg)

    def _drop(self, x: Tensor) -> Tensor:
        return drop(x, self.dropout, self.training, self.backend)

    def _out(self, x: Tensor, post: str) -> Tensor:
        """A sublayer's output, through its sandwich norm when the model has them."""
        norm = getattr(self, post, None)
        return x if norm is None else norm(x)

    def forward(self, h: Tensor, residual: Optional[Tensor], *, memory=None, memory_mask=None, memory_packing=None,
                **attn_kw) -> Tuple[Tensor, Optional[Tensor]]:
        cross_kw = {} if memory_packing is None else dict(packing=attn_kw.get("packing"), packing_kv=memory_packing)
        if self.parallel:  # attention and MLP both read the stream; their outputs join it together
            x, residual = self.norm1.pre(h, residual)
            x2 = x if self.norm2 is None else self.norm2(residual)
            return self._drop(self.attn(x, **attn_kw)) + self._drop(self.mlp(x2)), residual
        if self.norm_first:
            x, residual = pre_norm(self.norm1, h, residual)
            h = self._drop(self._out(self.attn(x, **attn_kw), "post_norm1"))
            if memory is not None:
                x, residual = self.norm_x.pre(h, residual)
                h = self._drop(self.cross_attn(x, key_padding_mask=memory_mask, memory=memory, **cross_kw))
            x, residual = pre_norm(self.norm2, h, residual)
            return self._drop(self._out(self.mlp(x), "post_norm2")), residual
        h = self.norm1.post(self._drop(self.attn(h, **attn_kw)), h)
        if memory is not None:
            h = self.norm_x.post(self._drop(self.cross_attn(h, key_padding_mask=memory_mask, memory=memory,
                                                            **cross_kw)), h)
        return self.norm2.post(self._drop(self.mlp(h)), h), None


def softcap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap); x itself when cap is 0."""
    return cap * torch.tanh(x / cap) if cap else x


def init_weights(m: nn.Module) -> None:
    """GPT-2 / BERT initialisation: normal(0, 0.02) weights, zero biases (norms keep ones / zeros)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ---- model inputs and the LM loss --------------------------------------------------------------------------------
def lm_head_loss(head: nn.Module, h: Tensor, target: Tensor, backend: str, skip_logits: bool,
                 transform=None) -> Tuple[Optional[Tensor], Tensor]:
    """(logits, loss) of the LM head ``head`` on hidden states h (..., d): cross-entropy against target (...) (-100
    ignored), mean over the kept positions. ``skip_logits`` on the fastattn backend, with a plain nn.Linear head (not
    a LoRA / QAT / int8 one): fastattn.linear_cross_entropy, and logits None. ``transform``: a function the logits
    go through (Gemma 2's softcap), which keeps the unfused path."""
    if skip_logits and backend == "fastattn" and transform is None and type(head) is nn.Linear:
        return None, linear_cross_entropy(h, head.weight, target, head.bias)
    logits = head(h) if transform is None else transform(head(h))
    return logits, F.cross_entropy(upcast(logits.flatten(0, -2)), target.flatten(), ignore_index=-100)


def upcast(x: Tensor) -> Tensor:
    """x in the dtype a loss is computed in: float32 for half types (and integers), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def shifted_target(labels: Optional[Tensor], shift_labels: Optional[Tensor], input_ids: Tensor) -> Optional[Tensor]:
    """A causal LM's target per position (B, L): shift_labels as given, or labels shifted left by one (the last
    position ignored: -100); None without either."""
    if labels is not None and shift_labels is not None:
        raise ValueError("labels, shift_labels: pass one of them (labels are shifted here, shift_labels already are)")
    name, t = ("shift_labels", shift_labels) if shift_labels is not None else ("labels", labels)
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.shape != input_ids.shape or t.is_floating_point():
        raise ValueError(f"{name}: expected integer class ids of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    return t if shift_labels is not None else F.pad(t[:, 1:], (0, 1), value=-100)


def keep_mask(input_ids: Tensor, attention_mask: Optional[Tensor], max_len: Optional[int] = None,
              name: str = "input_ids") -> Tensor:
    """HF's attention_mask (1 = keep) as bool (B, L); all True when None. Checks input_ids (B, L), 0 < L <= max_len
    (errors name the argument ``name``)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        what = getattr(input_ids, "dtype", type(input_ids).__name__)
        raise ValueError(f"{name}: expected an integer tensor (B, L), got {what} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(f"{name}: {input_ids.shape[1]} tokens > config.max_seq_len {max_len}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one token a row, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids' "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.bool()


def embed_tokens(emb: nn.Module, ids: Tensor, name: str = "input_ids") -> Tensor:
    """emb(ids); on the CPU an id outside the table is refused naming the argument ``name`` (F.embedding's
    IndexError names none; on a GPU it is a device-side assert, as in torch)."""
    try:
        return emb(ids)
    except IndexError:
        n = getattr(emb, "num_embeddings", None)
        if n is None:
            raise
        bad = ids[(ids < 0) | (ids >= n)]
        raise ValueError(f"{name}: token ids must be in [0, vocab_size={n}), got {bad[:4].tolist()}") from None


def token_positions(ids: Tensor, pad_id: int, skip_padding: bool) -> Tensor:
    """(B, L) positions: 0, 1, ... along each row, or (``skip_padding``: RoBERTa's, M2M100's) the real tokens
    numbered in order past any padding (pad_id) and -1 on the padding (the table row just before pos_offset)."""
    if not skip_padding:
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    real = (ids != pad_id).long()
    return torch.cumsum(real, 1) * real - 1


def check_skip_padding(cfg, field: str) -> None:
    """ValueError unless cfg.<field> (positions that skip padding) is a bool, set only with learned positions from
    table row pad_token_id + 1 (the row before it, the padding's)."""
    v = getattr(cfg, field)
    if not isinstance(v, bool):
        raise ValueError(f"{type(cfg).__name__}.{field}: expected true or false, got {v!r}")
    if v and (cfg.pos != "learned" or cfg.pos_offset != cfg.pad_token_id + 1):
        raise ValueError(f"{type(cfg).__name__}.{field}: needs pos 'learned' and pos_offset = pad_token_id + 1 "
                         f"({cfg.pad_token_id + 1}), got {cfg.pos!r} and {cfg.pos_offset}")


def padding_or_none(keep: Tensor, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The kernel's key_padding_mask (True = padding) from keep_mask's result, or None when nothing is padded
    (``attention_mask``, the mask the caller was given, is None; or, in eager mode, it keeps every token: under
    torch.compile that test would be a data-dependent branch, and the all-False mask gives the same result; on the
    meta device there is no data to test)."""
    if attention_mask is None:
        return None
    if torch.compiler.is_compiling() or keep.is_meta:
        return ~keep
    return None if bool(keep.all()) else ~keep


# ---- outputs, saving, parameter groups ------------------------------------------------------------------------
@dataclass
class ModelOutput:
    logits: Tensor
    loss: Optional[Tensor] = None
    nsp_logits: Optional[Tensor] = None
    hidden_states: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None  # a mixture of experts' load-balancing loss (in training; included in .loss)


# a pytree node (as transformers registers its outputs): torch.export and torch.func flatten and rebuild it
torch.export.register_dataclass(ModelOutput, serialized_type_name="fastattn.models.ModelOutput")


CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
INT8_FILE = "quantization.json"  # a quantized model's int8 layout (fastattn.int8_layout)


def _int8_layout_file(file: str) -> Optional[Dict[str, dict]]:
    """The int8 layout in save_pretrained's quantization.json (fastattn.int8_layout), None without that file."""
    return read_json_object(file) if os.path.exists(file) else None


def run_block(owner: nn.Module, block: nn.Module, *args, **kwargs):
    """block(*args, **kwargs) for the block loop of ``owner`` (a model, BERT's encoder); with gradient checkpointing
    on (PretrainedMixin.gradient_checkpointing_enable) and in training, through torch.utils.checkpoint: the block's
    activations are recomputed in the backward instead of kept (the RNG state too: the same dropout masks)."""
    ckpt = owner.gradient_checkpointing
    if ckpt is not None and owner.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, **ckpt, **kwargs)
    return block(*args, **kwargs)


class PretrainedMixin:
    """save_pretrained / from_pretrained (config.json + model.safetensors), parameter counts, the backbone / head
    split and gradient checkpointing. A model lists its head modules' attribute names in ``head_modules``; a module
    with a block loop (run_block) has the class attribute ``gradient_checkpointing = None``."""

    config_class = ModelConfig
    head_modules: Tuple[str, ...] = ()

    def save_pretrained(self, path: str) -> None:
        """config.json and model.safetensors (a tied weight is stored once, under its first name); a quantized
        model (fastattn.quantize) also writes quantization.json and keeps its weights int8."""
        os.makedirs(path, exist_ok=True)
        self.config.save(os.path.join(path, CONFIG_FILE))
        layout, layout_file = int8_layout(self), os.path.join(path, INT8_FILE)
        if layout:
            with open(layout_file, "w") as f:
                json.dump(layout, f, indent=1)
        elif os.path.exists(layout_file):  # a float model saved over a quantized one
            os.remove(layout_file)
        save_weights(self, os.path.join(path, WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, **overrides):
        """Load what save_pretrained wrote (a quantized model comes back int8, its scales float32); ``dtype`` /
        ``device``: the model's (e.g. torch.bfloat16, "cuda"), the weights converted as they load; dtype None: the
        dtype the weights were saved in (a bfloat16 model comes back bfloat16, as transformers' dtype="auto");
        ``overrides`` replace config fields (e.g. backend="torch"). A missing folder, a bad config.json or weights
        file raises CheckpointError naming the file (and the key). The model comes back in eval mode, as
        transformers' from_pretrained returns it (``.train()`` to fine-tune)."""
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such folder (save_pretrained writes {CONFIG_FILE} and {WEIGHTS_FILE})")
        cfg = cls.config_class.load(os.path.join(path, CONFIG_FILE))
        if overrides:
            cfg = cls.config_class.from_dict({**dataclasses.asdict(cfg), **overrides})
        layout, weights = _int8_layout_file(os.path.join(path, INT8_FILE)), os.path.join(path, WEIGHTS_FILE)
        if dtype is None:  # the stored one (int8 layers' float32 scales aside)
            dtype = stored_dtype(weights, layout if isinstance(layout, dict) else ())
        model = place(cls(cfg), dtype, device)
        if layout is not None:
            apply_int8_layout(model, layout)
        load_weights(model, weights)
        return model.eval()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None) -> None:
        """Activation checkpointing of every block in training (transformers' name and argument): less memory, one
        more forward of the blocks in the backward. ``gradient_checkpointing_kwargs`` go to torch.utils.checkpoint
        (default use_reentrant=False)."""
        kw = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kw["use_reentrant"]:
            raise ValueError("gradient_checkpointing_kwargs: use_reentrant=True cannot pass the blocks' keyword "
                             "arguments (masks, positions); use the default, use_reentrant=False")
        for m in self._block_loops():
            m.gradient_checkpointing = kw

    def gradient_checkpointing_disable(self) -> None:
        for m in self._block_loops():
            m.gradient_checkpointing = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing is not None for m in self._block_loops())

    def _block_loops(self) -> List[nn.Module]:
        return [m for m in self.modules() if hasattr(type(m), "gradient_checkpointing")]

    def backbone_parameters(self) -> List[nn.Parameter]:
        """Parameters outside the task heads (``head_modules``): freeze these to fine-tune the heads only."""
        seen, out = set(), []
        for name, child in self.named_children():
            if name not in self.head_modules:
                for p in child.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def head_parameters(self) -> List[nn.Parameter]:
        """Parameters of the task heads that the backbone does not share (a tied LM head's weight is the backbone's
        embedding: not listed here)."""
        seen = {id(p) for p in self.backbone_parameters()}
        out = []
        for name in self.head_modules:
            for p in getattr(self, name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out
