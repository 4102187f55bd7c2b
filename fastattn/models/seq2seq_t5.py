"""Seq2Seq.from_hf for T5 (v1.0, v1.1 / Flan-T5) and mT5: an HF config and state dict mapped onto Seq2SeqConfig and
Seq2Seq's state dict.

T5 is a pre-norm encoder-decoder with RMSNorms, no biases, unscaled attention scores (``attn_scale=1``), no absolute
positions but a relative-position bias per head (``relative_buckets``: one table per side, shared by its layers),
a ReLU or gated (GeGLU / SwiGLU) MLP, and ``head_dim`` (d_kv) of its own. Original T5 scales the decoder's output by
d_model ** -0.5 before the tied LM head: folded here into the decoder's final norm weight (the same product, so
inference is exact). Fine-tuning then trains the product where transformers trains the unscaled weight: the folded
weight gets a d_model ** 0.5 times larger gradient, so the effective weight moves differently (about d_model ** 0.5
times more per Adam step, d_model times more per SGD step; weight decay pulls it differently too). The token
embedding has no padding_idx here, as in transformers. Dropout: ``dropout`` is the checkpoint's dropout_rate (T5's
one rate); the dropouts T5 also has inside the MLP and after each side's final norm are not taken.
The decode step adds the decoder's bias itself (the flash kernel with it as a float mask; the split-KV kernel takes
none); in training the bias' gradient takes the reference attention (autograd through torch ops). T5's relative
positions have no length limit, but ``max_seq_len`` (the config's n_positions, else 512) still bounds the inputs:
``Seq2Seq.from_hf(path, max_seq_len=2048)`` lifts it.
"""
from typing import Dict, Tuple

import torch
from torch import Tensor

from .checkpoint import KeyMap, hf_activation
from .seq2seq import Seq2SeqConfig

FAMILIES = ("t5", "mt5")


def import_t5(hf: dict, state: Dict[str, Tensor], gen: dict, overrides: dict) -> Tuple[Seq2SeqConfig, dict]:
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = hf.get("dense_act_fn") or proj.split("-")[-1]
    ours = hf_activation("dense_act_fn", act)
    d, V = hf["d_model"], hf["vocab_size"]
    m = KeyMap(state)
    tok = m.take("shared.weight" if m.has("shared.weight") else "encoder.embed_tokens.weight", (V, d))
    tied = not m.has("lm_head.weight") or torch.equal(m.take("lm_head.weight", (V, d)), tok)
    # transformers 5 keeps T5's output scaling as scale_decoder_outputs; older configs said it with
    # tie_word_embeddings (v1.1 / Flan: false); mT5 (untied) never scales
    scale = hf.get("scale_decoder_outputs", hf.get("model_type") == "t5" and hf.get("tie_word_embeddings", True)
                   is not False)
    pad = hf.get("pad_token_id", 0)
    start = gen.get("decoder_start_token_id", hf.get("decoder_start_token_id"))
    eos = gen.get("eos_token_id", hf.get("eos_token_id", 1))
    base = dict(vocab_size=V, d_model=d, n_layer=hf["num_layers"],
                n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
                head_dim=hf["d_kv"], d_ff=hf["d_ff"], max_seq_len=hf.get("n_positions") or 512, norm="rmsnorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_first=True,
                mlp=("swiglu" if act == "silu" else "geglu") if gated else "gelu", activation=ours,
                pos="none", embed_norm=False, attn_scale=1.0, tie_embeddings=tied, bias=False, pad_token_id=pad,
                dropout=float(hf.get("dropout_rate", 0.1)),
                eos_token_id=eos,
                decoder_start_token_id=pad if start is None else start,
                relative_buckets=hf.get("relative_attention_num_buckets", 32),
                relative_max_distance=hf.get("relative_attention_max_distance", 128))
    cfg = Seq2SeqConfig.from_dict({**base, **overrides})
    return cfg, _state(cfg, m, tok, scale, gated)


def _state(cfg: Seq2SeqConfig, m: KeyMap, tok: Tensor, scale: bool, gated: bool) -> Dict[str, Tensor]:
    d, f, H, D = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.head_dim
    sd = {"tok_emb.weight": tok, "enc_norm_f.weight": m.take("encoder.final_layer_norm.weight", (d,)),
          "dec_norm_f.weight": m.take("decoder.final_layer_norm.weight", (d,)) * (d ** -0.5 if scale else 1.0)}
    for side, ours, n in (("encoder", "enc", cfg.n_layer), ("decoder", "dec", cfg.n_decoder_layer)):
        sd[f"{ours}_rel.weight"] = m.take(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                          (cfg.relative_buckets, H))
        for i in range(n):
            h, b = f"{side}.block.{i}.layer.", f"{side}.{i}."
            ff = 2 if side == "decoder" else 1  # the feed-forward sublayer's index
            sd[f"{b}attn.wqkv.weight"] = torch.cat([m.take(f"{h}0.SelfAttention.{x}.weight", (H * D, d))
                                                     for x in "qkv"])
            sd[f"{b}attn.wo.weight"] = m.take(f"{h}0.SelfAttention.o.weight", (d, H * D))
            sd[f"{b}norm1.weight"] = m.take(f"{h}0.layer_norm.weight", (d,))
            if side == "decoder":
                sd[f"{b}cross_attn.wq.weight"] = m.take(f"{h}1.EncDecAttention.q.weight", (H * D, d))
                sd[f"{b}cross_attn.wkv.weight"] = torch.cat([m.take(f"{h}1.EncDecAttention.{x}.weight", (H * D, d))
                                                             for x in "kv"])
                sd[f"{b}cross_attn.wo.weight"] = m.take(f"{h}1.EncDecAttention.o.weight", (d, H * D))
                sd[f"{b}norm_x.weight"] = m.take(f"{h}1.layer_norm.weight", (d,))
            dense = f"{h}{ff}.DenseReluDense."
            sd[f"{b}mlp.w_in.weight"] = torch.cat([m.take(f"{dense}wi_0.weight", (f, d)),
                                                   m.take(f"{dense}wi_1.weight", (f, d))]) if gated else \
                m.take(f"{dense}wi.weight", (f, d))
            sd[f"{b}mlp.w_out.weight"] = m.take(f"{dense}wo.weight", (d, f))
            sd[f"{b}norm2.weight"] = m.take(f"{h}{ff}.layer_norm.weight", (d,))
    sd["lm_head.weight"] = tok if cfg.tie_embeddings else m.take("lm_head.weight", (cfg.vocab_size, d))
    return sd
