"""BERT: a bidirectional encoder on fastattn's fused ops, with the pre-training heads (masked LM, next sentence) and a
sequence-classification model, and import of HF BERT checkpoints.

    model = BERT(BERTConfig(vocab_size=30522, d_model=768, n_layer=12, n_head=12))
    out = model(input_ids, attention_mask, token_type_ids, labels=mlm_labels, next_sentence_label=nsp)
    clf = BERTForSequenceClassification.from_hf("path/to/bert", num_labels=3)

The embeddings (token + position + token type) are normalised in one fused add+LayerNorm call; the blocks are
post-norm as in BERT (``norm_first=True`` gives a pre-norm encoder with a final norm).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, KeyMap, load_mapped, place, read_hf_folder
from .layers import (Block, ModelConfig, ModelOutput, Positions, PretrainedMixin, activation_fn, init_weights,
                     drop, keep_mask, lm_head_loss, make_norm, padding_or_none)

log = logging.getLogger("fastattn")


PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass
class BERTConfig(ModelConfig):
    vocab_size: int = 30522
    max_seq_len: int = 512
    norm_eps: float = 1e-12
    norm_first: bool = False
    tie_embeddings: bool = True
    type_vocab_size: int = 2
    num_labels: int = 2
    problem_type: Optional[str] = None  # the classifier's loss, as transformers' config.problem_type (None: inferred)
    model_type = "bert"

    def validate(self) -> None:
        super().validate()
        self.check_ints(("type_vocab_size", "num_labels"), 1)
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"BERTConfig.problem_type: {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        if self.mlp != "gelu":
            raise ValueError(f"BERTConfig.mlp: {self.mlp!r}; BERT uses the two-Linear 'gelu' MLP")


class BERTEncoder(nn.Module):
    """Embeddings, then the blocks: hidden states (B, L, d_model)."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = Positions(cfg)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.embed_norm = make_norm(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_first else None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        B, L = input_ids.shape
        keep = keep_mask(input_ids, attention_mask, self.cfg.max_seq_len)
        positions = torch.arange(L, device=input_ids.device).expand(B, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        extra = self.type_emb(token_type_ids)
        pe = self.pos.embed(positions)
        if pe is not None:
            extra = extra + pe
        x = self.embed_norm.post(self.tok_emb(input_ids), extra)  # LayerNorm(tokens + positions + types)
        x = drop(x, self.cfg.dropout, self.training, self.cfg.backend)
        pad = padding_or_none(keep, attention_mask)  # (B, L) True = padding, or None
        rotary = self.pos.rotary(positions, x.dtype)
        h, residual = x, None
        for block in self.blocks:
            h, residual = block(h, residual, key_padding_mask=pad, rotary=rotary)
        return self.norm_f.post(h, residual) if self.norm_f is not None else h


class Pooler(nn.Module):
    """tanh(Linear(h[:, 0])): the [CLS] summary the sentence-level heads read."""

    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class MLMHead(nn.Module):
    """Linear, activation, LayerNorm, then the vocabulary projection (tied to the token embedding) plus a bias."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation_fn(cfg.activation)
        self.norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.transform(h))

    def transform(self, h: Tensor) -> Tensor:
        """The hidden states the vocabulary projection (decoder) reads."""
        return self.norm.post(self.act(self.dense(h)))


class BERT(PretrainedMixin, nn.Module):
    """Pre-training model: .logits (B, L, V) masked-LM, .nsp_logits (B, 2), .loss = MLM loss (+ NSP loss)."""
    config_class = BERTConfig
    head_modules = ("mlm_head", "pooler", "nsp_head")

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = BERTEncoder(cfg)
        self.mlm_head = MLMHead(cfg)
        self.pooler = Pooler(cfg.d_model)
        self.nsp_head = nn.Linear(cfg.d_model, 2)
        self.apply(init_weights)
        if cfg.tie_embeddings:
            self.mlm_head.decoder.weight = self.encoder.tok_emb.weight

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                next_sentence_label: Optional[Tensor] = None, *, skip_logits: Optional[bool] = None) -> ModelOutput:
        """labels (B, L): the masked positions' token ids, -100 elsewhere. ``skip_logits`` (default: in training,
        given labels): on the fastattn backend the MLM loss comes from fastattn.linear_cross_entropy without the
        logits, and .logits is None."""
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        nsp_logits = self.nsp_head(self.pooler(h))
        loss = None
        if labels is None:
            logits = self.mlm_head(h)
        else:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: shape {tuple(labels.shape)} != input_ids' {tuple(input_ids.shape)}")
            logits, loss = lm_head_loss(self.mlm_head.decoder, self.mlm_head.transform(h), labels,
                                        self.config.backend, self.training if skip_logits is None else skip_logits)
        if next_sentence_label is not None:
            nsp = F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
            loss = nsp if loss is None else loss + nsp
        return ModelOutput(logits=logits, loss=loss, nsp_logits=nsp_logits, hidden_states=h)

    @classmethod
    def from_hf(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, **overrides) -> "BERT":
        """Import a local HF BERT folder (BertForPreTraining; BertForMaskedLM / BertModel too, their missing heads
        left at random init with a warning, except the MLM head, which must be there); dtype / device as in
        GPT.from_hf."""
        hf, state = read_hf_folder(path)
        cfg = _bert_config(hf, cls.config_class, overrides)
        m = KeyMap(state, ("bert.", ""))
        sd = _encoder_state(cfg, m)
        top = KeyMap(state)
        d = cfg.d_model
        sd.update({"mlm_head.dense.weight": top.take("cls.predictions.transform.dense.weight", (d, d)),
                   "mlm_head.dense.bias": top.take("cls.predictions.transform.dense.bias", (d,)),
                   "mlm_head.norm.weight": top.take("cls.predictions.transform.LayerNorm.weight", (d,)),
                   "mlm_head.norm.bias": top.take("cls.predictions.transform.LayerNorm.bias", (d,)),
                   "mlm_head.decoder.bias": top.take("cls.predictions.bias", (cfg.vocab_size,)),
                   "mlm_head.decoder.weight": sd["encoder.tok_emb.weight"] if cfg.tie_embeddings else
                   top.take("cls.predictions.decoder.weight", (cfg.vocab_size, d))})
        model = place(cls(cfg), dtype, device)
        _optional(sd, model, m, top, {"pooler.dense.weight": ("pooler.dense.weight", (d, d), m),
                                      "pooler.dense.bias": ("pooler.dense.bias", (d,), m),
                                      "nsp_head.weight": ("cls.seq_relationship.weight", (2, d), top),
                                      "nsp_head.bias": ("cls.seq_relationship.bias", (2,), top)})
        load_mapped(model, sd)
        return model.eval()  # as transformers' from_pretrained


class BERTForSequenceClassification(PretrainedMixin, nn.Module):
    """The encoder, the pooler and a classifier: .logits (B, num_labels); .loss from ``labels`` by
    ``config.problem_type``, as transformers' BertForSequenceClassification: "regression" (mean squared error),
    "single_label_classification" (cross-entropy of class ids (B,)), "multi_label_classification" (binary
    cross-entropy of multi-hot (B, num_labels)); None: regression when num_labels == 1, else single-label for
    integer labels and multi-label for float ones."""
    config_class = BERTConfig
    head_modules = ("pooler", "classifier")

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = BERTEncoder(cfg)
        self.pooler = Pooler(cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        self.apply(init_weights)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ModelOutput:
        pooled = self.pooler(self.encoder(input_ids, attention_mask, token_type_ids))
        pooled = drop(pooled, self.config.dropout, self.training, self.config.backend)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            kind = self.config.problem_type or ("regression" if self.config.num_labels == 1 else
                                                "multi_label_classification" if labels.is_floating_point() else
                                                "single_label_classification")
            if kind == "regression":
                out = logits.squeeze(-1) if self.config.num_labels == 1 else logits
                loss = F.mse_loss(out.float(), labels.float().view(out.shape))
            elif kind == "single_label_classification":
                loss = F.cross_entropy(logits.float(), labels.long().view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float().view(logits.shape))
        return ModelOutput(logits=logits, loss=loss)

    @classmethod
    def from_hf(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None,
                **overrides) -> "BERTForSequenceClassification":
        """Import a local HF BERT folder; a BertForSequenceClassification's classifier is loaded, any other
        checkpoint's classifier (and a missing pooler) starts at random init (fine-tuning), with a warning;
        dtype / device as in GPT.from_hf."""
        hf, state = read_hf_folder(path)
        overrides.setdefault("num_labels", hf.get("num_labels", len(hf.get("id2label") or {}) or 2))
        overrides.setdefault("problem_type", hf.get("problem_type"))
        cfg = _bert_config(hf, cls.config_class, overrides)
        m, top, d = KeyMap(state, ("bert.", "")), KeyMap(state), cfg.d_model
        sd = _encoder_state(cfg, m)
        model = place(cls(cfg), dtype, device)
        _optional(sd, model, m, top, {"pooler.dense.weight": ("pooler.dense.weight", (d, d), m),
                                      "pooler.dense.bias": ("pooler.dense.bias", (d,), m),
                                      "classifier.weight": ("classifier.weight", (cfg.num_labels, d), top),
                                      "classifier.bias": ("classifier.bias", (cfg.num_labels,), top)})
        load_mapped(model, sd)
        return model.eval()  # as transformers' from_pretrained


_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def _bert_config(hf: dict, config_class, overrides: dict) -> BERTConfig:
    if hf.get("model_type") not in ("bert", None):
        raise CheckpointError(f"config.json: model_type {hf.get('model_type')!r} is not supported by from_hf (bert)")
    for flag in ("is_decoder", "add_cross_attention"):  # a causal (BertLMHeadModel) or cross-attending BERT
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag}=true is not supported by from_hf (a bidirectional encoder)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"config.json: position_embedding_type {hf['position_embedding_type']!r} is not "
                              "supported (absolute)")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT:
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported ({sorted(_ACT)})")
    base = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                max_seq_len=hf["max_position_embeddings"], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
                norm_first=False, mlp="gelu", activation=_ACT[act], pos="learned",
                tie_embeddings=hf.get("tie_word_embeddings", True), bias=True,
                type_vocab_size=hf.get("type_vocab_size", 2))
    return config_class.from_dict({**base, **overrides})


def _encoder_state(cfg: BERTConfig, m: KeyMap) -> dict:
    """Our encoder's state dict from HF BERT keys (q, k, v concatenated into wqkv)."""
    d, f = cfg.d_model, cfg.d_ff
    e = "encoder."
    sd = {e + "tok_emb.weight": m.take("embeddings.word_embeddings.weight", (cfg.vocab_size, d)),
          e + "pos.weight": m.take("embeddings.position_embeddings.weight", (cfg.max_seq_len, d)),
          e + "type_emb.weight": m.take("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d)),
          e + "embed_norm.weight": m.take("embeddings.LayerNorm.weight", (d,)),
          e + "embed_norm.bias": m.take("embeddings.LayerNorm.bias", (d,))}
    for i in range(cfg.n_layer):
        h, b = f"encoder.layer.{i}.", f"{e}blocks.{i}."
        for p in ("weight", "bias"):
            shape = (lambda *s: s) if p == "weight" else (lambda *s: s[:1])
            sd[f"{b}attn.wqkv.{p}"] = torch.cat([m.take(f"{h}attention.self.{n}.{p}", shape(d, d))
                                                  for n in ("query", "key", "value")])
            sd[f"{b}attn.wo.{p}"] = m.take(f"{h}attention.output.dense.{p}", shape(d, d))
            sd[f"{b}norm1.{p}"] = m.take(f"{h}attention.output.LayerNorm.{p}", (d,))
            sd[f"{b}mlp.w_in.{p}"] = m.take(f"{h}intermediate.dense.{p}", shape(f, d))
            sd[f"{b}mlp.w_out.{p}"] = m.take(f"{h}output.dense.{p}", shape(d, f))
            sd[f"{b}norm2.{p}"] = m.take(f"{h}output.LayerNorm.{p}", (d,))
    return sd


def _optional(sd: dict, model: nn.Module, m: KeyMap, top: KeyMap, keys: dict) -> None:
    """Heads a checkpoint may lack: taken when present (shapes checked), else kept at the model's random init."""
    missing = []
    for ours, (theirs, shape, keymap) in keys.items():
        if keymap.has(theirs):
            sd[ours] = keymap.take(theirs, shape)
        else:
            sd[ours] = model.state_dict()[ours]
            missing.append(theirs)
    if missing:
        log.warning("from_hf: %s not in the checkpoint; left at random init", ", ".join(missing))
