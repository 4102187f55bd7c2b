"""GPT.from_hf's importers: a Hugging Face config.json and state dict mapped onto GPTConfig and GPT's state dict,
per family: GPT-2 and GPT-BigCode, OPT, Gemma 1 / 2 / 3 and VaultGemma here; Llama and the families built like it in
gpt_hf_llama.py (their mixtures of experts' experts in gpt_hf_moe.py); GPT-NeoX / Pythia, Phi-1 / 1.5 / 2, Falcon
and GPT-J in gpt_hf_parallel.py; BLOOM and MPT in gpt_hf_alibi.py.
Whatever a family sets that GPT cannot reproduce exactly is refused with a CheckpointError naming the setting.

Dropout: GPTConfig has one probability (``dropout``: the embeddings, the attention probabilities, each sublayer's
output), set to the family's hidden (residual) dropout (_DROPOUT: GPT-2's resid_pdrop, OPT's dropout, GPT-NeoX's
hidden_dropout, ...); the attention (attn_pdrop, attention_dropout) and embedding (embd_pdrop) rates are not taken.
Families with no residual dropout (Llama's and Gemma's, whose only one is attention_dropout) import with 0.
``GPT.from_hf(path, dropout=p)`` sets another."""
from typing import Dict, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, HFConfig, KeyMap, hf_get, read_generation_config, read_hf_folder
from .gpt import GPTConfig
from .gpt_hf_parallel import ACT
from .gpt_hf_alibi import from_bloom, from_mpt
from .gpt_hf_llama import LLAMA_FAMILIES, from_llama, projections
from .gpt_hf_moe import MOE_FAMILIES, moe_config
from .gpt_hf_parallel import from_gptj, from_parallel, reorder_qkv
from .gpt_hf_positions import layer_ropes, rope_scaling, sliding_window


GPT_HF_TYPES = ("gpt2", "gpt_bigcode", "opt", "gemma", "gemma2", "gemma3_text", "vaultgemma") + LLAMA_FAMILIES + \
    MOE_FAMILIES + ("gpt_neox", "phi", "falcon", "gptj", "bloom", "mpt")  # the model_types import_gpt reads

# transformers' config class defaults (transformers.<Family>Config()) of the keys that change the model where they
# differ from the importers' own fallbacks: filled in where config.json lacks them, as transformers reads it (without
# needing transformers; tests/test_hf_import_defaults.py checks each entry against its config class)
_WINDOW = {"sliding_window": 4096}
_LONG = {"max_position_embeddings": 131072}
_QWEN = {"max_position_embeddings": 32768, "sliding_window": 4096}  # (the window where use_sliding_window is on)
_GLM = {**_LONG, "rms_norm_eps": 1.5625e-07, "partial_rotary_factor": 0.5}
_SOFTCAPS = {**_WINDOW, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
HF_DEFAULTS = {
    "mistral": {**_LONG, **_WINDOW}, "ministral": {**_LONG, **_WINDOW},
    **dict.fromkeys(("qwen2", "qwen3", "qwen2_moe"), {**_QWEN, "max_window_layers": 28}), "qwen3_moe": _QWEN,
    "phi3": {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "stablelm": {"max_position_embeddings": 4096, "partial_rotary_factor": 0.25},
    "olmo2": {"rms_norm_eps": 1e-5}, "olmo3": {"rms_norm_eps": 1e-5, "rope_theta": 5e5, **_WINDOW},
    "cohere": {"max_position_embeddings": 8192, "rope_theta": 5e5, "tie_word_embeddings": True},
    "cohere2": {"max_position_embeddings": 8192, "tie_word_embeddings": True, **_WINDOW},
    "smollm3": {"max_position_embeddings": 32768, "rope_theta": 2e6, "tie_word_embeddings": True},
    "exaone4": {"rms_norm_eps": 1e-5, **_WINDOW},
    "helium": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-8, "rope_theta": 1e5},
    "ernie4_5": {**_LONG, "rms_norm_eps": 1e-5, "rope_theta": 5e5, "tie_word_embeddings": True},
    "glm": _GLM, "glm4": _GLM, "seed_oss": {"max_position_embeddings": 524288},
    "starcoder2": {"max_position_embeddings": 4096, "tie_word_embeddings": True},
    "nemotron": {"max_position_embeddings": 4096, "partial_rotary_factor": 0.5},
    "arcee": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, "hunyuan_v1_dense": {"rms_norm_eps": 1e-5},
    "mixtral": {**_LONG, "rms_norm_eps": 1e-5, "rope_theta": 1e6},
    "olmoe": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.01},
    "gpt_neox": {"rotary_pct": 0.25}, "phi": {"partial_rotary_factor": 0.5}, "gptj": {"rotary_dim": 64},
    "gemma2": _SOFTCAPS, "vaultgemma": _SOFTCAPS,
    "gemma3_text": {**_LONG, "rope_theta": 1e6, **_WINDOW}}


# each family's hidden (residual) dropout: its config.json key and transformers' default (MPT: attn_config's
# attn_pdrop, which transformers' MPT drops its residuals at); any other family has none
_DROPOUT = {"gpt2": ("resid_pdrop", 0.1), "gpt_bigcode": ("resid_pdrop", 0.1), "opt": ("dropout", 0.1),
            "phi": ("resid_pdrop", 0.0), "phi3": ("resid_pdrop", 0.0), "gptj": ("resid_pdrop", 0.0),
            "gpt_neox": ("hidden_dropout", 0.0), "falcon": ("hidden_dropout", 0.0), "bloom": ("hidden_dropout", 0.0),
            "stablelm": ("hidden_dropout", 0.0), "seed_oss": ("residual_dropout", 0.1),
            "starcoder2": ("residual_dropout", 0.0)}

# the families whose token embedding has no padding_idx; and transformers' pad_token_id defaults, where not None
_NO_PADDING_IDX = ("gpt2", "gpt_bigcode", "gpt_neox", "falcon", "gptj", "bloom", "mpt")
_PAD = {"opt": 1, "olmo": 1, "olmo2": 1, "olmo3": 1, "olmoe": 1, "seed_oss": 1, "helium": 3, "phi3": 32000,
        "smollm3": 128004, "glm": 151329, "glm4": 151329,
        **dict.fromkeys(("gemma", "gemma2", "gemma3_text", "vaultgemma", "cohere", "cohere2", "ernie4_5",
                         "hunyuan_v1_dense"), 0)}


def hidden_dropout(hf: dict, kind: str) -> float:
    """The checkpoint's hidden (residual) dropout (_DROPOUT), 0 for a family without one."""
    if kind == "mpt":
        return float((hf.get("attn_config") or {}).get("attn_pdrop", 0.0))
    key, default = _DROPOUT.get(kind, (None, 0.0))
    v = None if key is None else hf.get(key, default)
    return 0.0 if v is None else float(v)


def import_gpt(path: str, overrides: dict) -> Tuple[GPTConfig, Dict[str, Tensor]]:
    """(config with ``overrides`` applied, GPT state dict) of the HF folder at path."""
    hf, state = read_hf_folder(path)
    kind, local_theta = hf.get("model_type"), None
    hf = HFConfig({**HF_DEFAULTS.get(kind, {}), **hf})
    if kind in ("gpt2", "gpt_bigcode"):
        cfg, sd = _from_gpt2(hf, state)
    elif kind in LLAMA_FAMILIES:
        cfg, sd, local_theta = from_llama(hf, state)
    elif kind in MOE_FAMILIES:
        cfg, sd, local_theta = from_llama(hf, state, moe_config(hf))
    elif kind in ("gemma", "gemma2", "gemma3_text", "vaultgemma"):
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
        raise CheckpointError(f"{path}: model_type {kind!r} is not supported by GPT.from_hf "
                              f"({', '.join(GPT_HF_TYPES)})")
    if hf.get("tie_word_embeddings") is False and cfg.tie_embeddings:  # a family importer must never tie it
        raise CheckpointError(f"{path}: tie_word_embeddings is false, and the {kind} import would tie the head")
    window, types = sliding_window(hf)
    if local_theta is not None and window is not None:  # Gemma 3, OLMo 3: the windowed layers' rotary base
        overrides = {"rope_local_theta": local_theta, **overrides}
    max_len = overrides.get("max_seq_len", cfg.max_seq_len)
    if window is not None and "sliding_window" not in overrides and (
            window < max_len or overrides.get("rope_local_theta") is not None):
        # (a window of >= max_seq_len keys cuts nothing: then none is set, unless it marks Gemma 3's local layers)
        overrides = {"sliding_window": window, "layer_types": types, **overrides}
    eos = read_generation_config(path).get("eos_token_id", hf.get("eos_token_id"))
    overrides = {"eos_token_id": _eos(eos, cfg.vocab_size), "dropout": hidden_dropout(hf, kind),
                 "padding_idx": padding_idx(hf, kind, cfg.vocab_size), **overrides}
    return GPTConfig.from_dict({**cfg.to_dict(), **overrides}), sd


def padding_idx(hf: dict, kind: str, vocab_size: int):
    """The token embedding's padding_idx as transformers builds it: pad_token_id (its config class's default where
    config.json lacks it: _PAD) in the families whose embedding takes one; None for the others (_NO_PADDING_IDX)
    and for an id past the vocabulary (which transformers' embedding would refuse)."""
    pad = None if kind in _NO_PADDING_IDX else hf.get("pad_token_id", _PAD.get(kind))
    return pad if _in_vocab(pad, vocab_size) else None


def _in_vocab(i, vocab_size: int) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size


def _eos(eos, vocab_size: int):
    """The end token(s) generate stops at by default, as transformers reads them (an id or a list); ids past the
    vocabulary (a tiny test config's GPT-2 50256) can never be generated: left out."""
    ids = [e for e in (eos if isinstance(eos, list) else [eos]) if _in_vocab(e, vocab_size)]
    return None if not ids else ids[0] if len(ids) == 1 and not isinstance(eos, list) else ids


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
    query_pre_attn_scalar and a sliding window on every other layer (import_gpt sets it from sliding_window);
    Gemma 3 has q / k norms, no softcaps, and the windowed layers' own rotary base; VaultGemma is Gemma 2 without the
    norms on the sublayers' outputs."""
    kind = hf.get("model_type")
    vault = kind == "vaultgemma"
    two, three = kind == "gemma2" or vault, kind == "gemma3_text"
    if three and hf.get("use_bidirectional_attention"):
        raise CheckpointError("config.json: use_bidirectional_attention=true (an embedding model) is not supported "
                              "by GPT.from_hf")
    # transformers reads Gemma's legacy hidden_act "gelu" as the tanh approximation, as the official models mean it
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GEMMA_ACT:
        raise CheckpointError(f"config.json: hidden_activation {act!r} is not supported ({sorted(_GEMMA_ACT)})")
    rope, local_theta = layer_ropes(hf)
    d, H, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=L, n_head=H,
                    n_kv_head=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or d // H,
                    d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 8192), norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6), norm_first=True, mlp="geglu", activation=_GEMMA_ACT[act],
                    pos="rotary", rope_theta=float(hf_get(rope, "rope_theta", default=hf.get("rope_theta", 1e4))),
                    rope_scaling=rope_scaling(rope, hf), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                    bias=bool(hf.get("attention_bias", False)), embed_scale=d ** 0.5,
                    sandwich_norm=(two or three) and not vault,
                    qk_norm=three,
                    # (Gemma 3's config keeps attn_logit_softcapping, which its model in transformers never applies)
                    attn_softcap=0.0 if three else float(hf.get("attn_logit_softcapping") or 0.0),
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
    names = names[:2] if vault else names
    for i in range(L):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in names:
            sd[f"{b}{ours}.weight"] = norm(f"{h}{theirs}.weight")
        if three:
            sd[f"{b}attn.q_norm.weight"] = norm(f"{h}self_attn.q_norm.weight", D)
            sd[f"{b}attn.k_norm.weight"] = norm(f"{h}self_attn.k_norm.weight", D)
        sd.update(projections(m, h, b, cfg))
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else \
        KeyMap(state).take("lm_head.weight", (cfg.vocab_size, d))
    return cfg, sd, local_theta
