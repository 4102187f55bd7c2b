"""The decode step bound once per generation: ``decode_one`` of GPT and of the Seq2Seq decoder as direct calls into
the kernels that the dispatchers choose when generation starts.

A decode step runs each layer's norms, projections and attention on a few rows. The module path (``decode_one``)
checks every argument of every op on every call and wraps each kernel in (B, 1, d) views; on our 2-core hosts that
host time was as long as the kernels' (benchmarks/results/2026-12-05-cpu-session10). Bound, the checks and backend
choices are made once and the layers work on 2-D (B, d) rows: the same kernels, except that a float32 nn.Linear on
CPU runs fastattn.ops.gemv where the modules run torch's GEMV (tests/test_models_decode_step.py holds the two paths
to each other). ``decode_one`` stays the static-shape step to compile or graph. Bound for W > 1 rows per sequence,
the step is ``decode_many``'s (speculative decoding's check of W - 1 drafts): (B * W, d) rows, the rows of a
sequence causal among themselves over the cache's written slots.

``bind_decode`` returns None (and logs why) for a model it cannot bind: training mode, the "torch" backend, forward
hooks, a block / attention / MLP / norm of another type, a tensor-subclass parameter (DTensor), torch.compile tracing,
or a backend that refuses the dtype. A linear layer of another type (a LoRA wrapper) runs its own forward inside; a
mixture of experts routes in its module, which runs each expert's Linears bound for its rows (``_Experts``).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..backends import BackendNotSupported, forced_backend
from ..nn.quantized import Int8Linear
from ..ops.add_norm import bind_rows
from ..ops.attention import attention
from ..ops.attention.decode import routed_kernel
from ..ops.batching import has_torch_function_subclass
from ..ops.gemv import gemv_kernel
from .layers import MLP, Attention, Block, Norm, pre_norm, softcap, window_padding
from .positions import apply_rotary, pick_rotary
from .moe import MoE

log = logging.getLogger("fastattn")

Rows = Callable[[Tensor], Tensor]


def bind_linear(mod: nn.Module, dtype: torch.dtype, rows: int) -> Rows:
    """(rows, in) contiguous rows -> (rows, out): nn.Linear through fastattn.ops.gemv's kernel where one runs (a
    contiguous float32 weight on CPU), else as the one addmm / mm that F.linear runs on 2-D input; an Int8Linear
    through its bound kernels; any other module through its own forward."""
    if type(mod) is nn.Linear:
        w, b = mod.weight, mod.bias
        fwd = None
        if w.dtype == dtype and w.is_contiguous() and (b is None or (b.dtype == dtype and b.is_contiguous())):
            fwd = gemv_kernel(w.device, dtype, rows)
        if fwd is not None:
            return lambda x: fwd(x, w, b)
        wt = w.t()
        return (lambda x: torch.mm(x, wt)) if b is None else (lambda x: torch.addmm(b, x, wt))
    if type(mod) is Int8Linear:
        return mod.bind_rows(dtype)
    return mod


def bind_norm(norm: Norm, prenorm: bool, dtype: torch.dtype, device: torch.device):
    return bind_rows(norm.weight, norm.bias, norm.eps, norm.kind == "rmsnorm", prenorm, dtype, device)


def bind_head_norm(norm: Norm, dtype: torch.dtype, device: torch.device) -> Callable[[Tensor], Tensor]:
    """A q / k norm on (..., head_dim) (Qwen3's, per head) or (..., heads * head_dim) (OLMo 2's): rows made
    contiguous, normalised, shaped back."""
    rows = bind_norm(norm, False, dtype, device)
    return lambda x: rows(x.reshape(-1, x.shape[-1]).contiguous(), None).view(x.shape)


def bind_input_norm(norm: Optional[Norm], prenorm: bool, dtype: torch.dtype, device: torch.device):
    """A sublayer's input norm, or without one (OLMo 2's blocks: layers.pre_norm) the residual add alone."""
    if norm is not None:
        return bind_norm(norm, prenorm, dtype, device)
    return lambda x, residual: pre_norm(None, x, residual)


def bind_output_norm(norm: Optional[Norm], dtype: torch.dtype, device: torch.device) -> Callable[[Tensor], Tensor]:
    """A sublayer's output norm (Gemma 2's sandwich norms), or the identity when the block has none."""
    if norm is None:
        return lambda x: x
    rows = bind_norm(norm, False, dtype, device)
    return lambda x: rows(x, None)


class _Step(NamedTuple):
    """What every layer of one step shares: the W cache slots, per sliding window (0: none) the cache's keep mask
    (False = padding, not written, or, one row per sequence, out of the window; None when no layer's kernel reads it)
    and padding mask (True = padding), rotary cos / sin (B, W, 1, D) or None, the self-attention scores' bias (B, H,
    W, S) or None (T5), and for W > 1 rows per sequence (or ALiBi) the slots' end: each row then sees the slots up to
    its own (causal, bottom-right), and the masks cover the first ``end`` slots only. ``window``: the slots and end
    in the windowed layers' bounded caches (CacheMixin.make_room), or None; their masks are those of ``pad``."""
    input_pos: Tensor
    keep: Dict[int, Optional[Tensor]]
    pad: Dict[int, Tensor]
    rotary: Optional[Tuple[Tensor, Tensor]]
    bias: Optional[Tensor] = None
    end: Optional[int] = None
    window: Optional[Tuple[Tensor, Optional[int]]] = None


class _SelfAttention:
    def __init__(self, a: Attention, width: int, rows: int, dtype, device, forced: str):
        self.H, self.Hk, self.D, self.cache, self.W = a.n_head, a.n_kv_head, a.head_dim, a.cache, width
        self.qkv, self.out = bind_linear(a.wqkv, dtype, rows), bind_linear(a.wo, dtype, rows)
        self.qk_norm = None if a.q_norm is None else (bind_head_norm(a.q_norm, dtype, device),
                                                      bind_head_norm(a.k_norm, dtype, device))
        self.qk_full, self.qk_after, self.rope = a.qk_full, a.qk_after, a.rope
        S, self.bounded = a.cache.k.shape[2], a.cache.bounded
        self.scale = self.D ** -0.5 if a.scale is None else a.scale
        self.softcap, self.window, self.alibi = a.softcap, a.window, a.alibi
        # W > 1 rows of a windowed layer: each row has its own window, which the flash kernel takes as an argument;
        # so are ALiBi's slopes, which the split-KV kernel does not take
        self.kernel = None if (width > 1 and self.window) or self.alibi is not None else \
            routed_kernel(torch.device(device).type, dtype, self.D, self.D, width, S, forced)

    def __call__(self, x: Tensor, st: _Step) -> Tensor:
        H, Hk, D, W = self.H, self.Hk, self.D, self.W
        B = x.shape[0] // W
        q, k, v = self.qkv(x).view(B, W, H + 2 * Hk, D).split((H, Hk, Hk), 2)  # (B, W, H | Hk, D)
        if self.qk_full:  # one norm over all heads' q, another over all heads' k (OLMo 2)
            q = self.qk_norm[0](q.reshape(B, W, H * D)).view(B, W, H, D)
            k = self.qk_norm[1](k.reshape(B, W, Hk * D)).view(B, W, Hk, D)
        elif self.qk_norm is not None and not self.qk_after:
            q, k = self.qk_norm[0](q), self.qk_norm[1](k)
        if st.rotary is not None and self.rope:
            rotary = pick_rotary(st.rotary, self.window)
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.qk_after:  # (HunYuan)
            q, k = self.qk_norm[0](q), self.qk_norm[1](k)
        input_pos, end = st.window if self.bounded else (st.input_pos, st.end)
        self.cache.k.index_copy_(2, input_pos, k.transpose(1, 2))
        self.cache.v.index_copy_(2, input_pos, v.transpose(1, 2))
        q = q.transpose(1, 2)  # (B, H, W, D)
        K, V = self.cache.k, self.cache.v
        if end is not None:  # the first `end` slots, each row seeing the slots up to its own
            K, V = K[:, :, :end], V[:, :, :end]
        if st.bias is not None:  # the split-KV kernel adds no bias: the flash kernel with it as a float mask
            out = attention(q, K, V, attn_mask=st.bias, key_padding_mask=st.pad[self.window],
                            scale=self.scale, softcap=self.softcap, causal="bottom_right" if W > 1 else None)
        elif self.kernel is not None:
            out = self.kernel(q, K, V, None, st.keep[self.window], self.scale, self.softcap, W > 1)[0]
        elif W > 1:
            out = attention(q, K, V, causal="bottom_right", key_padding_mask=st.pad[self.window], scale=self.scale,
                            softcap=self.softcap, window=(self.window - 1, 0) if self.window else (-1, -1),
                            alibi_slopes=self.alibi)
        else:  # (with ALiBi the cache ends at the token's slot: distances count from it)
            out = attention(q, K, V, causal=None, key_padding_mask=st.pad[self.window], scale=self.scale,
                            softcap=self.softcap, alibi_slopes=self.alibi)
        return self.out(out.transpose(1, 2).reshape(B * W, H * D))


class _CrossAttention:
    def __init__(self, a: Attention, memory: Tuple[Tensor, Tensor], memory_pad: Optional[Tensor], width: int,
                 rows: int, dtype, device, forced: str):
        self.H, self.D, (self.k, self.v), self.pad, self.W = a.n_head, a.head_dim, memory, memory_pad, width
        self.keep = None if memory_pad is None else ~memory_pad
        self.q, self.out = bind_linear(a.wq, dtype, rows), bind_linear(a.wo, dtype, rows)
        self.q_norm = None if a.q_norm is None else bind_head_norm(a.q_norm, dtype, device)
        self.kernel = routed_kernel(torch.device(device).type, dtype, self.D, self.D, width, self.k.shape[2], forced)
        self.scale = self.D ** -0.5 if a.scale is None else a.scale
        self.softcap = a.softcap

    def __call__(self, x: Tensor, st: _Step) -> Tensor:
        H, D, W = self.H, self.D, self.W
        B = x.shape[0] // W
        q = self.q(x).view(B, W, H, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, W, D)
        if self.kernel is not None:
            out = self.kernel(q, self.k, self.v, None, self.keep, self.scale, self.softcap, False)[0]
        else:
            out = attention(q, self.k, self.v, causal=None, key_padding_mask=self.pad, scale=self.scale,
                            softcap=self.softcap)
        return self.out(out.transpose(1, 2).reshape(B * W, H * D))


class _Experts:
    """A mixture of experts in the bound step: MoE.forward with each expert's Linears bound (bind_linear) for the
    number of rows routed to it, bound once per (expert, rows)."""

    def __init__(self, moe: MoE, dtype: torch.dtype):
        self.moe, self.dtype = moe, dtype
        self.bound: Dict[Tuple[int, int], Rows] = {}

    def expert(self, e: int, x: Tensor) -> Tensor:
        fn = self.bound.get((e, x.shape[0]))
        if fn is None:
            m, n = self.moe.experts[e], x.shape[0]
            w_in, w_out = bind_linear(m.w_in, self.dtype, n), bind_linear(m.w_out, self.dtype, n)
            fn = self.bound[(e, n)] = lambda rows: m.run(w_in, w_out, rows)
        return fn(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.moe(x, expert=self.expert)


class _Block:
    """Block.forward for W rows per sequence, eval mode (no dropout)."""

    def __init__(self, b: Block, memory, memory_pad, width: int, rows: int, dtype, device, forced: str):
        self.norm_first = pre = b.norm_first
        self.norm1 = bind_input_norm(b.norm1, pre, dtype, device)
        self.attn = _SelfAttention(b.attn, width, rows, dtype, device, forced)
        self.cross = None
        if memory is not None:
            self.norm_x = bind_norm(b.norm_x, pre, dtype, device)
            self.cross = _CrossAttention(b.cross_attn, memory, memory_pad, width, rows, dtype, device, forced)
        self.parallel = b.parallel
        if self.parallel:  # norm2 (if any) reads the stream itself: a plain norm
            self.norm2 = None if b.norm2 is None else bind_norm(b.norm2, False, dtype, device)
        else:
            self.norm2 = bind_input_norm(b.norm2, pre, dtype, device)
        if type(b.mlp) is MoE:  # the module routes; its experts run bound, per row count (routing decides it)
            self.mlp = _Experts(b.mlp, dtype)
        else:
            w_in, w_out = bind_linear(b.mlp.w_in, dtype, rows), bind_linear(b.mlp.w_out, dtype, rows)
            self.mlp = lambda x: b.mlp.run(w_in, w_out, x)
        self.post1 = bind_output_norm(getattr(b, "post_norm1", None), dtype, device)
        self.post2 = bind_output_norm(getattr(b, "post_norm2", None), dtype, device)

    def __call__(self, h: Tensor, residual: Optional[Tensor], st: _Step):
        if self.parallel:
            x, residual = self.norm1(h, residual)
            return self.attn(x, st) + self.mlp(x if self.norm2 is None else self.norm2(residual, None)), residual
        if self.norm_first:
            x, residual = self.norm1(h, residual)
            h = self.post1(self.attn(x, st))
            if self.cross is not None:
                x, residual = self.norm_x(h, residual)
                h = self.cross(x, st)
            x, residual = self.norm2(h, residual)
            return self.post2(self.mlp(x)), residual
        h = self.norm1(self.attn(h, st), h)
        if self.cross is not None:
            h = self.norm_x(self.cross(h, st), h)
        return self.norm2(self.mlp(h), h), None


class DecodeStep:
    """``step(tokens (B, 1), input_pos (1,)) -> logits (B, V)`` with decode_one's effects on the model's buffers
    (the cache slot written, ``cache_padding`` cleared there, ``next_pos`` advanced); bound for ``width`` W > 1:
    ``step(tokens (B, W), input_pos (W,), valid=None) -> logits (B, W, V)`` with CacheMixin.decode_many's."""

    def __init__(self, model: nn.Module, blocks, embed, final_norm: Optional[Norm], head: nn.Module, memory,
                 memory_pad, width: int = 1):
        ref = model.tok_emb.weight
        dtype, device, forced = ref.dtype, ref.device, forced_backend() or ""
        rows = model.cache_padding.shape[0] * width  # W rows per sequence
        self.model, self.embed, self.width = model, embed, width
        self.blocks = [_Block(b, None if memory is None else memory[i], memory_pad, width, rows, dtype, device,
                              forced) for i, b in enumerate(blocks)]
        self.final = None if final_norm is None else bind_norm(final_norm, False, dtype, device)
        self.head = bind_linear(head, dtype, rows)
        self.needs_keep = any(b.attn.kernel is not None for b in self.blocks)
        self.rel = getattr(model, "dec_rel", None)  # T5's relative-position bias, shared by the decoder's layers
        self.windows = sorted({b.attn.window for b in self.blocks} - {0})
        self.alibi = any(b.attn.alibi is not None for b in self.blocks)

    def __call__(self, tokens: Tensor, input_pos: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        m, W = self.model, self.width
        if W == 1:
            m.cache_padding.index_fill_(1, input_pos, False)
            positions = m.step_positions()
        else:
            valid, positions = m.claim_slots(tokens, input_pos, valid)
        x, rotary = self.embed(tokens, positions)  # (B, W, d); cos, sin (B, W, 1, D) or None
        B = x.shape[0]
        end = int(input_pos[-1]) + 1 if W > 1 or self.alibi else None
        pad, window = {0: m.cache_padding[:, :end]}, None
        if m.window_slots:  # the windowed layers' bounded caches: their slots, end and part of the padding
            last = int(input_pos[-1])
            m.make_room(last - W + 1, last)
            kw = m.window_args(input_pos, m.cache_padding, end, True)
            window = kw["input_pos"], kw["cache_end"]
        for w in self.windows:  # (W > 1: windowed layers take the window as the flash kernel's argument)
            p = pad[0] if window is None else kw["key_padding_mask"]
            # one row: each sliding window's layers also leave out the slots w or more behind the token
            pad[w] = p | window_padding(p.shape[1], input_pos if window is None else window[0], w) if W == 1 else p
        keep = {0: ~pad[0] if self.needs_keep else None}
        keep.update({w: keep[0] if p is pad[0] else ~p if self.needs_keep else None for w, p in pad.items() if w})
        # T5's relative positions: slot = position (speculative batches of one: no holes)
        bias = None if self.rel is None else self.rel(positions, m.cache_index[:end])
        st = _Step(input_pos, keep, pad, rotary, bias, end, window)
        h, residual = x.view(B * W, x.shape[-1]), None
        for block in self.blocks:
            h, residual = block(h, residual, st)
        if self.final is not None:
            h = self.final(h, residual)
        logits = softcap(self.head(h), m.config.final_softcap)
        if W == 1:
            m.next_pos += 1
            return logits
        m.next_pos += valid.sum(-1, keepdim=True)
        return logits.view(B, W, -1)


def _why_not(model: nn.Module, blocks) -> Optional[str]:
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (it traces decode_one)"
    if model.training:
        return "training mode"
    if model.config.backend != "fastattn":
        return f"backend {model.config.backend!r}"
    hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    if any(hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "a forward hook would not run"
    for b in blocks:
        parts = [(b, Block), (b.attn, Attention), (b.mlp, MoE if type(b.mlp) is MoE else MLP)]
        parts += [(n, Norm) for n in (b.norm1, b.norm2) if n is not None]
        if hasattr(b, "cross_attn"):
            parts += [(b.cross_attn, Attention), (b.norm_x, Norm)]
        parts += [(n, Norm) for a in (b.attn, getattr(b, "cross_attn", None)) if a is not None
                  for n in (getattr(a, "q_norm", None), getattr(a, "k_norm", None)) if n is not None]
        parts += [(n, Norm) for n in (getattr(b, "post_norm1", None), getattr(b, "post_norm2", None)) if n is not None]
        for mod, cls in parts:
            if type(mod) is not cls:
                return f"{type(mod).__name__} in place of {cls.__name__}"
    if any(has_torch_function_subclass(t) for t in (*model.parameters(), *model.buffers())):
        return "a parameter or buffer is a tensor subclass"
    return None


def bind_decode(model: nn.Module, blocks, embed, final_norm: Optional[Norm], head: nn.Module,
                memory: Optional[List[Tuple[Tensor, Tensor]]] = None,
                memory_pad: Optional[Tensor] = None, width: int = 1) -> Optional[DecodeStep]:
    """The bound step of ``model`` (caches set up, prompt prefilled) for ``width`` rows per sequence, or None when
    the modules must run it. ``embed(tokens (B, W), positions (B, W)) -> (x (B, W, d), rotary or None)``;
    ``memory``: each block's cross-attention K/V (Seq2Seq), with ``memory_pad`` (B, S) True = padding."""
    reason = _why_not(model, blocks)
    if reason is None:
        try:
            return DecodeStep(model, blocks, embed, final_norm, head, memory, memory_pad, width)
        except (BackendNotSupported, TypeError, ValueError) as e:
            reason = str(e)
    log.debug("fastattn.models: the decode step runs through the modules (not bound: %s)", reason)
    return None
