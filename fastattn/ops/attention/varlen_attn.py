"""``fastattn.varlen_attn``: torch's ``torch.nn.attention.varlen.varlen_attn`` signature and meaning (torch's own runs
Flash Attention on CUDA only) on fastattn.attention_varlen's kernels: Triton on GPUs, C++ on CPUs."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...errors import ArgumentError
from .varlen import attention_varlen, cu_seqlens_of_lengths


def varlen_attn(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Optional[Tensor], max_q: int,
                max_k: int, *, return_aux=None, scale: Optional[float] = None,
                window_size: Tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                num_splits: Optional[int] = None):
    """torch.nn.attention.varlen.varlen_attn on fastattn's kernels (same arguments, outputs and errors).

    query (Tq, Hq, D), key / value (Tk, Hkv, D) packed by cu_seq_q / cu_seq_k (N + 1,), or (pages, page_size, Hkv, D)
    page pools with ``block_table`` (N, max_pages) and ``seqused_k`` (N,). window_size (left, right) is aligned
    bottom-right per sequence, (-1, 0) being causal; enable_gqa lets Hkv divide Hq. ``return_aux`` with ``.lse``:
    returns (out, lse (Hq, Tq)) as torch does. ``seqused_k`` (only the first seqused_k[i] keys of sequence i) and
    ``block_table`` are inference-only, as in torch; here their keys are gathered into a packed copy first.
    ``num_splits`` is accepted: each sequence is computed on its own, so outputs are batch-invariant anyway.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    Hq = query.size(1)
    Hk = key.size(2) if block_table is not None else key.size(1)
    if not enable_gqa and Hq != Hk:  # torch's messages
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={Hq} and "
                         f"Hkv={Hk}. Try setting enable_gqa=True for GQA.")
    if enable_gqa and Hq % Hk != 0:
        raise ValueError(f"Expect number of query heads to be a multiple of kv heads for GQA but got Hq={Hq} and "
                         f"Hkv={Hk}.")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or \
            any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window_size):
        raise ArgumentError(f"window_size: expected (left, right) ints, got {window_size!r}")
    if seqused_k is not None or block_table is not None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise RuntimeError("varlen_attn: seqused_k and block_table are inference-only (no backward), as in torch")
        key, value, cu_seq_k, max_k = _used_keys(key, value, cu_seq_k, seqused_k, block_table, cu_seq_q.numel() - 1)
    elif cu_seq_k is None:
        raise ArgumentError("cu_seq_k: required without block_table")
    want_lse = return_aux is not None and getattr(return_aux, "lse", False)
    out = attention_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                           window=(int(window_size[0]), int(window_size[1])), return_lse=want_lse)
    if want_lse:
        out, lse = out
        return out, lse.transpose(0, 1)  # torch's (Hq, Tq)
    return out


def _used_keys(key: Tensor, value: Tensor, cu_k: Optional[Tensor], used: Optional[Tensor],
               table: Optional[Tensor], n: int) -> Tuple[Tensor, Tensor, Tensor, int]:
    """The keys and values each sequence uses, packed: the first used[i] of its range (cu_k) or of its pages
    (table, a pool of (pages, page_size, Hkv, D)); their offsets and the longest."""
    if table is not None and used is None:
        raise ArgumentError("block_table: needs seqused_k (how many tokens of its pages each sequence uses)")
    if not isinstance(used, Tensor) or used.dim() != 1 or used.numel() != n or used.is_floating_point() or \
            used.dtype == torch.bool:
        raise ArgumentError(f"seqused_k: expected an integer tensor ({n},), got "
                            f"{getattr(used, 'dtype', type(used).__name__)} {tuple(getattr(used, 'shape', ()))}")
    lens = used.tolist()
    if table is not None:
        page = key.shape[1]
        if value.shape[:2] != key.shape[:2]:
            raise ArgumentError(f"value: a pool of {tuple(value.shape[:2])} (pages, page_size), key's is "
                                f"{tuple(key.shape[:2])}")
        if table.dim() != 2 or table.shape[0] != n or table.is_floating_point() or table.dtype == torch.bool:
            raise ArgumentError(f"block_table: expected an integer tensor ({n}, max_pages), got "
                                f"{table.dtype} {tuple(table.shape)}")
        if any(u < 0 or u > table.shape[1] * page for u in lens):
            raise ArgumentError(f"seqused_k: each in [0, max_pages * page_size = {table.shape[1] * page}], "
                                f"got {lens}")
        pages = [table[i, :math.ceil(u / page)] for i, u in enumerate(lens)]
        bad = [int(p) for p in torch.cat(pages).tolist() if not 0 <= p < key.shape[0]] if pages else []
        if bad:  # (a negative index would wrap around to another page)
            raise ArgumentError(f"block_table: page indices must be in [0, {key.shape[0]}) (the pool's pages), got "
                                f"{bad[:4]}")
        idx = torch.cat([(p.long()[:, None] * page + torch.arange(page, device=p.device)).reshape(-1)[:u]
                         for p, u in zip(pages, lens)] or [torch.zeros(0, dtype=torch.long, device=key.device)])
        flat_k, flat_v = key.reshape(-1, *key.shape[2:]), value.reshape(-1, *value.shape[2:])
    else:
        if not isinstance(cu_k, Tensor):
            raise ArgumentError("cu_seq_k: required with seqused_k (without block_table)")
        off = cu_k.tolist()
        if len(off) != n + 1 or any(u < 0 or u > b - a for u, a, b in zip(lens, off, off[1:])):
            raise ArgumentError(f"seqused_k: each in [0, its sequence's keys], got {lens} for offsets {off}")
        idx = torch.cat([torch.arange(a, a + u) for a, u in zip(off, lens)] or [torch.zeros(0, dtype=torch.long)])
        flat_k, flat_v = key, value
    idx = idx.to(key.device)
    return flat_k[idx], flat_v[idx], cu_seqlens_of_lengths(lens, key.device), max(lens, default=0)
