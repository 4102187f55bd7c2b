"""Variable-length sequences in the drop-in modules' inference paths, on fastattn.attention_varlen: torch's
NestedTensor inputs (which torch's MultiheadAttention and Transformer layers take on their inference fast path only)
and the encoder's padded batches that torch turns into NestedTensors. Sequences run as packed rows (T, E), each
attending only within itself; nothing is padded."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import attention_varlen
from ..ops.attention.varlen import cu_seqlens_of_lengths
from ..ops.batching import autocast_on
from .activation import linear_rows


class Rows:
    """Packed sequences: rows (T, E), their lengths, cumulative offsets (int32) and the longest."""

    def __init__(self, rows: Tensor, lens: List[int]):
        self.rows, self.lens = rows, lens
        self.cu = cu_seqlens_of_lengths(lens, rows.device)
        self.max_len = max(lens, default=0)

    @classmethod
    def of_nested(cls, x: Tensor) -> "Rows":
        parts = x.unbind()
        return cls(torch.cat(parts) if parts else x.values().new_empty(0, x.size(-1)), [p.shape[0] for p in parts])

    def nested(self, rows: Tensor) -> Tensor:
        """rows (T, E) as a NestedTensor of these sequences (strided layout, as torch's fast path returns)."""
        return torch.nested.nested_tensor(list(rows.split(self.lens)))


def self_attention_rows(mha: nn.MultiheadAttention, x: Tensor, packed: Rows, weights: Optional[bool] = None):
    """mha's self-attention (inference: no dropout) of each packed sequence of x (T, E): its projections and
    attention_varlen on their heads. Returns (T, E) rows; with ``weights`` (True: averaged over the heads, False:
    per head) also the attention weights as torch's fast path gives them for a NestedTensor: (N, [H,] L, L), L the
    longest sequence, zeros outside each sequence's block (from the kernel's logsumexp: no second softmax)."""
    T, E = x.shape
    H = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(T, 3, H, E // H)
    out = attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], packed.cu, packed.cu, packed.max_len, packed.max_len,
                           validate=False, return_lse=weights is not None)
    rows = linear_rows((out[0] if weights is not None else out).reshape(T, E), mha.out_proj.weight,
                       mha.out_proj.bias)
    if weights is None:
        return rows
    lse, scale = out[1], (E // H) ** -0.5
    w = x.new_zeros(len(packed.lens), H, packed.max_len, packed.max_len)
    for b, (a, n) in enumerate(zip(packed.cu.tolist(), packed.lens)):
        q, k = qkv[a:a + n, 0].transpose(0, 1), qkv[a:a + n, 1].transpose(0, 1)  # (H, n, D)
        w[b, :, :n, :n] = torch.exp((q @ k.transpose(1, 2)).float() * scale - lse[a:a + n].T[:, :, None])
    return rows, (w.mean(1) if weights else w)


def nested_refusal(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                   masks: Tuple[Optional[Tensor], ...], grad_tensors: Tuple[Tensor, ...]) -> Optional[str]:
    """Why a NestedTensor input cannot run (torch's fast-path conditions for one), or None."""
    if query.layout != torch.strided or not (query is key and key is value):
        return ("non-self attention was used (query, key, and value are not the same Tensor)"
                if query.layout == torch.strided else f"a {query.layout} NestedTensor (torch's fast path takes "
                                                      "torch.strided ones)")
    if mha.training:
        return "training is enabled"
    if not mha.batch_first:
        return "batch_first was not True"
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "separate q / k / v projections, bias_k / bias_v or add_zero_attn"
    if any(m is not None for m in masks):
        return "a mask was given with a NestedTensor input"
    if autocast_on(query.device.type):
        return "autocast is enabled"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_tensors):
        return "grad is enabled and an input or parameter requires grad"
    return None


def mha_nested(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
               key_padding_mask: Optional[Tensor], need_weights: bool, attn_mask: Optional[Tensor],
               average_attn_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """MultiheadAttention on a NestedTensor (torch's inference fast path): each sequence attends within itself; the
    output is a NestedTensor, the weights (need_weights) padded as torch's are. Anything torch's fast path would not
    take raises its AssertionError."""
    why = nested_refusal(mha, query, key, value, (key_padding_mask, attn_mask),
                         (query, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias))
    if why is not None:
        raise AssertionError(f"MultiheadAttention does not support NestedTensor outside of its fast path. The fast "
                             f"path was not hit because {why}")
    packed = Rows.of_nested(query)
    if not need_weights:
        return packed.nested(self_attention_rows(mha, packed.rows, packed)), None
    rows, weights = self_attention_rows(mha, packed.rows, packed, weights=average_attn_weights)
    return packed.nested(rows), weights.to(rows.dtype)
