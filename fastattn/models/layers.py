"""Pieces the model files share: the config base, norms that carry the residual stream, positions, attention with a
static KV cache, the MLP, one Transformer block, sampling, and saving / loading.

Every module takes ``backend``: "fastattn" runs fastattn's fused ops (``fastattn.attention``, ``add_layer_norm`` /
``add_rms_norm`` with ``prenorm=True``), "torch" the same math from stock torch ops (F.scaled_dot_product_attention,
F.layer_norm / F.rms_norm, x + r), with the same parameters and state_dict keys, for A/B runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
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
from .checkpoint import load_weights, place, save_weights
from .packing import Packing

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "geglu")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "relu2")  # relu2: relu(x) ** 2 (Nemotron, Arcee)
POSITIONS = ("learned", "sinusoidal", "rotary", "alibi", "none")
PARALLEL_BLOCKS = ("two_norms", "one_norm")
BACKENDS = ("fastattn", "torch")


# ---- config ---------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Fields every model shares. ``n_kv_head`` None = n_head (multi-head); 1 = multi-query; between: grouped-query.
    ``head_dim`` None = d_model / n_head (Qwen3-style checkpoints set their own). ``d_ff`` None = 4 * d_model.
    ``mlp``: "gelu" (two Linears with ``activation`` between), "swiglu" (down(silu(gate(x)) * up(x))) or "geglu"
    (Gemma's: down(activation(gate(x)) * up(x)), activation "gelu_tanh" or "gelu"). ``norm_first``: pre-norm (True)
    or post-norm (False). ``rope_scaling``: None, {"rope_type": "linear", "factor": f} or Llama 3's {"rope_type":
    "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, YaRN's
    {"rope_type": "yarn", "factor", "original_max_position_embeddings", optional "attention_factor", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "truncate"} or LongRoPE's {"rope_type": "longrope", "factor",
    "original_max_position_embeddings", "short_factor", "long_factor" (one per rotary frequency), optional
    "attention_factor"} (transformers' meanings; scale_frequencies). ``pos="alibi"`` (GPT): no position embedding;
    each head's scores get -slope * distance (ALiBi), with BLOOM's slopes or ``alibi_slopes`` (one per head; Falcon-
    RW's are BLOOM's scaled by 1 / sqrt(head_dim)). ``sliding_window`` W (GPT): a token attends to itself and the W
    - 1 before it (Mistral's window), in training, prefill and decoding (BERT: and the W - 1 after it, ModernBERT's
    local attention); on every layer, or on those ``layer_types`` (one "sliding_attention" / "full_attention" per
    layer, HF's names) marks (Gemma 2's alternation); ``rope_local_theta`` gives those windowed layers rotary
    positions of their own base, unscaled (Gemma 3); ``nope_layers`` lists the layers without rotary positions
    (SmolLM3, Cohere 2). Gemma: ``embed_scale`` multiplies the token embeddings; ``attn_scale`` (None = head_dim **
    -0.5) scales the scores; ``attn_softcap`` / ``final_softcap`` (0: off) cap the scores / the logits as c * tanh(x
    / c); ``sandwich_norm`` adds a norm on each sublayer's output before the residual add (pre-norm GPT only);
    ``input_norm`` False (with sandwich_norm: OLMo 2) drops the norms on the sublayers' inputs, leaving only those
    on their outputs; ``first_input_norm`` False (ModernBERT, whose embeddings end in a norm): the first block's
    attention reads its input unnormalised. ``bias``: every Linear's bias; ``qkv_bias`` None = bias, else the query
    / key / value projections' own (Qwen2: True with bias False); ``norm_bias`` None = bias, else the LayerNorms'
    own (Falcon, StableLM: True with bias False). ``qk_norm``: queries and keys normalised per head (the model's
    ``norm`` over head_dim) before the rotary positions (Qwen3), or over all heads' q and all heads' k at once when
    ``qk_norm_full`` (OLMo 2, OLMoE), or per head after the rotary positions when ``qk_norm_after_rope`` (HunYuan).
    ``rotary_dim`` None = head_dim: rotary positions on that many leading channels of each head (GPT-NeoX's
    rotary_pct, Phi's partial_rotary_factor). ``parallel_block`` (pre-norm GPT): attention and MLP read the same
    residual stream and their outputs are added to it together, "two_norms" (GPT-NeoX / Pythia: each sublayer its
    own norm) or "one_norm" (Phi: both read norm1). ``lm_head_bias``: a bias on the vocabulary projection (Phi's;
    BART's final_logits_bias; not BERT, whose MLM head has its own). ``n_experts`` > 0: every MLP is a mixture of
    that many experts (each an MLP of d_ff units), ``n_experts_per_tok`` of them per token, their router weights
    renormalised over the chosen ones when ``moe_norm_topk`` (Mixtral, Qwen3-MoE: models/moe.py), plus a shared
    expert of ``moe_shared_d_ff`` units that every token runs, gated by a sigmoid (Qwen2-MoE); a GPT's
    ``router_aux_loss_coef`` > 0 adds that much of the load-balancing loss to a loss computed from labels in
    training (transformers' Mixtral with output_router_logits; in eval mode the loss stays the task's, so perplexity
    means perplexity)."""
    vocab_size: int = 50257
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    max_seq_len: int = 1024
    dropout: float = 0.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_first: bool = True
    mlp: str = "gelu"
    activation: str = "gelu"
    pos: str = "learned"
    pos_offset: int = 0  # learned positions start at this row of their table (OPT's and BART's 2)
    rotary_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_local_theta: Optional[float] = None
    alibi_slopes: Optional[List[float]] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[List[str]] = None
    nope_layers: Optional[List[int]] = None
    embed_scale: float = 1.0
    attn_scale: Optional[float] = None
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sandwich_norm: bool = False
    input_norm: bool = True
    first_input_norm: bool = True
    tie_embeddings: bool = True
    bias: bool = True
    qkv_bias: Optional[bool] = None
    norm_bias: Optional[bool] = None
    qk_norm: bool = False
    qk_norm_full: bool = False
    qk_norm_after_rope: bool = False
    parallel_block: Optional[str] = None
    lm_head_bias: bool = False
    n_experts: int = 0  # > 0: each MLP a mixture of this many experts (models/moe.py)
    n_experts_per_tok: int = 2
    moe_norm_topk: bool = True
    moe_shared_d_ff: int = 0  # > 0: a shared expert of this width beside the routed ones (Qwen2-MoE)
    router_aux_loss_coef: float = 0.0  # GPT with n_experts: the load-balancing loss's weight in .loss (training)
    backend: str = "fastattn"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("activation", ACTIVATIONS), ("pos", POSITIONS),
                              ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{type(self).__name__}.{name}: {getattr(self, name)!r} is not one of {allowed}")
        self.check_ints(("vocab_size", "d_model", "n_head", "n_kv_head", "d_ff", "max_seq_len"), 1)
        self.check_ints(("n_layer", "pos_offset"), 0)
        if self.pos_offset and self.pos != "learned":
            raise ValueError(f"{type(self).__name__}.pos_offset: needs pos 'learned', got {self.pos!r}")
        if self.head_dim is None:  # resolved here, once d_model and n_head are known to be valid
            if self.d_model % self.n_head:
                raise ValueError(f"{type(self).__name__}.n_head: {self.n_head} heads do not divide "
                                 f"d_model={self.d_model} (or set head_dim)")
            self.head_dim = self.d_model // self.n_head
        self.check_ints(("head_dim",), 1)
        for name in ("bias", "qk_norm", "qk_norm_full", "qk_norm_after_rope", "sandwich_norm", "input_norm",
                     "first_input_norm") + tuple(
                n for n in ("qkv_bias", "norm_bias") if getattr(self, n) is not None):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{type(self).__name__}.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{type(self).__name__}.n_kv_head: {self.n_kv_head} key/value heads do not divide "
                             f"n_head={self.n_head}")
        if self.pos == "alibi" and self.model_type != "gpt":
            raise ValueError(f"{type(self).__name__}.pos: 'alibi' is supported by GPT (causal) only")
        s = self.alibi_slopes
        if s is not None and (self.pos != "alibi" or not isinstance(s, list) or len(s) != self.n_head or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < float("inf") for x in s)):
            raise ValueError(f"{type(self).__name__}.alibi_slopes: {self.n_head} numbers > 0 (one per head) with pos "
                             f"'alibi', got {s!r}")
        if self.pos == "rotary" and self.head_dim % 2:
            raise ValueError(f"{type(self).__name__}.pos: rotary positions need an even head dim, got "
                             f"{self.head_dim}")
        if self.rotary_dim is not None:
            r = self.rotary_dim
            if self.pos != "rotary" or isinstance(r, bool) or not isinstance(r, int) or r < 2 or r % 2 or \
                    r > self.head_dim:
                raise ValueError(f"{type(self).__name__}.rotary_dim: an even int in [2, head_dim={self.head_dim}] "
                                 f"with pos 'rotary', got {r!r} (pos {self.pos!r})")
        if self.parallel_block is not None and (self.parallel_block not in PARALLEL_BLOCKS or
                                                self.model_type != "gpt" or not self.norm_first or self.sandwich_norm):
            raise ValueError(f"{type(self).__name__}.parallel_block: one of {PARALLEL_BLOCKS} in a pre-norm GPT "
                             f"without sandwich_norm, got {self.parallel_block!r}")
        if not isinstance(self.lm_head_bias, bool) or (self.lm_head_bias and self.model_type == "bert"):
            raise ValueError(f"{type(self).__name__}.lm_head_bias: true or false (GPT, Seq2Seq; BERT's MLM head has "
                             f"its own bias), got {self.lm_head_bias!r}")
        for name, ok, want in (("dropout", lambda v: 0 <= v < 1, "0 <= dropout < 1"),
                               ("norm_eps", lambda v: v >= 0, "norm_eps >= 0"),
                               ("rope_theta", lambda v: v > 0, "rope_theta > 0"),
                               ("embed_scale", lambda v: v > 0, "embed_scale > 0"),
                               ("attn_softcap", lambda v: v >= 0, "attn_softcap >= 0 (0: off)"),
                               ("final_softcap", lambda v: v >= 0, "final_softcap >= 0 (0: off)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ValueError(f"{type(self).__name__}.{name}: expected a number, {want}; got {v!r}")
        if self.n_experts:
            self.check_ints(("n_experts",), 2)
            self.check_ints(("n_experts_per_tok",), 1)
            if self.n_experts_per_tok > self.n_experts or not isinstance(self.moe_norm_topk, bool) or \
                    self.parallel_block is not None:
                raise ValueError(f"{type(self).__name__}.n_experts_per_tok: 1 <= n_experts_per_tok <= n_experts "
                                 f"({self.n_experts}), moe_norm_topk true or false, no parallel_block; got "
                                 f"{self.n_experts_per_tok!r}, {self.moe_norm_topk!r}, {self.parallel_block!r}")
        else:
            self.check_ints(("n_experts",), 0)
        self.check_ints(("moe_shared_d_ff",), 0)
        if self.moe_shared_d_ff and not self.n_experts:
            raise ValueError(f"{type(self).__name__}.moe_shared_d_ff: a shared expert needs n_experts > 0")
        c = self.router_aux_loss_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0 or (c and (
                not self.n_experts or self.model_type != "gpt")):
            raise ValueError(f"{type(self).__name__}.router_aux_loss_coef: a number >= 0, > 0 only for a GPT with "
                             f"n_experts; got {c!r}")
        v = self.attn_scale
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ValueError(f"{type(self).__name__}.attn_scale: expected a number > 0 or None, got {v!r}")
        if self.sandwich_norm and (not self.norm_first or self.model_type != "gpt"):
            raise ValueError(f"{type(self).__name__}.sandwich_norm: supported by pre-norm (norm_first) GPT only")
        if not self.first_input_norm and (not self.norm_first or self.model_type != "bert"):
            raise ValueError(f"{type(self).__name__}.first_input_norm: false needs a pre-norm BERT (norm_first)")
        if not self.input_norm and (not self.sandwich_norm or self.parallel_block is not None):
            raise ValueError(f"{type(self).__name__}.input_norm: false needs sandwich_norm (each sublayer's output "
                             "normalised) and no parallel_block")
        if self.qk_norm_full and (not self.qk_norm or self.model_type != "gpt"):
            raise ValueError(f"{type(self).__name__}.qk_norm_full: needs qk_norm, in a GPT")
        if self.qk_norm_after_rope and (not self.qk_norm or self.qk_norm_full or self.model_type != "gpt"):
            raise ValueError(f"{type(self).__name__}.qk_norm_after_rope: needs per-head qk_norm, in a GPT")

        check_rope_scaling(self.rope_scaling, type(self).__name__)
        if (self.rope_scaling or {}).get("rope_type") == "longrope":
            n = (self.rotary_dim or self.head_dim) // 2
            if any(len(self.rope_scaling[k]) != n for k in ("short_factor", "long_factor")):
                raise ValueError(f"{type(self).__name__}.rope_scaling: longrope's short_factor and long_factor need "
                                 f"{n} entries each (one per rotary frequency)")
        if self.sliding_window is not None:
            self.check_ints(("sliding_window",), 1)
            if self.model_type not in ("gpt", "bert"):
                raise ValueError(f"{type(self).__name__}.sliding_window: a window is supported by GPT (causal) and "
                                 "BERT (both sides) only")
        if self.rope_local_theta is not None and (self.model_type not in ("gpt", "bert") or
                isinstance(self.rope_local_theta, bool) or not isinstance(self.rope_local_theta, (int, float))
                or self.rope_local_theta <= 0 or self.pos != "rotary" or self.sliding_window is None):
            raise ValueError(f"{type(self).__name__}.rope_local_theta: a number > 0 for the windowed layers of a "
                             f"rotary model with sliding_window; got {self.rope_local_theta!r}")
        n = self.nope_layers
        if n is not None and (self.model_type != "gpt" or self.pos != "rotary" or not isinstance(n, list) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layer for i in n) or
                len(set(n)) != len(n)):
            raise ValueError(f"{type(self).__name__}.nope_layers: distinct layer indices in [0, n_layer="
                             f"{self.n_layer}) of a rotary GPT, got {n!r} (pos {self.pos!r})")
        if self.layer_types is not None:
            kinds = ("sliding_attention", "full_attention")
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layer or any(
                    t not in kinds for t in self.layer_types) or self.sliding_window is None:
                raise ValueError(f"{type(self).__name__}.layer_types: one of {kinds} per layer ({self.n_layer}), "
                                 f"with sliding_window set; got {self.layer_types!r}")

    def layer_window(self, i: int) -> int:
        """Layer i's sliding window (keys per query), 0 for none."""
        if self.sliding_window is None or (self.layer_types is not None and
                                           self.layer_types[i] != "sliding_attention"):
            return 0
        return self.sliding_window

    def check_ints(self, names, low: int) -> None:
        """Each of ``names`` an int >= low (ValueError naming the field)."""
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{type(self).__name__}.{name}: expected an int >= {low}, got {v!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        d = dict(d)
        kind = d.pop("model_type", cls.model_type)
        if kind != cls.model_type:
            raise ValueError(f"{cls.__name__}.from_dict: model_type {kind!r}, expected {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"{cls.__name__}.from_dict: unknown key {key!r} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    model_type = "base"


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


# ---- positions ------------------------------------------------------------------------------------------------
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
                         "longrope": ("attention_factor",)}


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
        elif key == "truncate":
            ok = v is None or isinstance(v, bool)
        else:
            ok = positive(v) or (v is None and not required) or (key in ("mscale", "mscale_all_dim") and v == 0)
        if not ok:
            want = "a list of numbers > 0" if key in ("short_factor", "long_factor") else \
                "true or false" if key == "truncate" else "a number > 0"
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


# ---- attention ------------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys and values (B, Hk, max_len, D), written at ``input_pos``; static shapes for decoding."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", hugepages.zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", hugepages.zeros(shape, dtype, device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """k, v (B, Hk, L, D) written at the L positions ``input_pos`` (L,); returns the whole cache."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


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
        s = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5 if scale is None else scale)
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
                packed = (qkv, lambda t: tuple(h.view(B, L, -1, D).transpose(1, 2) for h in t.split(widths, -1)))
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
def activation_fn(name: str):
    return {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
            "silu": F.silu, "relu2": lambda x: F.relu(x).square()}[name]


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


# ---- generation helpers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How generate picks each token: temperature 0 = greedy (argmax); else a draw from softmax(logits / temperature)
    after transformers' warpers, in its order: ``top_k`` (the k likeliest), ``top_p`` (the smallest set whose
    probability reaches p), ``min_p`` (tokens at least min_p times the likeliest one's probability), ``typical_p``
    (locally typical sampling: the tokens whose surprise is nearest the entropy, holding that mass). The likeliest
    token always stays."""
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    typical_p: Optional[float] = None

    def check(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k: expected an int >= 1 or None, got {k!r}")
        for name, low_open in (("top_p", True), ("min_p", False), ("typical_p", True)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                                  not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0)):
                interval = "0 < {0} <= 1" if low_open else "0 <= {0} <= 1"
                raise ValueError(f"{name}: expected {interval.format(name)} or None, got {v!r}")


def sample_next(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> Tensor:
    """Next token (B,) from logits (B, V): argmax when the temperature is 0, else a draw from warped_probs."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(warped_probs(logits, sampling), 1, generator=generator).squeeze(-1)


def warped_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """The float32 distribution (..., V) that sample_next draws from for logits (..., V), temperature > 0."""
    shape, s, inf = logits.shape, sampling, float("-inf")
    logits = logits.reshape(-1, shape[-1]).float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, inf)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, -1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # the most likely token always stays
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, inf))
    if s.min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), inf)
    if s.typical_p is not None and s.typical_p < 1.0:
        logp = logits.log_softmax(-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        surprise = (-logp - entropy).abs()
        sorted_surprise, idx = torch.sort(surprise, -1)
        mass = logits.gather(-1, idx).softmax(-1).cumsum(-1)
        last = (mass < s.typical_p).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        drop = sorted_surprise > sorted_surprise.gather(-1, last)
        drop[:, 0] = False  # the most typical token stays
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), inf)
    return logits.softmax(-1).view(shape)


def token_logprobs(logits: Tensor, tokens: Tensor, sampling: Sampling) -> Tensor:
    """float32 log-probabilities (B,) of ``tokens`` (B,) under the distribution they were picked from: softmax of the
    (processed) logits (B, V) when greedy, else warped_probs (transformers' compute_transition_scores with
    normalize_logits)."""
    if sampling.temperature == 0:
        logp = logits.float().log_softmax(-1)
    else:
        logp = warped_probs(logits, sampling).log()
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def check_sampling(max_new_tokens: int, sampling: Sampling, min_new_tokens: int = 0) -> None:
    for name, n in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {n!r}")
    sampling.check()


def eos_ids(eos_token_id, device, vocab_size: int) -> Optional[Tensor]:
    """``eos_token_id`` (a token id, a list of them as in HF's generation_config, or None) as a 1-D long tensor on
    device; ValueError naming it unless every id is a token of the ``vocab_size`` the model predicts."""
    if eos_token_id is None:
        return None
    try:
        ids = torch.as_tensor(eos_token_id).flatten()
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or not ids.numel() or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"eos_token_id: expected a token id, a list of them or None, got {eos_token_id!r}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"eos_token_id: {bad.tolist()} not token ids of this model (vocab_size {vocab_size})")
    return ids.long().to(device)


def lm_head_loss(head: nn.Module, h: Tensor, target: Tensor, backend: str, skip_logits: bool,
                 transform=None) -> Tuple[Optional[Tensor], Tensor]:
    """(logits, loss) of the LM head ``head`` on hidden states h (..., d): cross-entropy against target (...) (-100
    ignored), mean over the kept positions. ``skip_logits`` on the fastattn backend, with a plain nn.Linear head (not
    a LoRA / QAT / int8 one): fastattn.linear_cross_entropy, and logits None. ``transform``: a function the logits
    go through (Gemma 2's softcap), which keeps the unfused path."""
    if skip_logits and backend == "fastattn" and transform is None and type(head) is nn.Linear:
        return None, linear_cross_entropy(h, head.weight, target, head.bias)
    logits = head(h) if transform is None else transform(head(h))
    return logits, F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=-100)


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
    torch.compile that test would be a data-dependent branch, and the all-False mask gives the same result)."""
    if attention_mask is None:
        return None
    if torch.compiler.is_compiling():
        return ~keep
    return None if bool(keep.all()) else ~keep


class CacheMixin:
    """``setup_caches`` for a model whose ``cached_blocks()`` attend causally over their own past (GPT's blocks, the
    Seq2Seq decoder's). Buffers (not in the state_dict): each block's KVCache, ``cache_padding`` (B, max_len) True =
    padding or not written yet, ``next_pos`` (B, 1) each sequence's next position, ``cache_index`` arange(max_len).
    ``decode_many`` needs the model's ``cached_logits(tokens, positions, input_pos, end)``: logits (B, W, V) of tokens
    written at cache slots input_pos, attending causally over the first ``end`` slots."""

    def cached_blocks(self) -> nn.ModuleList:
        return self.blocks

    def setup_caches(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None, device=None, *,
                     headroom: int = 0) -> None:
        """Preallocate every layer's K/V cache for ``batch`` sequences of up to ``max_len`` tokens (kept when the
        shapes already match), plus ``headroom`` slots for tokens that may be written and then taken back
        (speculative decoding's rejected drafts)."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len: {max_len} > config.max_seq_len {self.config.max_seq_len}")
        max_len += headroom
        ref = self.tok_emb.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        blocks, cfg = self.cached_blocks(), self.config
        cache = blocks[0].attn.cache if len(blocks) else None
        # a cache made under torch.inference_mode cannot be written outside it: made anew then
        if cache is None or tuple(cache.k.shape) != (batch, cfg.n_kv_head, max_len, cfg.head_dim) or \
                cache.k.dtype != dtype or cache.k.device != torch.device(device) or \
                (cache.k.is_inference() and not torch.is_inference_mode_enabled()):
            for block in blocks:
                block.attn.cache = KVCache(batch, cfg.n_kv_head, max_len, cfg.head_dim, dtype, device)
        self.register_buffer("cache_padding", torch.ones(batch, max_len, dtype=torch.bool, device=device),
                             persistent=False)
        self.register_buffer("next_pos", torch.zeros(batch, 1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("cache_index", torch.arange(max_len, device=device), persistent=False)


    def decode_many(self, tokens: Tensor, input_pos: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Several tokens per sequence (B, W), written at the consecutive cache slots ``input_pos`` (W,), each
        attending to the cache up to its own slot (a speculative step's drafts, checked at once). ``valid`` (B, W)
        bool, False = a filler: its slot stays padding and its position is not counted (its logits mean nothing).
        Returns logits (B, W, V)."""
        valid, positions = self.claim_slots(tokens, input_pos, valid)
        logits = self.cached_logits(tokens, positions, input_pos, int(input_pos[-1]) + 1)
        self.next_pos += valid.sum(-1, keepdim=True)
        return logits

    def claim_slots(self, tokens: Tensor, input_pos: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """decode_many's bookkeeping before its pass (the bound step's too): the W slots ``input_pos`` kept, or
        padding for fillers; returns ``valid`` (all True when None) and the tokens' positions (B, W)."""
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
        self.cache_padding[:, input_pos] = ~valid
        return valid, (self.next_pos + valid.cumsum(-1) - 1).clamp_min(0)

    def reject_slots(self, start: int, reject: Tensor) -> None:
        """Take back the tokens written at cache slots start, start + 1, ... that ``reject`` (B, W) marks (drafts that
        were not accepted): their slots become padding, and each sequence's next position goes back by its count."""
        self.cache_padding[:, start:start + reject.shape[1]] |= reject
        self.next_pos -= reject.sum(1, keepdim=True)

    def compact_caches(self, end: int) -> int:
        """Close the holes that rejected tokens left among the first ``end`` slots: each sequence's written slots move,
        in order, to the right end of the first n slots (n: the most any sequence has), left-padded as after
        prefill. Returns n, the slot to write next."""
        keep = ~self.cache_padding[:, :end]
        n = int(keep.sum(1).max())
        # a stable sort puts each row's padding first and its kept slots last, in order: the last n are the sources
        src = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices[:, end - n:]  # (B, n)
        for block in self.cached_blocks():
            c = block.attn.cache
            idx = src[:, None, :, None].expand(c.k.shape[0], c.k.shape[1], n, c.k.shape[3])
            k, v = c.k[:, :, :end].gather(2, idx), c.v[:, :, :end].gather(2, idx)
            c.k[:, :, :n], c.v[:, :, :n] = k, v
        self.cache_padding[:, :n] = ~keep.gather(1, src)
        self.cache_padding[:, n:] = True
        return n


def generation_loop(logits: Tensor, decode_one, out: Tensor, start: int, max_new_tokens: int, sampling: Sampling,
                    eos_token_id, generator, streamer, process, scores: Optional[List[Tensor]] = None) -> Tensor:
    """Sample from ``logits`` (B, V) after ``process(logits, tokens so far, i)`` (beam.LogitsProcessors: penalties,
    min_new_tokens, forced tokens), write the token into out[:, start + i], feed it to ``decode_one(tokens (B, 1),
    input_pos (1,))`` for the next logits; eos handling and streaming as ``GPT.generate`` documents. ``scores``: a
    list that gets each step's (B,) log-probability of the chosen tokens (token_logprobs; 0 after an eos)."""
    finished = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    index = torch.arange(start, start + max_new_tokens, device=out.device)
    eos = eos_ids(eos_token_id, out.device, logits.shape[-1])
    stream, end = stream_calls(streamer, out[:, :start])
    for i in range(max_new_tokens):
        logits = process(logits, out[:, :start + i], i)
        tok = sample_next(logits, sampling, generator)
        if scores is not None:
            scores.append(token_logprobs(logits, tok, sampling).masked_fill(finished, 0.0))
        if eos is not None:
            tok = tok.masked_fill(finished, eos[0])
            finished |= torch.isin(tok, eos)
        out[:, start + i] = tok
        if stream is not None:
            stream(tok)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            if end is not None:
                end()
            return out[:, :start + i + 1]
        logits = decode_one(tok[:, None], index[i:i + 1])
    return out


def stream_calls(streamer, prompt: Tensor):
    """(per-token call, end call) of generate's ``streamer``: a callable, called with each new token batch (B,);
    or an object with put / end like transformers' streamers (TextStreamer, TextIteratorStreamer), called as HF's
    generate calls them: put(prompt) now, put(tokens) per step, end() after the last (CPU tensors)."""
    if streamer is None:
        return None, None
    if callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None)):
        streamer.put(prompt.cpu())
        return (lambda tok: streamer.put(tok.cpu())), streamer.end
    if not callable(streamer):
        raise ValueError(f"streamer: expected a callable or an object with put / end (transformers' streamers), got "
                         f"{type(streamer).__name__}")
    return streamer, None


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
        ``device``: the model's (e.g. torch.bfloat16, "cuda"), the weights converted as they load; ``overrides``
        replace config fields (e.g. backend="torch"). A bad weights file raises CheckpointError naming the key. The
        model comes back in eval mode, as transformers' from_pretrained returns it (``.train()`` to fine-tune)."""
        cfg = cls.config_class.load(os.path.join(path, CONFIG_FILE))
        if overrides:
            cfg = cls.config_class.from_dict({**dataclasses.asdict(cfg), **overrides})
        model = place(cls(cfg), dtype, device)
        if os.path.exists(os.path.join(path, INT8_FILE)):
            with open(os.path.join(path, INT8_FILE)) as f:
                apply_int8_layout(model, json.load(f))
        load_weights(model, os.path.join(path, WEIGHTS_FILE))
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
