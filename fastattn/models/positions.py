"""Positions: learned and sinusoidal tables, rotary tables (with linear / Llama 3 / YaRN / LongRoPE scaling)
and their application, ALiBi slopes."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import ModelConfig


def sinusoidal_table(n: int, dim: int) -> Tensor:
    """(n, dim): sin on the even channels, cos on the odd ones (Vaswani et al.)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


# each rope type's keys: required (numbers > 0; longrope's factor lists, one per rotary frequency) and optional
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "yarn": ("factor", "original_max_position_embeddings"),
                     "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor")}
ROPE_SCALING_OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
                         "longrope": ("attention_factor", "refill_cache")}  # (refill_cache: fastattn's, GPT.generate)


def check_rope_scaling(scaling: Optional[Dict[str, Any]], owner: str) -> None:
    """ValueError naming the field unless scaling is None or a supported rope scaling with positive numbers."""
    if scaling is None:
        return
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{owner}.rope_scaling: rope_type {kind!r} is not one of {sorted(ROPE_SCALING_KEYS)}")

    def positive(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0
    for key in ROPE_SCALING_KEYS[kind] + ROPE_SCALING_OPTIONAL.get(kind, ()):
        v, required = scaling.get(key), key in ROPE_SCALING_KEYS[kind]
        if key in ("short_factor", "long_factor"):
            ok = isinstance(v, list) and len(v) > 0 and all(positive(x) for x in v)
        elif key in ("truncate", "refill_cache"):
            ok = v is None or isinstance(v, bool)
        else:
            ok = positive(v) or (v is None and not required) or (key in ("mscale", "mscale_all_dim") and v == 0)
        if not ok:
            want = "a list of numbers > 0" if key in ("short_factor", "long_factor") else \
                "true or false" if key in ("truncate", "refill_cache") else "a number > 0"
            raise ValueError(f"{owner}.rope_scaling: {key} must be {want} for {kind}, got {v!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{owner}.rope_scaling: high_freq_factor must exceed low_freq_factor")


def scale_frequencies(inv: Tensor, scaling: Dict[str, Any], theta: float, long: bool = False) -> Tuple[Tensor, float]:
    """Rotary inverse frequencies under a rope scaling, and the factor cos / sin are multiplied by (transformers'
    attention_scaling). linear: all divided by factor. llama3: wavelengths longer than original_max /
    low_freq_factor divided by factor, shorter than original_max / high_freq_factor kept, a linear blend (in
    original_max / wavelength) between. yarn: a ramp between the interpolated (divided by factor) and the original
    frequencies over the dimensions whose rotations in original_max positions fall between beta_slow and beta_fast;
    its cos / sin scaled by 0.1 ln(factor) + 1 (or mscale's ratio). longrope: each frequency divided by its
    short_factor (``long``: long_factor) entry; cos / sin scaled by sqrt(1 + ln(factor) / ln(original_max))."""
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    orig = float(scaling.get("original_max_position_embeddings") or 0)
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        ratio = orig / (2 * math.pi / inv)  # original_max / wavelength
        smooth = ((ratio - lo) / (hi - lo)).clamp(0, 1)
        return (1 - smooth) * inv / factor + smooth * inv, 1.0
    attention = scaling.get("attention_factor")
    if kind == "longrope":
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return inv / ext, float(attention)

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    dim = 2 * inv.numel()

    def correction(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction(scaling.get("beta_fast") or 32), correction(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low))
    keep = 1 - ramp.clamp(0, 1)  # 1: the original frequency (extrapolated), 0: interpolated
    return inv / factor * (1 - keep) + inv * keep, float(attention)


def rotary_tables(n: int, head_dim: int, theta: float, scaling: Optional[Dict[str, Any]] = None,
                  long: bool = False) -> Tuple[Tensor, Tensor]:
    """cos, sin (n, head_dim) in HF Llama's layout: the frequencies repeated over the two halves (times a rope
    scaling's attention factor; ``long``: longrope's long factors)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scale = 1.0
    if scaling is not None:
        inv, scale = scale_frequencies(inv, scaling, theta, long)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (n, head_dim / 2)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, L, H, D); cos, sin (B, L, 1, R): the first R <= D channels of each head rotated, the rest kept."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], -1)
    return x * cos + rotate_half(x) * sin


class Positions(nn.Module):
    """Position information for a (B, L) tensor of positions: an embedding added to the tokens (learned,
    sinusoidal), or the rotary (cos, sin) the attention layers apply to q and k."""

    def __init__(self, cfg: ModelConfig, offset: int = 0, dim: Optional[int] = None):
        super().__init__()
        self.kind, self.offset, self.local, self.long_from = cfg.pos, offset, False, None
        dim = dim or cfg.d_model  # (the embeddings' width: BERT's embed_dim)
        if cfg.pos == "learned":
            self.weight = nn.Parameter(torch.empty(cfg.max_seq_len + offset, dim).normal_(std=0.02))
        elif cfg.pos == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(cfg.max_seq_len, dim), persistent=False)
        elif cfg.pos == "rotary":
            rot = cfg.rotary_dim or cfg.head_dim
            cos, sin = rotary_tables(cfg.max_seq_len, rot, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
            if (cfg.rope_scaling or {}).get("rope_type") == "longrope":  # its long factors' tables too
                self.long_from = int(cfg.rope_scaling["original_max_position_embeddings"])
                cos, sin = rotary_tables(cfg.max_seq_len, rot, cfg.rope_theta, cfg.rope_scaling, long=True)
                self.register_buffer("cos_long", cos, persistent=False)
                self.register_buffer("sin_long", sin, persistent=False)
            self.local = cfg.rope_local_theta is not None  # Gemma 3: the windowed layers' own tables
            if self.local:
                cos, sin = rotary_tables(cfg.max_seq_len, rot, cfg.rope_local_theta)
                self.register_buffer("cos_local", cos, persistent=False)
                self.register_buffer("sin_local", sin, persistent=False)

    def embed(self, positions: Tensor) -> Optional[Tensor]:
        """(B, L, d_model) to add to the token embeddings, or None."""
        if self.kind == "learned":
            return F.embedding(positions + self.offset, self.weight)
        if self.kind == "sinusoidal":
            return F.embedding(positions, self.table)
        return None

    def rotary(self, positions: Tensor, dtype: torch.dtype):
        """cos, sin (B, L, 1, D) at positions, or None; with local tables {False: global, True: local}, each
        attention layer taking its own (``pick_rotary``). longrope: the long factors' tables for every position of
        a call whose positions reach original_max, else the short ones, as transformers chooses (per call)."""
        if self.kind != "rotary":
            return None
        out = (F.embedding(positions, self.cos).to(dtype).unsqueeze(2),  # (B, L, 1, D)
               F.embedding(positions, self.sin).to(dtype).unsqueeze(2))
        if self.long_from is not None:  # (a device-side choice: no host sync)
            long = positions.max() >= self.long_from
            out = tuple(torch.where(long, F.embedding(positions, t).to(dtype).unsqueeze(2), o)
                        for t, o in zip((self.cos_long, self.sin_long), out))
        if not self.local:
            return out
        return {False: out, True: (F.embedding(positions, self.cos_local).to(dtype).unsqueeze(2),
                                   F.embedding(positions, self.sin_local).to(dtype).unsqueeze(2))}


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's): a geometric sequence from 2^(-8/n) for n a power of two, else
    those of the power of two below it and every other one of the next power's."""
    def powers(n):
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / n) for i in range(n)])
    p = 2 ** math.floor(math.log2(n_head))
    return powers(p) if p == n_head else torch.cat([powers(p), powers(2 * p)[0::2][:n_head - p]])


def pick_rotary(rotary, window: int):
    """A layer's (cos, sin): the local tables for a windowed layer when the model has them (Gemma 3)."""
    return rotary[window > 0] if isinstance(rotary, dict) else rotary
