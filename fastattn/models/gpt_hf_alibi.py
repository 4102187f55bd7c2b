"""GPT.from_hf's importers for the ALiBi families (``pos="alibi"``): BLOOM and MPT. ALiBi has no position table, so
the context length is the caller's (``max_seq_len``: BLOOM's training length 2048 by default, MPT's config value).
Whatever a checkpoint sets that GPT cannot reproduce exactly is refused with a CheckpointError naming the setting."""
from typing import Dict

from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_get
from .gpt import GPTConfig
from .gpt_hf_parallel import reorder_qkv


def from_bloom(hf: dict, state):
    """BLOOM: a LayerNorm on the embeddings (``embed_norm``), q / k / v fused per head as GPT-NeoX's, tanh GELU, tied
    LM head."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError("config.json: apply_residual_connection_post_layernorm=true is not supported by "
                              "GPT.from_hf (the residual taken after the norm)")
    d, H, n = hf_get(hf, "hidden_size", "n_embed"), hf["n_head"], hf["n_layer"]
    if d is None:
        raise CheckpointError("config.json: key 'hidden_size' (or 'n_embed') is missing")
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=n, n_head=H, max_seq_len=2048,
                    norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                    activation="gelu_tanh", pos="alibi", tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                    bias=True, embed_norm=True)
    D, f, m = cfg.head_dim, cfg.d_ff, KeyMap(state, ("transformer.", ""))
    sd: Dict[str, Tensor] = {"tok_emb.weight": m.take("word_embeddings.weight", (cfg.vocab_size, d))}
    names = (("emb_norm", "word_embeddings_layernorm", (d,)), ("norm_f", "ln_f", (d,)))
    for i in range(n):
        h, b = f"h.{i}.", f"blocks.{i}."
        names += ((f"{b}attn.wqkv", f"{h}self_attention.query_key_value", (3 * d, d)),
                  (f"{b}attn.wo", f"{h}self_attention.dense", (d, d)), (f"{b}norm1", f"{h}input_layernorm", (d,)),
                  (f"{b}norm2", f"{h}post_attention_layernorm", (d,)),
                  (f"{b}mlp.w_in", f"{h}mlp.dense_h_to_4h", (f, d)), (f"{b}mlp.w_out", f"{h}mlp.dense_4h_to_h", (d, f)))
    for ours, theirs, shape in names:
        for p, shp in (("weight", shape), ("bias", shape[:1])):
            t = m.take(f"{theirs}.{p}", shp)
            sd[f"{ours}.{p}"] = reorder_qkv(t, "per_head", H, H, D) if ours.endswith("attn.wqkv") else t
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else KeyMap(state).take(
        "lm_head.weight", (cfg.vocab_size, d))
    return cfg, sd


def from_mpt(hf: dict, state):
    """MPT: ALiBi (slopes as BLOOM's when alibi_bias_max is 8, MPT's default), fused [q | k | v], no biases (LayerNorm
    weights only), exact GELU, tied LM head. Its other attention options (clip_qkv, qk_ln, a softmax_scale, prefix
    LM, learned positions instead of ALiBi) are refused."""
    attn = hf.get("attn_config") or {}
    for key, want in (("alibi", True), ("alibi_bias_max", 8), ("clip_qkv", None), ("qk_ln", False),
                      ("softmax_scale", None), ("prefix_lm", False), ("attn_uses_sequence_id", False)):
        if attn.get(key, want) != want:
            raise CheckpointError(f"config.json: attn_config.{key}={attn[key]!r} is not supported by GPT.from_hf "
                                  f"(MPT with {key}={want!r}; transformers' MPT uses alibi_bias_max 8 whatever the "
                                  "config says)")
    if hf.get("logit_scale") is not None:
        raise CheckpointError(f"config.json: logit_scale={hf['logit_scale']!r} is not supported by GPT.from_hf")
    if not hf.get("no_bias", True):
        raise CheckpointError("config.json: no_bias=false is not supported by GPT.from_hf (MPT without biases)")
    d, H, n = hf["d_model"], hf["n_heads"], hf["n_layers"]
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=n, n_head=H, d_ff=4 * d,
                    max_seq_len=hf.get("max_seq_len", 2048), norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", activation="gelu", pos="alibi",
                    tie_embeddings=bool(hf.get("tie_word_embeddings", True)), bias=False, norm_bias=False)
    f, m = cfg.d_ff, KeyMap(state, ("transformer.", ""))
    sd: Dict[str, Tensor] = {"tok_emb.weight": m.take("wte.weight", (cfg.vocab_size, d)),
                             "norm_f.weight": m.take("norm_f.weight", (d,))}
    for i in range(n):
        b = f"blocks.{i}."  # (MPT's names start alike)
        for ours, theirs, shape in (("attn.wqkv", "attn.Wqkv", (3 * d, d)), ("attn.wo", "attn.out_proj", (d, d)),
                                    ("norm1", "norm_1", (d,)), ("norm2", "norm_2", (d,)),
                                    ("mlp.w_in", "ffn.up_proj", (f, d)), ("mlp.w_out", "ffn.down_proj", (d, f))):
            sd[f"{b}{ours}.weight"] = m.take(f"{b}{theirs}.weight", shape)
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else KeyMap(state).take(
        "lm_head.weight", (cfg.vocab_size, d))
    return cfg, sd
