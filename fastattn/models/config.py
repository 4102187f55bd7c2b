"""The config base every model shares (ModelConfig: its fields, their checks, JSON) and the names each
field allows."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .checkpoint import CheckpointError, read_json_object
from .positions import check_rope_scaling


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
    "attention_factor"} (transformers' meanings; scale_frequencies), and fastattn's optional "refill_cache":
    GPT.generate crossing original_max re-runs the sequence with the long factors (true, the default: transformers'
    Phi-3) or keeps the short factors' cache (false: its Llama). ``pos="alibi"`` (GPT): no position embedding;
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

    def check_eos(self) -> None:
        """eos_token_id (generate's default end tokens): a token id, a non-empty list of them, or None."""
        eos = self.eos_token_id
        if eos is not None and not (isinstance(eos, list) and eos and all(self._is_token(e) for e in eos)
                                    or self._is_token(eos)):
            raise ValueError(f"{type(self).__name__}.eos_token_id: expected a token id (< vocab_size "
                             f"{self.vocab_size}), a non-empty list of them or None, got {eos!r}")

    def _is_token(self, i) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size

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
        """The config saved in JSON file ``path``; a CheckpointError naming the file when it is missing, not JSON or
        not a valid config."""
        d = read_json_object(path)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None

    model_type = "base"
