"""Seq2Seq.from_hf's importer: a Hugging Face BART or mBART folder (config.json, generation_config.json, weights)
mapped onto Seq2SeqConfig and Seq2Seq's state dict (T5 and mT5: seq2seq_t5.py).

BART is post-norm, mBART pre-norm with a final norm on each side; both learn positions from row 2 of their tables
(``pos_offset``), normalise the embeddings (``embed_norm``), may scale them by sqrt(d_model) (``embed_scale``) and
add ``final_logits_bias`` to the logits (``lm_head_bias``, when it is not all zeros). Generation's
``forced_bos_token_id`` (BART-large-CNN's 0, mBART-50's language code) and ``forced_eos_token_id`` (BART's </s>,
the last token when max_new_tokens is reached) are read from generation_config.json or config.json. mBART's own
label shift (its last token, the language code, wrapped to the front) is not Seq2Seq's: fine-tuning mBART-cc25
through ``forward(labels=...)`` needs explicit ``decoder_input_ids``.
"""
import json
import math
import os
from typing import Dict, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_activation, read_hf_folder
from .seq2seq import Seq2SeqConfig
from .seq2seq_t5 import FAMILIES as T5_FAMILIES
from .seq2seq_t5 import import_t5

FAMILIES = ("bart", "mbart")
# ours -> HF's, in every layer of both sides; cross-attention in the decoder's
_LAYER = {"attn.wo": "self_attn.out_proj", "norm1": "self_attn_layer_norm", "mlp.w_in": "fc1", "mlp.w_out": "fc2",
          "norm2": "final_layer_norm"}
_CROSS = {"cross_attn.wq": "encoder_attn.q_proj", "cross_attn.wo": "encoder_attn.out_proj",
          "norm_x": "encoder_attn_layer_norm"}


def import_seq2seq(path: str, overrides: dict) -> Tuple[Seq2SeqConfig, Dict[str, Tensor]]:
    """(config with ``overrides`` applied, Seq2Seq state dict) of the HF folder at path."""
    hf, state = read_hf_folder(path)
    gen = _generation_config(path)
    if hf.get("model_type") in T5_FAMILIES:
        return import_t5(hf, state, gen, overrides)
    bias = state.get("final_logits_bias")
    cfg = Seq2SeqConfig.from_dict({**_config(hf, gen),
                                   "lm_head_bias": bias is not None and bool(bias.any()), **overrides})
    return cfg, _state(cfg, KeyMap(state, ("model.", "")), KeyMap(state), bias)


def _generation_config(path: str) -> dict:
    p = os.path.join(path, "generation_config.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not readable JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _config(hf: dict, gen: dict) -> dict:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise CheckpointError(f"config.json: model_type {kind!r} is not supported by Seq2Seq.from_hf "
                              f"({', '.join(FAMILIES + T5_FAMILIES)})")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(enc) != hf.get(dec):
            raise CheckpointError(f"config.json: {enc} {hf.get(enc)} != {dec} {hf.get(dec)}; Seq2Seq has one value "
                                  "for both sides")
    act = hf_activation("activation_function", hf.get("activation_function", "gelu"))

    def generation(name):  # generation_config.json first, as transformers' generate reads it
        return gen.get(name, hf.get(name))
    eos = generation("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else 2 if eos is None else eos
    start = generation("decoder_start_token_id")
    d = hf["d_model"]
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["encoder_layers"],
                n_decoder_layer=hf["decoder_layers"], n_head=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"],
                max_seq_len=hf["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,
                norm_first=kind == "mbart", mlp="gelu", activation=act, pos="learned", pos_offset=2,
                embed_norm=True, embed_scale=math.sqrt(d) if hf.get("scale_embedding") else 1.0,
                tie_embeddings=hf.get("tie_word_embeddings", True), bias=True,
                pad_token_id=1 if hf.get("pad_token_id") is None else hf["pad_token_id"], eos_token_id=eos,
                decoder_start_token_id=eos if start is None else start,
                forced_bos_token_id=generation("forced_bos_token_id"),
                forced_eos_token_id=generation("forced_eos_token_id"))


def _state(cfg: Seq2SeqConfig, m: KeyMap, top: KeyMap, bias) -> Dict[str, Tensor]:
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    tok = m.take("shared.weight" if m.has("shared.weight") else "encoder.embed_tokens.weight", (V, d))
    for side in ("encoder", "decoder"):  # Seq2Seq has one token embedding (transformers 5 unties them with lm_head)
        key = f"{side}.embed_tokens.weight"
        if m.has(key) and not torch.equal(m.take(key, (V, d)), tok):
            raise CheckpointError(f"checkpoint key {key!r} differs from the shared token embedding; Seq2Seq shares "
                                  "one between the encoder and the decoder")
    rows = cfg.max_seq_len + cfg.pos_offset
    sd = {"tok_emb.weight": tok}
    shapes = {"attn.wo": (d, d), "norm1": (d,), "mlp.w_in": (f, d), "mlp.w_out": (d, f), "norm2": (d,),
              "cross_attn.wq": (d, d), "cross_attn.wo": (d, d), "norm_x": (d,)}
    for side in ("enc", "dec"):
        hf_side = "encoder" if side == "enc" else "decoder"
        sd[f"{side}_pos.weight"] = m.take(f"{hf_side}.embed_positions.weight", (rows, d))
        for p in ("weight", "bias"):
            sd[f"{side}_embed_norm.{p}"] = m.take(f"{hf_side}.layernorm_embedding.{p}", (d,))
            if cfg.norm_first:
                sd[f"{side}_norm_f.{p}"] = m.take(f"{hf_side}.layer_norm.{p}", (d,))
        n = cfg.n_layer if side == "enc" else cfg.n_decoder_layer
        names = {**_LAYER, **(_CROSS if side == "dec" else {})}
        for i in range(n):
            h, b = f"{hf_side}.layers.{i}.", f"{hf_side}.{i}."
            for p in ("weight", "bias"):
                shape = (lambda s: s) if p == "weight" else (lambda s: s[:1])
                sd[f"{b}attn.wqkv.{p}"] = torch.cat([m.take(f"{h}self_attn.{x}_proj.{p}", shape((d, d)))
                                                      for x in "qkv"])
                if side == "dec":
                    sd[f"{b}cross_attn.wkv.{p}"] = torch.cat([m.take(f"{h}encoder_attn.{x}_proj.{p}", shape((d, d)))
                                                              for x in "kv"])
                for ours, theirs in names.items():
                    sd[f"{b}{ours}.{p}"] = m.take(f"{h}{theirs}.{p}", shape(shapes[ours]))
    sd["lm_head.weight"] = tok if cfg.tie_embeddings else top.take("lm_head.weight", (V, d))
    if cfg.lm_head_bias:
        if bias is None or tuple(bias.shape) != (1, V):
            raise CheckpointError(f"checkpoint key 'final_logits_bias': shape "
                                  f"{None if bias is None else tuple(bias.shape)}, expected (1, {V})")
        sd["lm_head.bias"] = bias[0]
    return sd
