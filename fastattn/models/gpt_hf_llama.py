"""GPT.from_hf for Llama and the families built like it: one importer, and per family what differs from Llama
(RMSNorms before attention and MLP, a SwiGLU MLP of gate_proj / up_proj / down_proj, rotate_half rotary positions,
biases from attention_bias / mlp_bias). The mixtures of experts among them add their experts (gpt_hf_moe.py).

- Qwen2 (q / k / v biases), Qwen3 (per-head q / k norms), Phi-3 (fused qkv_proj / gate_up_proj), Mistral, SmolLM3
  (layers without rotary positions), Seed-OSS (its three bias settings), Helium and ERNIE 4.5 (rotary pairs
  interleaved, permuted into ours: gpt_hf_parallel.pair_rows), GLM and GLM-4 (interleaved partial rotary, fused
  gate_up_proj; GLM-4's sandwich norms);
- StableLM (LayerNorms with biases, optional parallel block), StarCoder2 (LayerNorms with biases, a biased GELU MLP
  c_fc / c_proj, its window), Nemotron (LayerNorm1P: 1 + weight; ungated relu2 MLP; partial rotary), Arcee (an ungated
  relu2 MLP), Ministral (its windowed layers), HunYuan (q / k norms after the rotary positions; a fixed-alpha
  "dynamic" rope: a wider base), Cohere 1 / 2 (one bias-free LayerNorm for attention and MLP in parallel, interleaved
  rotary pairs, logit_scale; Cohere 2's global layers without positions), OLMo (parameter-free LayerNorms), OLMo 2 / 3
  and EXAONE 4 (norms on the sublayers' outputs only; OLMo's q / k norms over all heads), Granite (its multipliers;
  residual and logit scales folded into the weights).
Whatever GPT cannot reproduce exactly is refused with a CheckpointError naming the key."""
import dataclasses
import logging
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_get
from .gpt import GPTConfig
from .gpt_hf_moe import moe_projections
from .gpt_hf_parallel import ACT, pair_rows, rotary
from .gpt_hf_positions import layer_ropes, nope_layers, rope_scaling

log = logging.getLogger("fastattn")
LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "stablelm", "granite", "olmo", "olmo2", "olmo3",
                  "cohere", "cohere2", "smollm3", "exaone4", "helium", "ernie4_5", "glm", "glm4", "seed_oss",
                  "starcoder2", "ministral", "nemotron", "arcee", "hunyuan_v1_dense")
_UNGATED = {"starcoder2": ("c_fc", "c_proj", "gelu_pytorch_tanh"), "nemotron": ("up_proj", "down_proj", "relu2"),
            "arcee": ("up_proj", "down_proj", "relu2")}  # MLP keys and default activation of ungated MLPs
_PRE = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"))
_POST_ONLY = (("post_norm1", "post_attention_layernorm"), ("post_norm2", "post_feedforward_layernorm"))
_INTERLEAVED = ("cohere", "cohere2", "helium", "ernie4_5", "glm", "glm4")
PARTIAL_ROTARY = ("phi3", "stablelm", "glm", "glm4", "nemotron")  # the families whose models read partial_rotary_factor


def _biases(hf: dict, kind: str) -> Tuple[bool, bool]:
    """(GPTConfig.bias: o_proj's and the MLP's, qkv_bias or None when the same), refusing a split GPT lacks."""
    get = lambda key, default=False: bool(hf.get(key, default))  # noqa: E731
    keys = ("attention_bias", "mlp_bias")
    if kind in ("ernie4_5", "starcoder2"):
        qkv = o = mlp = get("use_bias", kind == "starcoder2")
    elif kind == "qwen2":
        qkv, o, mlp = True, False, False
    elif kind == "qwen2_moe":
        qkv, o, mlp = get("qkv_bias", True), False, False
    elif kind == "stablelm":
        qkv, o, mlp = get("use_qkv_bias"), False, False
    elif kind in ("helium", "glm", "glm4"):  # q / k / v biases without o_proj's
        qkv, o, mlp = get("attention_bias", kind != "helium"), False, get("mlp_bias")
    elif kind == "seed_oss":
        qkv, o, mlp, keys = get("attention_bias", True), get("attention_out_bias"), get("mlp_bias"), \
            ("attention_out_bias", "mlp_bias")
    else:
        qkv = o = get("attention_bias")
        mlp = get("mlp_bias")
    if o != mlp:
        raise CheckpointError(f"config.json: {keys[0]}={o} with {keys[1]}={mlp} is not supported (one bias "
                              "setting for o_proj and the MLP)")
    return o, (None if qkv == o else qkv)


def from_llama(hf: dict, state, moe: Optional[dict] = None):
    """Llama and its relatives (the module docstring); ``moe``: a mixture-of-experts family's GPTConfig fields
    (gpt_hf_moe.moe_config). Returns (config, state dict, the sliding-window layers' own rotary base or None)."""
    kind = hf.get("model_type")
    for key in ("qk_layernorm", "use_qk_norm"):
        if hf.get(key):
            raise CheckpointError(f"config.json: {key}=true is not supported by GPT.from_hf (StableLM's / Cohere's "
                                  "per-head LayerNorms, one weight per head)")
    if hf.get("clip_qkv") is not None:
        raise CheckpointError(f"config.json: clip_qkv={hf['clip_qkv']!r} (OLMo's clamped q / k / v) is not "
                              "supported by GPT.from_hf")
    moe = dict(moe or {})
    d_ff = moe.pop("d_ff", None) or hf["intermediate_size"]  # an expert's width (Qwen3-MoE's own)
    rope, local_theta = layer_ropes(hf)  # (OLMo 3: one rope per layer type)
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    D = hf.get("head_dim") or d // H
    theta = float(hf_get(rope, "rope_theta", default=hf.get("rope_theta", 1e4)))
    if rope.get("rope_type", rope.get("type")) == "dynamic" and rope.get("alpha"):
        # HunYuan's "dynamic" with a fixed alpha only stretches the base (transformers' ntk_alpha): static
        theta, rope = theta * float(rope["alpha"]) ** (D / (D - 2)), {}
    gated = kind not in _UNGATED  # StarCoder2: c_fc -> activation -> c_proj; Nemotron, Arcee: up, relu2, down
    act = hf.get("hidden_act", "silu" if gated else _UNGATED[kind][2])
    if (act != "silu") if gated else (act not in ACT):
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported ("
                              f"{'a SwiGLU MLP needs silu' if gated else sorted(ACT)})")
    cohere, olmo = kind in ("cohere", "cohere2"), kind == "olmo"
    post_only = kind in ("olmo2", "olmo3", "exaone4")  # each sublayer's output normalised, not its input
    layernorm = kind in ("stablelm", "olmo", "cohere", "cohere2", "starcoder2", "nemotron")
    norm_bias = kind in ("stablelm", "starcoder2", "nemotron")
    bias, qkv_bias = _biases(hf, kind)
    _, rot = rotary(hf, D)  # Phi-4-mini: partial_rotary_factor 0.75
    if rot is not None and kind not in PARTIAL_ROTARY:  # transformers 5 rotates the whole head there
        log.warning("config.json: partial_rotary_factor is set, and %s's model in transformers rotates the whole head "
                    "regardless: so does this import", kind)
        rot = None
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["num_hidden_layers"], n_head=H,
                    n_kv_head=hf.get("num_key_value_heads") or H, head_dim=D, d_ff=d_ff,
                    max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm" if layernorm else "rmsnorm",
                    norm_bias=norm_bias if layernorm else None,
                    norm_eps=hf_get(hf, "layer_norm_eps", "norm_epsilon", "norm_eps", default=1e-5) if layernorm else
                    hf.get("rms_norm_eps", 1e-6),
                    parallel_block="one_norm" if cohere or kind == "stablelm" and hf.get("use_parallel_residual")
                    else None, norm_first=True, mlp="swiglu" if gated else "gelu", activation=ACT.get(act, "silu"),
                    pos="rotary", rope_theta=theta,
                    tie_embeddings=hf.get("tie_word_embeddings", False), bias=bias,
                    qkv_bias=qkv_bias, qk_norm=kind in ("qwen3", "qwen3_moe", "olmo2", "olmo3", "olmoe", "exaone4",
                                                        "hunyuan_v1_dense"),
                    qk_norm_after_rope=kind == "hunyuan_v1_dense",
                    qk_norm_full=kind in ("olmo2", "olmo3", "olmoe"), sandwich_norm=post_only or kind == "glm4",
                    input_norm=not post_only, rope_scaling=rope_scaling(rope, hf), rotary_dim=rot,
                    nope_layers=nope_layers(hf) or None, **moe)
    m, Hk = KeyMap(state, ("model.", "")), cfg.n_kv_head
    norm_params = ("weight", "bias") if norm_bias else ("weight",)

    one_p = kind == "nemotron"  # its LayerNorm1P scales by 1 + weight

    def norm(key: str) -> Dict[str, Tensor]:  # one norm's parameters (OLMo's LayerNorms have none: weight 1)
        return {p: torch.ones(d) if olmo else m.take(f"{key}.{p}", (d,)).float() + 1.0 if one_p and p == "weight"
                else m.take(f"{key}.{p}", (d,)) for p in norm_params}
    sd = {"tok_emb.weight": m.take("embed_tokens.weight", (cfg.vocab_size, d)),
          **{f"norm_f.{p}": t for p, t in norm("norm").items()}}
    norms = _POST_ONLY if post_only else _PRE[:1] if cfg.parallel_block else _PRE
    if kind == "glm4":  # GLM-4: both norms around each sublayer
        norms = _PRE + (("post_norm1", "post_self_attn_layernorm"), ("post_norm2", "post_mlp_layernorm"))
    qk_dims = (H * D, Hk * D) if cfg.qk_norm_full else (D, D)
    r = rot or D  # interleaved rotary pairs: q and k rows into our rotary layout
    qk_rows = torch.cat([pair_rows(H, D, r), H * D + pair_rows(Hk, D, r), torch.arange((H + Hk) * D, (H + 2 * Hk) * D)])
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in norms:
            sd.update({f"{b}{ours}.{p}": t for p, t in norm(f"{h}{theirs}").items()})
        sd.update(projections(m, h, b, cfg, kind))
        if cfg.qk_norm:
            qn, kn = ("query_layernorm", "key_layernorm") if cfg.qk_norm_after_rope else ("q_norm", "k_norm")
            sd[f"{b}attn.q_norm.weight"] = m.take(f"{h}self_attn.{qn}.weight", qk_dims[:1])
            sd[f"{b}attn.k_norm.weight"] = m.take(f"{h}self_attn.{kn}.weight", qk_dims[1:])
        if kind in _INTERLEAVED:
            for key in (k for k in (f"{b}attn.wqkv.weight", f"{b}attn.wqkv.bias") if k in sd):
                sd[key] = sd[key][qk_rows]
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else \
        KeyMap(state).take("lm_head.weight", (cfg.vocab_size, d))
    if kind in ("granite", "granitemoe"):
        cfg, sd = _granite(hf, cfg, sd)
    if cohere:  # logits * logit_scale: the head is linear in the final norm's output, which has no bias
        sd["norm_f.weight"] = sd["norm_f.weight"].float() * float(hf.get("logit_scale", 0.0625))
    return cfg, sd, local_theta


def projections(m: KeyMap, h: str, b: str, cfg: GPTConfig, kind: str = "llama") -> Dict[str, Tensor]:
    """Layer h's projections (and their biases) as GPT's block b's: q, k, v concatenated into wqkv (Phi-3 stores them
    fused: qkv_proj), [gate | up] into w_in (Phi-3 and GLM: gate_up_proj; ungated: c_fc, up_proj), wo, w_out (a
    mixture of experts': gpt_hf_moe.py)."""
    d, f, H, Hk, D = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    a = f"{h}self_attn."
    if kind == "phi3":
        qkv = {"weight": m.take(f"{a}qkv_proj.weight", ((H + 2 * Hk) * D, d))}
    else:
        qkv = {p: torch.cat([m.take(f"{a}{n}_proj.{p}", (s, d)[:2 if p == "weight" else 1])
                             for n, s in (("q", H * D), ("k", Hk * D), ("v", Hk * D))])
               for p in (("weight", "bias") if qkv_bias else ("weight",))}
    params = ("weight", "bias") if cfg.bias else ("weight",)
    sd = {**{f"{b}attn.wqkv.{p}": t for p, t in qkv.items()},
          **{f"{b}attn.wo.{p}": m.take(f"{a}o_proj.{p}", (d, H * D)[:2 if p == "weight" else 1]) for p in params}}
    if cfg.n_experts:
        return {**sd, **moe_projections(m, h, b, cfg)}
    shape = lambda *s: lambda p: s if p == "weight" else s[:1]  # noqa: E731
    if kind in _UNGATED:
        up, down, _ = _UNGATED[kind]
        names = {"w_in": ((up, shape(f, d)),), "w_out": ((down, shape(d, f)),)}
    elif kind in ("phi3", "glm", "glm4"):
        names = {"w_in": (("gate_up_proj", shape(2 * f, d)),), "w_out": (("down_proj", shape(d, f)),)}
    else:
        names = {"w_in": (("gate_proj", shape(f, d)), ("up_proj", shape(f, d))), "w_out": (("down_proj", shape(d, f)),)}
    for ours, parts in names.items():
        for p in params:
            sd[f"{b}mlp.{ours}.{p}"] = torch.cat([m.take(f"{h}mlp.{n}.{p}", s(p)) for n, s in parts])
    return sd


def _granite(hf: dict, cfg: GPTConfig, sd: Dict[str, Tensor]) -> Tuple[GPTConfig, Dict[str, Tensor]]:
    """Granite's multipliers: the embeddings' and the attention scores' (the scale itself, not a factor on
    1 / sqrt(D)) are GPTConfig fields; the two that scale a linear output fold into its weights, in float32:
    residual_multiplier (each sublayer's output, before the residual add) into o_proj and the MLP's or every
    expert's down projection, 1 / logits_scaling into the final RMSNorm's weight (the head has no bias)."""
    r, s = float(hf.get("residual_multiplier", 1.0)), float(hf.get("logits_scaling", 1.0))
    for k, w in sd.items():
        if ".attn.wo." in k or ".w_out." in k:
            sd[k] = w.float() * r
    sd["norm_f.weight"] = sd["norm_f.weight"].float() / s
    return dataclasses.replace(cfg, embed_scale=float(hf.get("embedding_multiplier", 1.0)),
                               attn_scale=float(hf.get("attention_multiplier", 1.0))), sd
