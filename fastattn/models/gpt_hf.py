"""GPT.from_hf's importers: a Hugging Face config.json and state dict mapped onto GPTConfig and GPT's state dict,
per family (GPT-2, GPT-BigCode; OPT; Llama, Mistral, Qwen2, Qwen3, Phi-3, StableLM, Granite, OLMo 1 / 2 / 3, Cohere
1 / 2, SmolLM3; Gemma 1 / 2 / 3; Mixtral, Qwen3-MoE, Qwen2-MoE, GraniteMoE and OLMoE, whose experts gpt_hf_moe.py
maps; and in gpt_hf_parallel.py GPT-NeoX / Pythia, Phi-1 / 1.5 / 2, Falcon).
Whatever a family sets that GPT cannot reproduce exactly is refused with a CheckpointError naming the setting."""
import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_get, read_hf_folder
from .gpt import GPTConfig
from .gpt_hf_parallel import ACT
from .gpt_hf_alibi import from_bloom, from_mpt
from .gpt_hf_moe import MOE_FAMILIES, moe_config, moe_projections
from .gpt_hf_parallel import from_gptj, from_parallel, pair_rows, reorder_qkv, rotary
from .layers import ROPE_SCALING_KEYS, check_rope_scaling


def import_gpt(path: str, overrides: dict) -> Tuple[GPTConfig, Dict[str, Tensor]]:
    """(config with ``overrides`` applied, GPT state dict) of the HF folder at path."""
    hf, state = read_hf_folder(path)
    kind, local_theta = hf.get("model_type"), None
    if kind in ("gpt2", "gpt_bigcode"):
        cfg, sd = _from_gpt2(hf, state)
    elif kind in LLAMA_FAMILIES:
        cfg, sd, local_theta = _from_llama(hf, state)
    elif kind in MOE_FAMILIES:
        cfg, sd, local_theta = _from_llama(hf, state, moe_config(hf))
    elif kind in ("gemma", "gemma2", "gemma3_text"):
        cfg, sd, local_theta = _from_gemma(hf, state)
    elif kind == "opt":
        cfg, sd = _from_opt(hf, state)
    elif kind in ("gpt_neox", "phi", "falcon"):
        cfg, sd = from_parallel(hf, state)
    elif kind == "gptj":
        cfg, sd = from_gptj(hf, state)
    elif kind == "bloom":
        cfg, sd = from_bloom(hf, state)
    elif kind == "mpt":
        cfg, sd = from_mpt(hf, state)
    else:
        raise CheckpointError(f"{path}: model_type {kind!r} is not supported by GPT.from_hf (gpt2, llama, "
                              "mistral, qwen2, qwen3, phi3, stablelm, gemma, gemma2, gemma3_text, opt, gpt_neox, "
                              "phi, falcon, gptj, bloom, mpt, mixtral, qwen3_moe, qwen2_moe, gpt_bigcode, granite, "
                              "granitemoe, olmo, olmo2, olmo3, olmoe, cohere, cohere2, smollm3)")
    window, types = _sliding_window(hf)
    if local_theta is not None and window is not None:  # Gemma 3, OLMo 3: the windowed layers' rotary base
        overrides = {"rope_local_theta": local_theta, **overrides}
    max_len = overrides.get("max_seq_len", cfg.max_seq_len)
    if window is not None and "sliding_window" not in overrides and (
            window < max_len or overrides.get("rope_local_theta") is not None):
        # (a window of >= max_seq_len keys cuts nothing: then none is set, unless it marks Gemma 3's local layers)
        overrides = {"sliding_window": window, "layer_types": types, **overrides}
    return GPTConfig.from_dict({**cfg.to_dict(), **overrides}), sd


def _from_gpt2(hf: dict, state):
    """GPT-2, and GPT-BigCode (SantaCoder, StarCoder): GPT-2's block on nn.Linear weights, multi-query attention
    (c_attn to [q | k | v] with one K / V head) or per-head [q, k, v] rows without it."""
    bigcode = hf.get("model_type") == "gpt_bigcode"
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag}=true is not supported by GPT.from_hf")
    if hf.get("scale_attn_weights") is False:
        raise CheckpointError("config.json: scale_attn_weights=false is not supported by GPT.from_hf")
    act = hf.get("activation_function", "gelu_pytorch_tanh" if bigcode else "gelu_new")
    if act not in ACT:
        raise CheckpointError(f"config.json: activation_function {act!r} is not supported ({sorted(ACT)})")
    d, H = hf["n_embd"], hf["n_head"]
    Hk = 1 if bigcode and hf.get("multi_query", True) else H
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["n_layer"], n_head=H, n_kv_head=Hk,
                    d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_first=True, mlp="gelu",
                    activation=ACT[act], pos="learned", tie_embeddings=hf.get("tie_word_embeddings", True),
                    bias=True)
    m, f, D = KeyMap(state, ("transformer.", "")), cfg.d_ff, d // H
    sd = {"tok_emb.weight": m.take("wte.weight", (cfg.vocab_size, d)),
          "pos.weight": m.take("wpe.weight", (cfg.max_seq_len, d)),
          "norm_f.weight": m.take("ln_f.weight", (d,)), "norm_f.bias": m.take("ln_f.bias", (d,))}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd[f"{b}{ours}.weight"] = m.take(f"{h}{theirs}.weight", (d,))
            sd[f"{b}{ours}.bias"] = m.take(f"{h}{theirs}.bias", (d,))
        # GPT-2's Conv1D stores (in, out): transposed into nn.Linear's (out, in); GPT-BigCode's are nn.Linear
        for ours, theirs, shape in (("attn.wqkv", "attn.c_attn", (d + 2 * Hk * D, d)),
                                    ("attn.wo", "attn.c_proj", (d, d)),
                                    ("mlp.w_in", "mlp.c_fc", (f, d)), ("mlp.w_out", "mlp.c_proj", (d, f))):
            w = m.take(f"{h}{theirs}.weight", shape, transpose=not bigcode)
            bias = m.take(f"{h}{theirs}.bias", shape[:1])
            if ours == "attn.wqkv" and bigcode and Hk == H:  # (H, 3, D) rows: q, k, v of each head in turn
                w, bias = (reorder_qkv(t, "per_head", H, H, D) for t in (w, bias))
            sd[f"{b}{ours}.weight"], sd[f"{b}{ours}.bias"] = w, bias
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else \
        KeyMap(state).take("lm_head.weight", (cfg.vocab_size, d))
    return cfg, sd


def _from_opt(hf: dict, state):
    """OPT: GPT-2's block with separate q / k / v / out projections, ReLU, learned positions from table row 2. The
    post-norm OPT-350m and its embedding projections (word_embed_proj_dim) are refused."""
    d = hf["hidden_size"]
    checks = (("do_layer_norm_before", True), ("_remove_final_layer_norm", False), ("enable_bias", True),
              ("layer_norm_elementwise_affine", True), ("word_embed_proj_dim", d))
    for key, want in checks:
        if hf.get(key, want) != want:
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported by GPT.from_hf (OPT with "
                                  f"{key}={want!r})")
    act = hf.get("activation_function", "relu")
    if act not in ACT:
        raise CheckpointError(f"config.json: activation_function {act!r} is not supported ({sorted(ACT)})")
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["num_hidden_layers"],
                    n_head=hf["num_attention_heads"], d_ff=hf["ffn_dim"], max_seq_len=hf["max_position_embeddings"],
                    norm="layernorm", norm_eps=1e-5, norm_first=True, mlp="gelu", activation=ACT[act],
                    pos="learned", pos_offset=2, tie_embeddings=hf.get("tie_word_embeddings", True), bias=True)
    m, f = KeyMap(state, ("model.decoder.", "decoder.", "")), cfg.d_ff
    sd = {"tok_emb.weight": m.take("embed_tokens.weight", (cfg.vocab_size, d)),
          "pos.weight": m.take("embed_positions.weight", (cfg.max_seq_len + 2, d))}
    for p in ("weight", "bias"):
        shape = (lambda s: s) if p == "weight" else (lambda s: s[:1])
        sd[f"norm_f.{p}"] = m.take(f"final_layer_norm.{p}", (d,))
        for i in range(cfg.n_layer):
            h, b = f"layers.{i}.", f"blocks.{i}."
            sd[f"{b}attn.wqkv.{p}"] = torch.cat([m.take(f"{h}self_attn.{x}_proj.{p}", shape((d, d))) for x in "qkv"])
            for ours, theirs, s in (("attn.wo", "self_attn.out_proj", (d, d)), ("mlp.w_in", "fc1", (f, d)),
                                    ("mlp.w_out", "fc2", (d, f)), ("norm1", "self_attn_layer_norm", (d,)),
                                    ("norm2", "final_layer_norm", (d,))):
                sd[f"{b}{ours}.{p}"] = m.take(f"{h}{theirs}.{p}", shape(s))
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else \
        KeyMap(state).take("lm_head.weight", (cfg.vocab_size, d))
    return cfg, sd


_GEMMA_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu_tanh", "gelu_exact": "gelu"}


def _from_gemma(hf: dict, state):
    """Gemma / Gemma 2 / Gemma 3 (text): RMSNorms scaling by (1 + weight) (imported as that sum), embeddings times
    sqrt(d_model), a GeGLU MLP, its own head_dim; Gemma 2 adds sandwich norms, score and logit softcaps,
    query_pre_attn_scalar and a sliding window on every other layer (import_gpt sets it from _sliding_window);
    Gemma 3 has q / k norms, no softcaps, and the windowed layers' own rotary base."""
    kind = hf.get("model_type")
    two, three = kind == "gemma2", kind == "gemma3_text"
    if three and hf.get("use_bidirectional_attention"):
        raise CheckpointError("config.json: use_bidirectional_attention=true (an embedding model) is not supported "
                              "by GPT.from_hf")
    # transformers reads Gemma's legacy hidden_act "gelu" as the tanh approximation, as the official models mean it
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GEMMA_ACT:
        raise CheckpointError(f"config.json: hidden_activation {act!r} is not supported ({sorted(_GEMMA_ACT)})")
    rope, local_theta = _layer_ropes(hf)
    d, H, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=L, n_head=H,
                    n_kv_head=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or d // H,
                    d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 8192), norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6), norm_first=True, mlp="geglu", activation=_GEMMA_ACT[act],
                    pos="rotary", rope_theta=float(hf_get(rope, "rope_theta", default=hf.get("rope_theta", 1e4))),
                    rope_scaling=_rope_scaling(rope), tie_embeddings=True, bias=bool(hf.get("attention_bias", False)),
                    embed_scale=d ** 0.5, sandwich_norm=two or three, qk_norm=three,
                    attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                    final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                    attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if two or three else None)
    if cfg.bias:
        raise CheckpointError("config.json: attention_bias=true is not supported for Gemma")
    m, D = KeyMap(state, ("model.", "")), cfg.head_dim

    def norm(key, n=d):  # Gemma's norm multiplies by (1 + weight)
        return m.take(key, (n,)).float() + 1.0

    sd = {"tok_emb.weight": m.take("embed_tokens.weight", (cfg.vocab_size, d)), "norm_f.weight": norm("norm.weight")}
    names = (("norm1", "input_layernorm"), ("norm2", "pre_feedforward_layernorm"), ("post_norm1",
             "post_attention_layernorm"), ("post_norm2", "post_feedforward_layernorm")) if two or three else \
        (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"))
    for i in range(L):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in names:
            sd[f"{b}{ours}.weight"] = norm(f"{h}{theirs}.weight")
        if three:
            sd[f"{b}attn.q_norm.weight"] = norm(f"{h}self_attn.q_norm.weight", D)
            sd[f"{b}attn.k_norm.weight"] = norm(f"{h}self_attn.k_norm.weight", D)
        sd.update(_projections(m, h, b, cfg))
    sd["lm_head.weight"] = sd["tok_emb.weight"]
    return cfg, sd, local_theta


def _projections(m: KeyMap, h: str, b: str, cfg: GPTConfig, fused: bool = False) -> Dict[str, Tensor]:
    """A Llama-layout layer's projection weights (HF prefix h) as GPT's (prefix b): q, k, v concatenated into wqkv,
    [gate | up] into w_in (Phi-3 stores both so: ``fused``), wo, w_out (a mixture of experts': gpt_hf_moe.py). HF's
    rotate_half layout is ours, so no permutation."""
    d, f, H, Hk, D = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    if fused:
        qkv = m.take(f"{h}self_attn.qkv_proj.weight", ((H + 2 * Hk) * D, d))
    else:
        qkv = torch.cat([m.take(f"{h}self_attn.q_proj.weight", (H * D, d)),
                         m.take(f"{h}self_attn.k_proj.weight", (Hk * D, d)),
                         m.take(f"{h}self_attn.v_proj.weight", (Hk * D, d))])
    sd = {f"{b}attn.wqkv.weight": qkv, f"{b}attn.wo.weight": m.take(f"{h}self_attn.o_proj.weight", (d, H * D))}
    if cfg.n_experts:
        return {**sd, **moe_projections(m, h, b, cfg)}
    if fused:
        gate_up = m.take(f"{h}mlp.gate_up_proj.weight", (2 * f, d))
    else:
        gate_up = torch.cat([m.take(f"{h}mlp.gate_proj.weight", (f, d)), m.take(f"{h}mlp.up_proj.weight", (f, d))])
    return {**sd, f"{b}mlp.w_in.weight": gate_up, f"{b}mlp.w_out.weight": m.take(f"{h}mlp.down_proj.weight", (d, f))}


def _sliding_window(hf: dict) -> Tuple[Optional[int], Optional[list]]:
    """(the attention window W: a query sees the W latest keys, itself included; the layer_types when only some
    layers have it, else None), or (None, None): Mistral and Phi-3 (every layer), Qwen2 / Qwen3 with
    use_sliding_window (the layers from max_window_layers on, or as layer_types says), Gemma 2 (every other layer,
    the first included), Gemma 3 and OLMo 3 (all but every 6th / 4th layer)."""
    kind = hf.get("model_type")
    on = {"mistral": True, "mixtral": True, "phi3": True, "qwen2": False, "qwen3": False, "qwen3_moe": False,
          "qwen2_moe": False, "gemma2": True, "gemma3_text": True, "olmo3": True, "cohere2": True,
          "smollm3": False}.get(kind)
    if on is None or not hf.get("sliding_window") or not hf.get("use_sliding_window", on):
        return None, None
    types = _layer_types(hf)
    if types is not None and "sliding_attention" not in types:
        return None, None
    return int(hf["sliding_window"]), (None if types is None or set(types) == {"sliding_attention"} else list(types))


def _layer_types(hf: dict) -> Optional[list]:
    """Each layer's "sliding_attention" / "full_attention": config.json's layer_types, else the family's default
    pattern; None for families with one kind of layer (Mistral, Phi-3)."""
    kind, n = hf.get("model_type"), hf.get("num_hidden_layers", 0)
    if hf.get("layer_types") or kind not in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "gemma2", "gemma3_text",
                                             "olmo3", "cohere2", "smollm3"):
        return hf.get("layer_types")
    if kind == "gemma2":
        return ["full_attention" if i % 2 else "sliding_attention" for i in range(n)]
    if kind in ("gemma3_text", "olmo3", "cohere2"):  # 5 (OLMo 3, Cohere 2: 3) local layers to 1 global by default
        every = hf.get("sliding_window_pattern", 6 if kind == "gemma3_text" else 4)
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    if kind == "smollm3":  # windows on the NoPE layers
        return ["sliding_attention" if i in _nope_layers(hf) else "full_attention" for i in range(n)]
    return ["sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention" for i in range(n)]


def _nope_layers(hf: dict) -> list:
    """The layers without rotary positions: SmolLM3's no_rope_layers zeros (every 4th by default), Cohere 2's
    global (full-attention) layers."""
    kind, n = hf.get("model_type"), hf.get("num_hidden_layers", 0)
    if kind == "smollm3":
        flags = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                             for i in range(n)]
        return [i for i, rope in enumerate(flags) if not rope]
    if kind == "cohere2":
        return [i for i, t in enumerate(_layer_types(hf)) if t == "full_attention"]
    return []


def _layer_ropes(hf: dict) -> Tuple[dict, Optional[float]]:
    """(the rope dict of the full-attention layers, the rotary base of the sliding-window ones or None): Gemma 3's
    and OLMo 3's rope_parameters hold one dict per layer type; the windowed layers' rope must be unscaled."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "sliding_attention" not in rope and "full_attention" not in rope:
        if hf.get("model_type") != "gemma3_text":
            return rope, None
        return rope, float(hf.get("rope_local_base_freq", 1e4))
    local = rope.get("sliding_attention") or {}
    if _rope_scaling(local) is not None:
        raise CheckpointError("config.json: a scaled rope on the sliding-window layers is not supported")
    return rope.get("full_attention") or {}, float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))


def _rope_scaling(rope: dict) -> Optional[dict]:
    """GPTConfig.rope_scaling of an HF rope dict (rope_parameters / rope_scaling): None for the default rope."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported by GPT.from_hf (default, "
                              f"{', '.join(ROPE_SCALING_KEYS)})")
    scaling = {"rope_type": rope_type, **{k: rope.get(k) for k in ROPE_SCALING_KEYS[rope_type]}}
    try:
        check_rope_scaling(scaling, "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return scaling


LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "stablelm", "granite", "olmo", "olmo2", "olmo3",
                  "cohere", "cohere2", "smollm3")


def _from_llama(hf: dict, state, moe: Optional[dict] = None):
    """Llama and its relatives; ``moe``: a mixture-of-experts family's GPTConfig fields (gpt_hf_moe.moe_config).
    Returns (config, state dict, the sliding-window layers' own rotary base or None)."""
    moe = dict(moe or {})
    d_ff = moe.pop("d_ff", None) or hf["intermediate_size"]  # an expert's width (Qwen3-MoE's own)
    rope, local_theta = _layer_ropes(hf)  # (OLMo 3: one rope per layer type)
    scaling = _rope_scaling(rope)  # Llama 3.1 / 3.2: "llama3"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (a SwiGLU MLP needs 'silu')")
    kind = hf.get("model_type")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise CheckpointError(f"config.json: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                              "(one bias setting for every Linear)")
    # Qwen2: q / k / v projections with bias, the others without (Qwen2-MoE: as its qkv_bias says)
    qkv_bias = True if kind == "qwen2" else bool(hf.get("qkv_bias", True)) if kind == "qwen2_moe" else None
    stablelm = kind == "stablelm"  # LayerNorms with biases, optional q / k / v biases, optional parallel block
    for key in ("qk_layernorm", "use_qk_norm"):
        if hf.get(key):
            raise CheckpointError(f"config.json: {key}=true is not supported by GPT.from_hf (StableLM's / Cohere's "
                                  "per-head LayerNorms, one weight per head)")
    if stablelm:
        qkv_bias = bool(hf.get("use_qkv_bias", False))
    # Cohere: bias-free LayerNorms, attention and MLP in parallel on one norm, rotary pairs interleaved, scaled logits
    cohere = kind in ("cohere", "cohere2")  # Cohere 2: rotary positions on its sliding-window layers only
    if hf.get("clip_qkv") is not None:
        raise CheckpointError(f"config.json: clip_qkv={hf['clip_qkv']!r} (OLMo's clamped q / k / v) is not "
                              "supported by GPT.from_hf")
    olmo, olmo2 = kind == "olmo", kind in ("olmo2", "olmo3")  # OLMo: LayerNorms without parameters
    layernorm = stablelm or olmo or cohere
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    _, rot = rotary(hf, hf.get("head_dim") or d // H)  # Phi-4-mini: partial_rotary_factor 0.75
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["num_hidden_layers"], n_head=H,
                    n_kv_head=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or d // H,
                    d_ff=d_ff, max_seq_len=hf.get("max_position_embeddings", 2048),
                    norm="layernorm" if layernorm else "rmsnorm", norm_bias=stablelm if layernorm else None,
                    norm_eps=hf.get("layer_norm_eps", 1e-5) if layernorm else hf.get("rms_norm_eps", 1e-6),
                    parallel_block="one_norm" if cohere or stablelm and hf.get("use_parallel_residual") else None,
                    norm_first=True, mlp="swiglu", activation="silu",
                    pos="rotary", rope_theta=float(hf_get(rope, "rope_theta", default=hf.get("rope_theta", 1e4))),
                    tie_embeddings=hf.get("tie_word_embeddings", cohere), bias=attn_bias, qkv_bias=qkv_bias,
                    qk_norm=kind in ("qwen3", "qwen3_moe", "olmo2", "olmo3", "olmoe"),
                    qk_norm_full=kind in ("olmo2", "olmo3", "olmoe"), sandwich_norm=olmo2, input_norm=not olmo2,
                    rope_scaling=scaling, rotary_dim=rot, nope_layers=_nope_layers(hf) or None, **moe)
    m, f, D, Hk = KeyMap(state, ("model.", "")), cfg.d_ff, cfg.head_dim, cfg.n_kv_head
    norm_params = ("weight", "bias") if stablelm else ("weight",)

    def norm(key: str) -> Dict[str, Tensor]:  # one norm's parameters (OLMo's LayerNorms have none: weight 1)
        return {p: torch.ones(d) if olmo else m.take(f"{key}.{p}", (d,)) for p in norm_params}
    sd = {"tok_emb.weight": m.take("embed_tokens.weight", (cfg.vocab_size, d)),
          **{f"norm_f.{p}": t for p, t in norm("norm").items()}}
    # OLMo 2 / 3: each sublayer's output normalised (post_attention_ / post_feedforward_layernorm), not its input
    norms = (("post_norm1", "post_attention_layernorm"), ("post_norm2", "post_feedforward_layernorm")) if olmo2 else \
        (("norm1", "input_layernorm"),) + ((("norm2", "post_attention_layernorm"),) if cfg.parallel_block is None
                                           else ())
    qk_dims = (H * D, Hk * D) if cfg.qk_norm_full else (D, D)
    qk_rows = torch.cat([pair_rows(H, D, D), H * D + pair_rows(Hk, D, D), torch.arange((H + Hk) * D, (H + 2 * Hk) * D)])
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in norms:
            sd.update({f"{b}{ours}.{p}": t for p, t in norm(f"{h}{theirs}").items()})
        sd.update(_projections(m, h, b, cfg, fused=kind == "phi3"))
        if cfg.qk_norm:
            sd[f"{b}attn.q_norm.weight"] = m.take(f"{h}self_attn.q_norm.weight", qk_dims[:1])
            sd[f"{b}attn.k_norm.weight"] = m.take(f"{h}self_attn.k_norm.weight", qk_dims[1:])
        if cfg.bias or qkv_bias:
            sd[f"{b}attn.wqkv.bias"] = torch.cat([m.take(f"{h}self_attn.{n}_proj.bias", (s,))
                                                   for n, s in (("q", H * D), ("k", Hk * D), ("v", Hk * D))])
        if cfg.bias:
            sd[f"{b}attn.wo.bias"] = m.take(f"{h}self_attn.o_proj.bias", (d,))
            sd[f"{b}mlp.w_in.bias"] = torch.cat([m.take(f"{h}mlp.gate_proj.bias", (f,)),
                                                 m.take(f"{h}mlp.up_proj.bias", (f,))])
            sd[f"{b}mlp.w_out.bias"] = m.take(f"{h}mlp.down_proj.bias", (d,))
        if cohere:  # q and k rows into our rotary layout (its pairs are interleaved; no biases: refused above)
            sd[f"{b}attn.wqkv.weight"] = sd[f"{b}attn.wqkv.weight"][qk_rows]
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else \
        KeyMap(state).take("lm_head.weight", (cfg.vocab_size, d))
    if kind in ("granite", "granitemoe"):
        cfg, sd = _granite(hf, cfg, sd)
    if cohere:  # logits * logit_scale: the head is linear in the final norm's output, which has no bias
        sd["norm_f.weight"] = sd["norm_f.weight"].float() * float(hf.get("logit_scale", 0.0625))
    return cfg, sd, local_theta


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
