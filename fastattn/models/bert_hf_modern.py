"""ModernBERT for BERT.from_hf / BERTForSequenceClassification.from_hf (bert_hf.py calls these).

What it changes from BERT, and how BERTConfig says it: pre-norm blocks (``norm_first``) whose first attention reads
the normalised embeddings directly (``first_input_norm=False``), no positions added to the tokens but rotary ones
(global layers' base and local layers' own: ``rope_theta``, ``rope_local_theta``), every third layer global and the
others attending to the keys at most local_attention / 2 away on either side (``sliding_window`` = that + 1,
``layer_types``), a GeGLU MLP (``mlp="geglu"``), no biases (``bias``, ``norm_bias``, ``head_bias``), and a
classifier head of dense, gelu and LayerNorm over the [CLS] state or the real tokens' mean (``pooler_norm``,
``pooling``)."""
from typing import Dict

from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_activation
from .gpt_hf_positions import layer_ropes


def modernbert_config(hf: dict) -> dict:
    """BERTConfig fields of a ModernBERT config.json (transformers 5's layer_types / rope_parameters, or the older
    global_attn_every_n_layers / global_rope_theta / local_rope_theta)."""
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise CheckpointError(f"config.json: attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is not "
                              "supported (one bias setting for every Linear)")
    act = hf_activation("hidden_activation", hf.get("hidden_activation", "gelu"))
    head = hf.get("classifier_activation", "gelu")
    if head != hf.get("hidden_activation", "gelu") or act not in ("gelu", "gelu_tanh"):
        raise CheckpointError(f"config.json: hidden_activation {hf.get('hidden_activation')!r} with "
                              f"classifier_activation {head!r} is not supported (both 'gelu')")
    n = hf["num_hidden_layers"]
    every = hf.get("global_attn_every_n_layers", 3)
    types = hf.get("layer_types") or ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    rope, local = layer_ropes(hf)
    windowed = "sliding_attention" in types
    pad = hf.get("pad_token_id", 50283)  # (transformers' default)
    return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=n, n_head=hf["num_attention_heads"],
                d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 8192), norm="layernorm",
                norm_eps=hf.get("norm_eps", 1e-5), norm_bias=bool(hf.get("norm_bias", False)), norm_first=True,
                first_input_norm=False, mlp="geglu", activation=act, pos="rotary",
                rope_theta=float(rope.get("rope_theta", hf.get("global_rope_theta", 160_000.0))),
                rope_local_theta=float(local if local is not None else hf.get("local_rope_theta", 10_000.0))
                if windowed else None,
                sliding_window=hf.get("local_attention", 128) // 2 + 1 if windowed else None,
                layer_types=list(types) if windowed else None, bias=bias, type_vocab_size=0,
                tie_embeddings=hf.get("tie_word_embeddings", True), pooling=hf.get("classifier_pooling", "cls"),
                pooler_norm=True, pooler_activation=head, head_bias=bool(hf.get("classifier_bias", False)),
                pad_token_id=pad if pad is not None else 0, embed_padding_idx=pad is not None,
                dropout=float(hf.get("mlp_dropout", 0.0)))  # (the MLP's residual dropout; bert_hf.hidden_dropout)


def modernbert_encoder_state(cfg, m: KeyMap) -> Dict[str, Tensor]:
    """Our encoder's state dict from ModernBERT's keys (model.embeddings / layers / final_norm)."""
    d, f, e = cfg.d_model, cfg.d_ff, "encoder."
    norm = ("weight", "bias") if cfg.norm_bias else ("weight",)
    lin = ("weight", "bias") if cfg.bias else ("weight",)
    sd = {e + "tok_emb.weight": m.take("embeddings.tok_embeddings.weight", (cfg.vocab_size, d)),
          **{f"{e}embed_norm.{p}": m.take(f"embeddings.norm.{p}", (d,)) for p in norm},
          **{f"{e}norm_f.{p}": m.take(f"final_norm.{p}", (d,)) for p in norm}}
    names = {"attn.wqkv": ("attn.Wqkv", (3 * d, d)), "attn.wo": ("attn.Wo", (d, d)),
             "mlp.w_in": ("mlp.Wi", (2 * f, d)), "mlp.w_out": ("mlp.Wo", (d, f))}
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"{e}blocks.{i}."
        for ours, (theirs, shape) in names.items():
            sd.update({f"{b}{ours}.{p}": m.take(f"{h}{theirs}.{p}", shape if p == "weight" else shape[:1])
                       for p in lin})
        for ours, theirs in (("norm1", "attn_norm"), ("norm2", "mlp_norm"))[0 if i else 1:]:
            sd.update({f"{b}{ours}.{p}": m.take(f"{h}{theirs}.{p}", (d,)) for p in norm})
    return sd
