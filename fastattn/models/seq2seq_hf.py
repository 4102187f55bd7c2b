"""Seq2Seq.from_hf's importer: a Hugging Face BART, mBART, Marian, Pegasus or M2M100 / NLLB folder (config.json,
generation_config.json, weights) mapped onto Seq2SeqConfig and Seq2Seq's state dict (T5 and mT5: seq2seq_t5.py).

BART and Marian are post-norm, mBART, Pegasus and M2M100 pre-norm with a final norm on each side; all may scale the
token embeddings by sqrt(d_model) (``embed_scale``) and add ``final_logits_bias`` to the logits (``lm_head_bias``,
when it is not all zeros). BART and mBART learn positions from row 2 of their tables (``pos_offset``) and normalise
the embeddings (``embed_norm``). Marian, Pegasus and M2M100 add fixed sinusoidal positions, sin and cos in two halves
(M2M100's with fairseq's frequencies, numbered over the real tokens past any padding from row pad + 1, the padding
on the zero row pad: ``roberta_positions``): the importer computes transformers' table and loads it as
the learned table, so inference matches; fine-tuning then trains it, where transformers keeps it fixed. Generation's
``forced_bos_token_id`` (BART-large-CNN's 0, mBART-50's language code) and ``forced_eos_token_id`` (BART's </s>,
the last token when max_new_tokens is reached) are read from generation_config.json or config.json. mBART's own
label shift (its last token, the language code, wrapped to the front) is not Seq2Seq's: fine-tuning mBART-cc25
through ``forward(labels=...)`` needs explicit ``decoder_input_ids``.

The token embedding's pad_token_id row gets no gradient from the lookups, as transformers' padding_idx
(``embed_padding_idx``). Dropout: Seq2SeqConfig has one probability (``dropout``: the embeddings, the attention
probabilities, each sublayer's output), set to the checkpoint's ``dropout`` (the hidden one); its attention_dropout
and activation_dropout (inside the MLP) and LayerDrop (encoder_layerdrop, decoder_layerdrop) are not taken.
``Seq2Seq.from_hf(path, dropout=p)`` sets another.
"""
import math
from typing import Dict, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_activation, read_generation_config, read_hf_folder
from .seq2seq import Seq2SeqConfig
from .seq2seq_t5 import FAMILIES as T5_FAMILIES
from .seq2seq_t5 import import_t5

FAMILIES = ("bart", "mbart", "marian", "pegasus", "m2m_100")
_SINUSOIDAL = ("marian", "pegasus", "m2m_100")
# ours -> HF's, in every layer of both sides; cross-attention in the decoder's
_LAYER = {"attn.wo": "self_attn.out_proj", "norm1": "self_attn_layer_norm", "mlp.w_in": "fc1", "mlp.w_out": "fc2",
          "norm2": "final_layer_norm"}
_CROSS = {"cross_attn.wq": "encoder_attn.q_proj", "cross_attn.wo": "encoder_attn.out_proj",
          "norm_x": "encoder_attn_layer_norm"}


def import_seq2seq(path: str, overrides: dict) -> Tuple[Seq2SeqConfig, Dict[str, Tensor]]:
    """(config with ``overrides`` applied, Seq2Seq state dict) of the HF folder at path."""
    hf, state = read_hf_folder(path)
    gen = read_generation_config(path)
    if hf.get("model_type") in T5_FAMILIES:
        return import_t5(hf, state, gen, overrides)
    bias = state.get("final_logits_bias")
    cfg = Seq2SeqConfig.from_dict({**_config(hf, gen),
                                   "lm_head_bias": bias is not None and bool(bias.any()), **overrides})
    return cfg, _state(cfg, KeyMap(state, ("model.", "")), KeyMap(state), bias, hf.get("model_type"))


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
    eos = generation("eos_token_id")  # an id or a list (generate's end tokens; the first: the start's fallback)
    eos = 2 if eos is None else eos
    start = generation("decoder_start_token_id")  # else bos (mBART's null), as transformers' generate falls back
    d = hf["d_model"]
    pad = 1 if hf.get("pad_token_id") is None else hf["pad_token_id"]
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["encoder_layers"],
                n_decoder_layer=hf["decoder_layers"], n_head=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"],
                max_seq_len=hf["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,
                norm_first=kind in ("mbart", "pegasus", "m2m_100"), mlp="gelu", activation=act, pos="learned",
                pos_offset=pad + 1 if kind == "m2m_100" else 0 if kind in _SINUSOIDAL else 2,
                roberta_positions=kind == "m2m_100",
                embed_norm=kind in ("bart", "mbart"), embed_scale=math.sqrt(d) if hf.get("scale_embedding") else 1.0,
                tie_embeddings=hf.get("tie_word_embeddings", True), bias=True, pad_token_id=pad, eos_token_id=eos,
                embed_padding_idx=hf.get("pad_token_id", pad) is not None, dropout=float(hf.get("dropout", 0.1)),
                decoder_start_token_id=next(t for t in (start, generation("bos_token_id"),
                                                        eos[0] if isinstance(eos, list) else eos) if t is not None),
                forced_bos_token_id=generation("forced_bos_token_id"),
                forced_eos_token_id=generation("forced_eos_token_id"))


def sinusoidal_halves(rows: int, d: int, fairseq: bool) -> Tensor:
    """transformers' fixed position table (rows, d) in float32: sin of every frequency in the first half, cos in the
    second; frequencies 10000^(-2i / d) (Marian, Pegasus: computed in float64, as its numpy code does) or fairseq's
    exp(-i log(10000) / (d / 2 - 1)) (M2M100, NLLB: in float32, as its torch code does, so that long positions'
    angles round alike). An odd d: Marian's last sin column, fairseq's zero column."""
    half, dt = d // 2, torch.float32 if fairseq else torch.float64
    i = torch.arange((d + 1) // 2 if not fairseq else half, dtype=dt)
    pos = torch.arange(rows, dtype=dt)[:, None]  # (fairseq multiplies by the frequency, Marian divides by 10000^x)
    angle = pos * torch.exp(i * -(math.log(10000.0) / (half - 1))) if fairseq else pos / 10000.0 ** (2 * i / d)
    table = torch.zeros(rows, d, dtype=dt)
    table[:, :angle.shape[1]] = torch.sin(angle)
    table[:, angle.shape[1]:angle.shape[1] + half] = torch.cos(angle[:, :half])
    return table.float()


def _state(cfg: Seq2SeqConfig, m: KeyMap, top: KeyMap, bias, kind: str) -> Dict[str, Tensor]:
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
        sd[f"{side}_pos.weight"] = sinusoidal_halves(rows, d, kind == "m2m_100") if kind in _SINUSOIDAL else \
            m.take(f"{hf_side}.embed_positions.weight", (rows, d))
        if cfg.roberta_positions:  # the padding's row
            sd[f"{side}_pos.weight"][cfg.pad_token_id] = 0.0
        for p in ("weight", "bias"):
            if cfg.embed_norm:
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
