"""Import of HF BERT-family checkpoints into fastattn.models.BERT / BERTForSequenceClassification: BERT, RoBERTa
(and XLM-RoBERTa, CamemBERT: the same model), DistilBERT, ELECTRA, ALBERT, DeBERTa-v2 / v3, MPNet, ModernBERT
(bert_hf_modern.py).

How they differ from BERT, and how the config says it:
- RoBERTa numbers positions past its padding tokens from table row pad_token_id + 1 (``roberta_positions``,
  ``pos_offset``; its max_position_embeddings counts the rows before them). Its classifier reads h[:, 0] through
  dense, tanh, out_proj (our pooler and classifier; transformers adds a dropout before dense, in training only).
- DistilBERT has no token types (``type_vocab_size=0``), no pooler, and a relu "pre_classifier"
  (``pooler_activation="relu"``). Its sinusoidal position table, when it has one, loads frozen, as transformers
  keeps it.
- ELECTRA is BERT's encoder; its classifier reads h[:, 0] through dense, gelu, out_proj (``pooler_activation=
  "gelu"``), its generator's MLM head is BERT's with gelu. A discriminator (ElectraForPreTraining) has neither: they
  start at random init (fine-tuning), with a warning. ELECTRA-small's embeddings are narrower than its layers
  (``embed_dim``, projected up by ``embed_proj``).
- ALBERT: narrower embeddings too, and one layer used at every depth (``shared_layers``); its sentence-order head
  is not BERT's next-sentence head (that one starts at random init, with a warning).
- DeBERTa-v2 / v3 add disentangled attention (``rel_pos_buckets``, ``rel_pos_max``: models/disentangled.py) and
  usually drop the absolute positions (position_biased_input false: ``pos="none"``); the pooler reads h[:, 0]
  through dense and gelu. Refused by name: attention without both position terms, unshared position projections,
  the convolution of DeBERTa-v2-xlarge, relative embeddings without their LayerNorm.
- MPNet is RoBERTa (its positions, MLM head and classifier) without token types, plus T5's relative-position bias
  (``relative_buckets``: one table shared by the layers, both directions, distances up to 128).

Every family: the token embedding's pad_token_id row gets no gradient from the lookups, as transformers' padding_idx
(``embed_padding_idx``). Dropout: BERTConfig has one probability (``dropout``: the embeddings, the attention
probabilities, each sublayer's output, the pooled output before the classifier), set to the checkpoint's hidden
dropout (hidden_dropout_prob; DistilBERT's dropout; ModernBERT's mlp_dropout). Not taken, those places dropping at
that one rate: the attention rates (attention_probs_dropout_prob, attention_dropout), ModernBERT's
embedding_dropout, the classifier's (classifier_dropout, cls_dropout, seq_classif_dropout, ALBERT's
classifier_dropout_prob) and DeBERTa's pooler_dropout. ``from_hf(path, dropout=p)`` sets another.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import Tensor

from .bert_hf_modern import modernbert_config, modernbert_encoder_state
from .checkpoint import CheckpointError, KeyMap, hf_activation, load_mapped, place, read_hf_folder

log = logging.getLogger("fastattn")

FAMILIES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
            "distilbert": "distilbert", "electra": "electra", "modernbert": "modernbert", "deberta-v2": "deberta",
            "mpnet": "mpnet", "albert": "albert"}
_PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.", "electra": "electra.",
           "modernbert": "model.", "deberta": "deberta.", "mpnet": "mpnet.", "albert": "albert."}
# per layer: HF's layer prefix, its q / k / v, and ours -> its name for the rest
_BERT_LAYER = ("encoder.layer.{}.", ("attention.self.query", "attention.self.key", "attention.self.value"),
               {"attn.wo": "attention.output.dense", "norm1": "attention.output.LayerNorm",
                "mlp.w_in": "intermediate.dense", "mlp.w_out": "output.dense", "norm2": "output.LayerNorm"})
_LAYER = {"bert": _BERT_LAYER, "roberta": _BERT_LAYER, "electra": _BERT_LAYER,
          "deberta": (_BERT_LAYER[0], tuple(n + "_proj" for n in _BERT_LAYER[1]), _BERT_LAYER[2]),
          "mpnet": (_BERT_LAYER[0], ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
                    {**_BERT_LAYER[2], "attn.wo": "attention.attn.o", "norm1": "attention.LayerNorm"}),
          # (one layer for every depth: the same keys for each)
          "albert": ("encoder.albert_layer_groups.0.albert_layers.0.", ("attention.query", "attention.key",
                                                                        "attention.value"),
                     {"attn.wo": "attention.dense", "norm1": "attention.LayerNorm", "mlp.w_in": "ffn",
                      "mlp.w_out": "ffn_output", "norm2": "full_layer_layer_norm"}),
          "distilbert": ("transformer.layer.{}.", ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                         {"attn.wo": "attention.out_lin", "norm1": "sa_layer_norm", "mlp.w_in": "ffn.lin1",
                          "mlp.w_out": "ffn.lin2", "norm2": "output_layer_norm"})}
# the MLM head (top-level keys): dense, norm, the vocabulary bias, the untied vocabulary weight
_MLM = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias",
                 "cls.predictions.decoder.weight"),
        "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder.weight"),
        "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector.bias", "vocab_projector.weight"),
        "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias",
                    "generator_lm_head.weight"),
        "deberta-lm": tuple(f"lm_predictions.lm_head.{n}" for n in ("dense", "LayerNorm", "bias", "decoder.weight"))}
# the hidden dropout's key where it is not hidden_dropout_prob, and transformers' default where that is not 0.1
_DROPOUT = {"albert": ("hidden_dropout_prob", 0.0), "distilbert": ("dropout", 0.1)}
_MLM["deberta"] = _MLM["bert"]  # (legacy; "deberta-lm": DeBERTa's legacy false)
_MLM["mpnet"] = _MLM["roberta"]
_MLM["albert"] = ("predictions.dense", "predictions.LayerNorm", "predictions.bias", "predictions.decoder.weight")
_MLM["modernbert"] = ("head.dense", "head.norm", "decoder.bias", "decoder.weight")
# the sentence-level heads, ours -> (HF's name, under the family's prefix?); absent: random init with a warning
_HEADS = {"pretraining": {"bert": {"pooler.dense": ("pooler.dense", True), "nsp_head": ("cls.seq_relationship", False)},
                          "roberta": {"pooler.dense": ("pooler.dense", True)},
                          "distilbert": {}, "electra": {}, "modernbert": {}, "deberta": {},
                          "mpnet": {"pooler.dense": ("pooler.dense", True)},
                          "albert": {"pooler.dense": ("pooler", True)}},
          "classify": {"bert": {"pooler.dense": ("pooler.dense", True), "classifier": ("classifier", False)},
                       "roberta": {"pooler.dense": ("classifier.dense", False),
                                   "classifier": ("classifier.out_proj", False)},
                       "distilbert": {"pooler.dense": ("pre_classifier", False), "classifier": ("classifier", False)},
                       "electra": {"pooler.dense": ("classifier.dense", False),
                                   "classifier": ("classifier.out_proj", False)},
                       "modernbert": {"pooler.dense": ("head.dense", False), "pooler.norm": ("head.norm", False),
                                      "classifier": ("classifier", False)},
                       "deberta": {"pooler.dense": ("pooler.dense", False), "classifier": ("classifier", False)},
                       "mpnet": {"pooler.dense": ("classifier.dense", False),
                                 "classifier": ("classifier.out_proj", False)},
                       "albert": {"pooler.dense": ("pooler", True), "classifier": ("classifier", False)}}}


def load_bert(model_class, path: str, dtype: Optional[torch.dtype], device, overrides: dict, heads: str):
    """model_class (BERT or BERTForSequenceClassification) with the weights of the HF folder at path, in eval mode;
    ``heads``: "pretraining" (the MLM head must be there) or "classify"."""
    hf, state = read_hf_folder(path)
    kind = hf.get("model_type") or "bert"
    if kind not in FAMILIES:
        raise CheckpointError(f"config.json: model_type {kind!r} is not supported by from_hf ({', '.join(FAMILIES)})")
    family = FAMILIES[kind]
    if heads == "classify":
        overrides.setdefault("num_labels", hf.get("num_labels", len(hf.get("id2label") or {}) or 2))
        overrides.setdefault("problem_type", hf.get("problem_type"))
    modern = family == "modernbert"
    cfg = model_class.config_class.from_dict({**(modernbert_config(hf) if modern else _config(hf, family)),
                                              **overrides})
    m, top = KeyMap(state, (_PREFIX[family], "")), KeyMap(state)
    sd = modernbert_encoder_state(cfg, m) if modern else _encoder_state(cfg, family, m)
    if heads == "pretraining":
        tok = sd["encoder.tok_emb.weight"]
        mlm = "deberta-lm" if family == "deberta" and not hf.get("legacy", True) else family
        sd.update(_mlm_head(cfg, mlm, top, tok, decoder_bias=hf.get("decoder_bias", True)))
    model = place(model_class(cfg), dtype, device)
    own, missing, none = model.state_dict(), [], []
    for ours, (theirs, prefixed) in _HEADS[heads][family].items():
        keymap = m if prefixed else top
        for p in ("weight", "bias"):
            if f"{ours}.{p}" not in own:  # (bias-free heads: ModernBERT's)
                continue
            want = own[f"{ours}.{p}"]
            if keymap.has(f"{theirs}.{p}"):
                sd[f"{ours}.{p}"] = keymap.take(f"{theirs}.{p}", tuple(want.shape))
            else:
                sd[f"{ours}.{p}"] = want
                missing.append(f"{theirs}.{p}")
    for name in sorted(set(own) - set(sd)):  # heads this family has no weights for (NSP of RoBERTa)
        if not name.startswith("encoder."):
            sd[name] = own[name]
            none.append(name)
    if missing or none:
        log.warning("from_hf: left at random init: %s", "; ".join(
            ([", ".join(missing) + " (not in the checkpoint)"] if missing else []) +
            ([", ".join(none) + f" (a {kind} checkpoint has none)"] if none else [])))
    load_mapped(model, sd)
    if family == "distilbert" and hf.get("sinusoidal_pos_embds"):
        model.encoder.pos.weight.requires_grad_(False)
    return model.eval()  # as transformers' from_pretrained


def _config(hf: dict, family: str) -> dict:
    """Our config fields from an HF config.json."""
    for flag in ("is_decoder", "add_cross_attention"):  # a causal (BertLMHeadModel) or cross-attending BERT
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag}=true is not supported by from_hf (a bidirectional encoder)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"config.json: position_embedding_type {hf['position_embedding_type']!r} is not "
                              "supported (absolute)")
    key = "activation" if family == "distilbert" else "hidden_act"
    act = hf.get(key, "gelu")
    ours = hf_activation(key, act)
    # their MLM heads apply gelu whatever hidden_act says
    if family in ("roberta", "electra", "mpnet") and act != "gelu":
        raise CheckpointError(f"config.json: hidden_act {act!r}: a {hf.get('model_type')} MLM head uses 'gelu', "
                              "and from_hf supports the models whose layers do too")
    if family == "distilbert":
        base = dict(d_model=hf["dim"], n_layer=hf["n_layers"], n_head=hf["n_heads"], d_ff=hf["hidden_dim"],
                    max_seq_len=hf["max_position_embeddings"], norm_eps=1e-12, type_vocab_size=0,
                    pooler_activation="relu")
    else:
        base = dict(d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                    d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                    norm_eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=hf.get("type_vocab_size", 2))
    if family == "deberta":
        base.update(_deberta(hf))
    if family in ("electra", "albert") and hf.get("embedding_size", hf["hidden_size"]) != hf["hidden_size"]:
        base.update(embed_dim=hf["embedding_size"])  # narrower embeddings, projected up
    if family == "electra":
        base.update(pooler_activation="gelu")
    if family == "albert":
        for key in ("num_hidden_groups", "inner_group_num"):
            if hf.get(key, 1) != 1:
                raise CheckpointError(f"config.json: {key}={hf[key]} is not supported by from_hf (ALBERT with one "
                                      "layer shared by every depth)")
        base.update(shared_layers=True)
    pad = hf.get("pad_token_id")
    pad = (1 if family in ("roberta", "mpnet") else 0) if pad is None else pad
    if family == "mpnet":  # no token types; T5's bias over 32 buckets, as MPNet's encoder computes it
        base.update(type_vocab_size=0, relative_buckets=hf.get("relative_attention_num_buckets", 32),
                    relative_max_distance=128)
    if family in ("roberta", "mpnet"):  # the table's first pad + 1 rows come before the first position
        base.update(roberta_positions=True, pos_offset=pad + 1, max_seq_len=hf["max_position_embeddings"] - pad - 1)
        if base["max_seq_len"] < 1:
            raise CheckpointError(f"config.json: max_position_embeddings {hf['max_position_embeddings']} leaves no "
                                  f"position past pad_token_id {pad}")
    return dict(vocab_size=hf["vocab_size"], norm="layernorm", norm_first=False, mlp="gelu", activation=ours,
                tie_embeddings=hf.get("tie_word_embeddings", True), bias=True, pad_token_id=pad,
                embed_padding_idx=hf.get("pad_token_id", pad) is not None, dropout=hidden_dropout(hf, family),
                **{"pos": "learned", **base})


def hidden_dropout(hf: dict, family: str) -> float:
    """The checkpoint's hidden (residual) dropout, transformers' default where config.json lacks it."""
    key, default = _DROPOUT.get(family, ("hidden_dropout_prob", 0.1))
    v = hf.get(key, default)
    return default if v is None else float(v)


def _deberta(hf: dict) -> dict:
    """DeBERTa-v2 / v3's config fields (the module docstring says what is refused)."""
    d, rel = hf["hidden_size"], hf.get("relative_attention", False)
    # (key, transformers' default where config.json lacks it, what from_hf supports)
    checks = (("embedding_size", d, d), ("pooler_hidden_size", d, d), ("conv_kernel_size", 0, 0),
              ("attention_head_size", d // hf["num_attention_heads"], d // hf["num_attention_heads"]),
              ("share_att_key", False, True if rel else hf.get("share_att_key", False)))
    for key, default, want in checks:
        if hf.get(key, default) != want:
            raise CheckpointError(f"config.json: {key}={hf.get(key, default)!r} is not supported by from_hf "
                                  f"(DeBERTa with {key}={want!r})")
    out = dict(pos="learned" if hf.get("position_biased_input", True) else "none",
               pooler_activation=hf.get("pooler_hidden_act", "gelu"), loss_rule="deberta")
    if not rel:
        return out
    types, norm = hf.get("pos_att_type") or [], hf.get("norm_rel_ebd") or ""
    types = types.split("|") if isinstance(types, str) else types
    if sorted(t.strip() for t in types) != ["c2p", "p2c"] or "layer_norm" not in norm or \
            hf.get("position_buckets", -1) < 2:
        raise CheckpointError(f"config.json: pos_att_type {hf.get('pos_att_type')!r}, norm_rel_ebd {norm!r}, "
                              f"position_buckets {hf.get('position_buckets')!r}: from_hf supports DeBERTa's c2p and "
                              "p2c terms, layer_norm and log buckets (v2 / v3's)")
    far = hf.get("max_relative_positions", -1)
    return {**out, "rel_pos_buckets": hf["position_buckets"],
            "rel_pos_max": far if far > 0 else hf["max_position_embeddings"]}


def _encoder_state(cfg, family: str, m: KeyMap) -> Dict[str, Tensor]:
    """Our encoder's state dict from the family's keys (q, k, v concatenated into wqkv)."""
    d, f, e, E = cfg.d_model, cfg.d_ff, "encoder.", cfg.embed_dim or cfg.d_model
    rows = cfg.max_seq_len + cfg.pos_offset
    sd = {e + "tok_emb.weight": m.take("embeddings.word_embeddings.weight", (cfg.vocab_size, E)),
          e + "embed_norm.weight": m.take("embeddings.LayerNorm.weight", (E,)),
          e + "embed_norm.bias": m.take("embeddings.LayerNorm.bias", (E,))}
    if E != d:  # ELECTRA-small's embeddings_project, ALBERT's embedding_hidden_mapping_in
        proj = "embeddings_project" if family == "electra" else "encoder.embedding_hidden_mapping_in"
        sd.update({f"{e}embed_proj.{p}": m.take(f"{proj}.{p}", (d, E) if p == "weight" else (d,))
                   for p in ("weight", "bias")})
    if cfg.pos == "learned":
        sd[e + "pos.weight"] = m.take("embeddings.position_embeddings.weight", (rows, E))
    if cfg.relative_buckets:  # MPNet's relative-position bias table
        sd[e + "rel_bias.weight"] = m.take("encoder.relative_attention_bias.weight", (cfg.relative_buckets, cfg.n_head))
    if cfg.rel_pos_buckets:  # DeBERTa's relative embeddings and their LayerNorm
        sd[e + "rel_emb.weight"] = m.take("encoder.rel_embeddings.weight", (2 * cfg.rel_pos_buckets, d))
        sd.update({f"{e}rel_norm.{p}": m.take(f"encoder.LayerNorm.{p}", (d,)) for p in ("weight", "bias")})
    if cfg.type_vocab_size:
        sd[e + "type_emb.weight"] = m.take("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, E))
    layer, qkv, rest = _LAYER[family]
    shapes = {"attn.wo": (d, d), "norm1": (d,), "mlp.w_in": (f, d), "mlp.w_out": (d, f), "norm2": (d,)}
    for i in range(cfg.n_layer):
        h, b = layer.format(i), f"{e}blocks.{i}."
        for p in ("weight", "bias"):
            shape = (lambda s: s) if p == "weight" else (lambda s: s[:1])
            sd[f"{b}attn.wqkv.{p}"] = torch.cat([m.take(f"{h}{n}.{p}", shape((d, d))) for n in qkv])
            for ours, theirs in rest.items():
                sd[f"{b}{ours}.{p}"] = m.take(f"{h}{theirs}.{p}", shape(shapes[ours]))
    return sd


def _mlm_head(cfg, family: str, top: KeyMap, tok_emb: Tensor, decoder_bias: bool = True) -> Dict[str, Tensor]:
    """The MLM head (dense, norm, the vocabulary bias and untied weight) as ours; the dense and norm biases where the
    config has them (not ModernBERT's), the vocabulary bias zeros without one (ModernBERT's decoder_bias false).
    An untied head's vocabulary bias is its decoder's own where the checkpoint has one (BERT's
    cls.predictions.decoder.bias): transformers ties that to the head's bias only with the embeddings."""
    d, E, V, (dense, norm, bias, decoder) = cfg.d_model, cfg.embed_dim or cfg.d_model, cfg.vocab_size, _MLM[family]
    own_bias = decoder.rsplit(".", 1)[0] + ".bias"
    if not cfg.tie_embeddings and top.has(own_bias):
        bias = own_bias
    norm_bias = cfg.bias if cfg.norm_bias is None else cfg.norm_bias
    return {"mlm_head.dense.weight": top.take(f"{dense}.weight", (E, d)),
            **({"mlm_head.dense.bias": top.take(f"{dense}.bias", (E,))} if cfg.head_bias else {}),
            "mlm_head.norm.weight": top.take(f"{norm}.weight", (E,)),
            **({"mlm_head.norm.bias": top.take(f"{norm}.bias", (E,))} if norm_bias else {}),
            "mlm_head.decoder.bias": top.take(bias, (V,)) if decoder_bias else torch.zeros(V, dtype=tok_emb.dtype),
            "mlm_head.decoder.weight": tok_emb if cfg.tie_embeddings else top.take(decoder, (V, E))}

