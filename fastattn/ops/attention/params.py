"""What one attention call asks of a backend: its scalar parameters (AttnParams) and the hashable description that
dispatch decides on (AttnRequest).

AttnParams cross every boundary (the C++ bindings, the custom ops, the autograd.Function's saved state) as the flat
tuple ``p.flat()`` and come back as ``AttnParams(*flat)``; the field order below is the order everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class AttnParams:
    scale: float
    causal: bool = False
    diag_offset: int = 0  # query i's diagonal is key i + diag_offset (0 top-left, S - L bottom-right)
    window_left: int = -1  # keys j >= i + diag_offset - window_left take part (-1: no limit)
    window_right: int = -1  # keys j <= i + diag_offset + window_right take part (-1: no limit)
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0

    def flat(self) -> tuple:
        """The fields in order, as dataclasses.astuple gives them (without its deep copies: ~4 us a call). Spelled
        out: torch 2.11's dynamo cannot trace a frozen dataclass's ``__dict__`` (every compiled model broke)."""
        return (self.scale, self.causal, self.diag_offset, self.window_left, self.window_right, self.softcap,
                self.dropout_p, self.seed, self.offset)

    @property
    def causal_align(self) -> Optional[str]:
        """The causal alignment as the reference spells it (diag_offset is 0 or S - L, and S - L when not causal)."""
        if not self.causal:
            return None
        return "top_left" if self.diag_offset == 0 else "bottom_right"


_SCHEMA_TYPES = {"float": "float", "bool": "bool", "int": "SymInt"}  # what torch.library infers for each


def params_schema() -> str:
    """AttnParams' fields as custom-op schema arguments, in field order: 'float scale, bool causal, ...'."""
    return ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in dataclasses.fields(AttnParams))


class AttnRequest(NamedTuple):
    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    mask: Optional[str]  # None, "bool" or "float"
    mask_grad: bool  # attn_mask or alibi_slopes requires grad, grad enabled (only the reference differentiates them)
    gqa: bool
    causal: bool
    window: bool
    alibi: bool
    softcap: bool
    dropout: bool
    small: bool = False  # a CUDA call of at most SMALL_FLOP forward FLOPs (dispatch.py's GPU order)
    big_batch: bool = False  # a CUDA call with batch past GRID_YZ (grid axis z: CUDA C++ declines, Triton chunks it)
    big_heads: bool = False  # a CUDA call with heads past GRID_YZ (grid axis y of both GPU kernels)


GRID_YZ = 65535  # a CUDA grid's most blocks along y and z: the GPU attention kernels put heads and batch there


def bias_grad(mask: Optional[Tensor], alibi: Optional[Tensor]) -> bool:
    """A mask or ALiBi slopes that require grad, grad enabled: only the reference differentiates them."""
    return torch.is_grad_enabled() and ((mask is not None and mask.requires_grad) or
                                        (alibi is not None and alibi.requires_grad))


def grid_reasons(big_heads: bool) -> list:
    """Why the GPU kernels refuse a call (heads past GRID_YZ: grid axis y), for the backends' checks."""
    return [f"heads > {GRID_YZ} (the GPU kernels' grid axis y)"] if big_heads else []


# Forward FLOPs (4 * B * H * L * S * E) up to which a CUDA call counts as small: the CUDA C++ kernel, slower than
# Triton's on the GPU (0.7x in run 4) but launched by one pybind call rather than Triton's launch path (run 4:
# ~190 us of host time a fastattn.attention call), goes first there. At 2**33 (e.g. 8 x 16 heads x 512 x 512 x 64)
# the CUDA C++ forward takes ~33 us on an H100 against Triton's ~23 (run 4's rates), the backward ~115 against ~75:
# less than the host time saved (an estimate: the next GPU run's host_overhead.py and bench_modules' MHA rows check it).
SMALL_FLOP = 1 << 33


def request(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], alibi: Optional[Tensor],
            p: AttnParams) -> AttnRequest:
    device = q.device.type
    return AttnRequest(device, q.dtype, q.shape[-1], v.shape[-1],
                       None if mask is None else "bool" if mask.dtype == torch.bool else "float",
                       bias_grad(mask, alibi), k.shape[1] != q.shape[1], p.causal,
                       (p.window_left, p.window_right) != (-1, -1), alibi is not None, p.softcap > 0,
                       p.dropout_p > 0, device == "cuda" and 4 * q.numel() * k.shape[-2] <= SMALL_FLOP,
                       device == "cuda" and q.shape[0] > GRID_YZ, device == "cuda" and q.shape[1] > GRID_YZ)
