"""Several sequences packed into one row (padding-free training: transformers' DataCollatorWithFlattening, TRL's
packing): ``position_ids`` restart at each sequence's first token and each sequence attends only within itself, as
in transformers (a new sequence starts wherever a position is not the one before it plus one)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.attention.varlen import cu_seqlens_of_starts


class Packing(NamedTuple):
    seq_ids: Tensor  # (B, L) int64: each token's sequence, numbered over the whole batch (unique across rows)
    cu_seqlens: Optional[Tensor]  # (N + 1,) int32 offsets of the N sequences over the B * L tokens; None when tracing
    max_len: int  # the longest sequence (0 when tracing)

    def same_sequence(self, keys: Optional["Packing"] = None) -> Tensor:
        """(B, 1, L, S) bool: query i and key j are tokens of one sequence (the mask the dense path takes); keys: the
        keys' packing when they are another's (cross-attention: sequence n of the keys is sequence n here)."""
        k = self.seq_ids if keys is None else keys.seq_ids
        return (self.seq_ids[:, :, None] == k[:, None, :])[:, None]


def _readable(t: Tensor) -> bool:
    """Whether t's values can be read here: not while torch.compile traces, not on the meta device (shapes only)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def check_position_ids(position_ids: Tensor, input_ids: Tensor, max_len: int) -> Tensor:
    """position_ids (B, L) or (1, L) integers in [0, max_len) as (B, L); errors name the argument."""
    if not isinstance(position_ids, Tensor) or position_ids.is_floating_point() or position_ids.dim() != 2 or \
            position_ids.shape[1] != input_ids.shape[1] or position_ids.shape[0] not in (1, input_ids.shape[0]):
        what = getattr(position_ids, "dtype", type(position_ids).__name__)
        shape = tuple(getattr(position_ids, "shape", ()))
        raise ValueError(f"position_ids: expected an integer tensor {tuple(input_ids.shape)} (or (1, "
                         f"{input_ids.shape[1]})) like input_ids, got {what} {shape}")
    position_ids = position_ids.to(input_ids.device).expand(input_ids.shape)
    if _readable(position_ids) and position_ids.numel() and \
            (int(position_ids.min()) < 0 or int(position_ids.max()) >= max_len):
        raise ValueError(f"position_ids: expected values in [0, max_seq_len={max_len}), got "
                         f"[{int(position_ids.min())}, {int(position_ids.max())}]")
    return position_ids


def packing_of(position_ids: Tensor, always: bool = False) -> Optional[Packing]:
    """The packing that (B, L) position_ids describe, or None when each row is one sequence (unless ``always``).
    Under torch.compile (whose graphs cannot depend on the values) and on the meta device a Packing is always made,
    without offsets: the layers then take the dense path with a block-diagonal mask."""
    B, L = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seq_ids = starts.reshape(-1).cumsum(0).view(B, L) - 1
    if not _readable(position_ids):
        return Packing(seq_ids, None, 0)
    if not always and not bool(starts[:, 1:].any()):
        return None
    return Packing(seq_ids, *cu_seqlens_of_starts(starts))
