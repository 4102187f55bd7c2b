"""BERT: a bidirectional encoder on fastattn's fused ops, with the pre-training heads (masked LM, next sentence) and a
sequence-classification model, and import of HF BERT-family checkpoints (BERT, RoBERTa / XLM-R / CamemBERT,
DistilBERT, ELECTRA, ALBERT, DeBERTa-v2 / v3, MPNet, ModernBERT: bert_hf.py).

    model = BERT(BERTConfig(vocab_size=30522, d_model=768, n_layer=12, n_head=12))
    out = model(input_ids, attention_mask, token_type_ids, labels=mlm_labels, next_sentence_label=nsp)
    clf = BERTForSequenceClassification.from_hf("path/to/bert", num_labels=3)

The embeddings (token + position + token type) are normalised in one fused add+LayerNorm call; the blocks are
post-norm as in BERT (``norm_first=True`` gives a pre-norm encoder with a final norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert_hf import load_bert
from .config import ModelConfig
from .layers import (Block, ModelOutput, PretrainedMixin, activation_fn, init_weights, check_skip_padding, drop,
                     embed_tokens, keep_mask, lm_head_loss, make_norm, padding_or_none, token_positions, run_block,
                     upcast)
from .positions import Positions

PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
LOSS_RULES = ("bert", "deberta")  # how problem_type None picks the loss: transformers' BERT's or DeBERTa-v2's
POOLER_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


@dataclass
class BERTConfig(ModelConfig):
    vocab_size: int = 30522
    max_seq_len: int = 512
    norm_eps: float = 1e-12
    norm_first: bool = False
    tie_embeddings: bool = True
    type_vocab_size: int = 2  # 0: no token-type embedding (DistilBERT)
    num_labels: int = 2
    problem_type: Optional[str] = None  # the classifier's loss, as transformers' config.problem_type (None: inferred)
    loss_rule: str = "bert"  # problem_type None's inference (LOSS_RULES; "deberta": from_hf on DeBERTa-v2 / v3)
    pad_token_id: int = 0
    # the token embedding's padding_idx is pad_token_id: lookups send no gradient into that row (transformers' BERT
    # family; from_hf sets it); the init is unchanged
    embed_padding_idx: bool = False
    # RoBERTa's position ids: the real tokens numbered in order, skipping padding, from table row pos_offset (which
    # must be pad_token_id + 1); padding tokens (pad_token_id) at row pad_token_id
    roberta_positions: bool = False
    pooler_activation: str = "tanh"  # the classifier's pooler: "tanh" (BERT, RoBERTa), "relu" (DistilBERT), "gelu"
    pooling: str = "cls"  # what the pooler reads: "cls" (h[:, 0]) or "mean" (the real tokens' mean; ModernBERT's)
    pooler_norm: bool = False  # a LayerNorm after the pooler's activation (ModernBERT's head)
    head_bias: bool = True  # the MLM head's and the pooler's dense biases (ModernBERT: none)
    # > 0: DeBERTa-v2 / v3's disentangled attention over this many relative-position buckets each side, log-spaced
    # out to rel_pos_max (models/disentangled.py)
    rel_pos_buckets: int = 0
    rel_pos_max: int = 512
    # > 0: T5's relative-position bias (seq2seq.RelativeBias, both directions), one table shared by the layers and
    # added to every layer's scores (MPNet)
    relative_buckets: int = 0
    relative_max_distance: int = 128
    # the token / position / type embeddings' width when narrower than d_model: normalised at that width, then
    # projected up (embed_proj); the MLM head projects back down to it (ALBERT, ELECTRA-small). None: d_model
    embed_dim: Optional[int] = None
    shared_layers: bool = False  # every layer the same module, weights and all (ALBERT)
    model_type = "bert"

    def validate(self) -> None:
        super().validate()
        self.check_ints(("num_labels",), 1)
        self.check_ints(("type_vocab_size", "pad_token_id"), 0)
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"BERTConfig.pad_token_id: {self.pad_token_id} is not below vocab_size {self.vocab_size}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"BERTConfig.problem_type: {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        if self.loss_rule not in LOSS_RULES:
            raise ValueError(f"BERTConfig.loss_rule: {self.loss_rule!r} is not one of {LOSS_RULES}")
        if self.pooler_activation not in POOLER_ACTIVATIONS:
            raise ValueError(f"BERTConfig.pooler_activation: {self.pooler_activation!r} is not one of "
                             f"{tuple(POOLER_ACTIVATIONS)}")
        check_skip_padding(self, "roberta_positions")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"BERTConfig.pooling: {self.pooling!r} is not one of ('cls', 'mean')")
        self.check_ints(("rel_pos_buckets", "relative_buckets"), 0)
        self.check_ints(("relative_max_distance",), 1)
        if self.relative_buckets and (self.relative_buckets < 4 or self.relative_buckets % 2 or
                                      self.relative_max_distance <= self.relative_buckets // 4):
            raise ValueError(f"BERTConfig.relative_buckets: an even number >= 4 with relative_max_distance > "
                             f"relative_buckets / 4; got {self.relative_buckets} (relative_max_distance "
                             f"{self.relative_max_distance})")
        if self.rel_pos_buckets:
            self.check_ints(("rel_pos_buckets",), 2)
            if isinstance(self.rel_pos_max, bool) or not isinstance(self.rel_pos_max, int) or \
                    self.rel_pos_max <= self.rel_pos_buckets // 2 + 1:
                raise ValueError(f"BERTConfig.rel_pos_max: an int > rel_pos_buckets / 2 + 1 "
                                 f"({self.rel_pos_buckets // 2 + 1}), got {self.rel_pos_max!r}")
            if self.n_kv_head is not None and self.n_kv_head != self.n_head:
                raise ValueError(f"BERTConfig.n_kv_head: DeBERTa's disentangled attention (rel_pos_buckets) has one "
                                 f"key and value head per query head; got n_kv_head {self.n_kv_head} for n_head "
                                 f"{self.n_head}")
        if self.embed_dim is not None:
            self.check_ints(("embed_dim",), 1)
        for name in ("pooler_norm", "head_bias", "shared_layers", "embed_padding_idx"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BERTConfig.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.shared_layers and (self.layer_types is not None or not self.first_input_norm):
            raise ValueError("BERTConfig.shared_layers: one block for every layer cannot differ per layer "
                             "(layer_types, first_input_norm)")
        if self.rel_pos_buckets and self.relative_buckets:
            raise ValueError("BERTConfig.relative_buckets: one relative-position scheme at a time (rel_pos_buckets "
                             "is set: DeBERTa's)")


class BERTEncoder(nn.Module):
    """Embeddings, then the blocks: hidden states (B, L, d_model)."""
    gradient_checkpointing = None  # torch.utils.checkpoint's arguments while on (gradient_checkpointing_enable)

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.embed_dim or cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, E)
        if cfg.embed_padding_idx:  # (after construction: the init stays as without it)
            self.tok_emb.padding_idx = cfg.pad_token_id
        self.pos = Positions(cfg, cfg.pos_offset, E)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg, E)
        self.embed_proj = nn.Linear(E, cfg.d_model) if E != cfg.d_model else None
        if cfg.shared_layers:  # one block, n uses (its parameters counted, saved and sharded once)
            self.blocks = nn.ModuleList([Block(cfg)] * cfg.n_layer)
        else:
            self.blocks = nn.ModuleList(Block(cfg, layer=i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_first else None
        if cfg.rel_pos_buckets:  # DeBERTa's relative embeddings, shared by the layers, normalised once a call
            self.rel_emb, self.rel_norm = nn.Embedding(2 * cfg.rel_pos_buckets, cfg.d_model), make_norm(cfg)
        if cfg.relative_buckets:  # MPNet's: T5's bias table, shared by the layers
            from .seq2seq import RelativeBias
            self.rel_bias = RelativeBias(cfg, bidirectional=True)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        B, L = input_ids.shape
        keep = keep_mask(input_ids, attention_mask, self.cfg.max_seq_len)
        positions = token_positions(input_ids, self.cfg.pad_token_id, self.cfg.roberta_positions)
        extra = self.pos.embed(positions)
        if self.type_emb is not None:
            types = self.type_emb(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
            extra = types if extra is None else extra + types
        elif token_type_ids is not None:
            raise ValueError("token_type_ids: this model has no token types (config.type_vocab_size 0)")
        x = embed_tokens(self.tok_emb, input_ids)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        x = self.embed_norm.post(x, extra)  # LayerNorm(tokens + positions + types)
        x = drop(x, self.cfg.dropout, self.training, self.cfg.backend)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        pad = padding_or_none(keep, attention_mask)  # (B, L) True = padding, or None
        rotary = self.pos.rotary(positions, x.dtype)
        h, residual, extra = x, None, {}
        if self.cfg.rel_pos_buckets:
            from .disentangled import relative_buckets
            extra["rel"] = (self.rel_norm(self.rel_emb.weight),
                            relative_buckets(L, self.cfg.rel_pos_buckets, self.cfg.rel_pos_max, x.device))
        if self.cfg.relative_buckets:  # (1, H, L, L), from the columns: padding on the left shifts no distance
            cols = torch.arange(L, device=x.device)
            extra["attn_bias"] = self.rel_bias(cols[None], cols).to(x.dtype)
        for block in self.blocks:
            h, residual = run_block(self, block, h, residual, key_padding_mask=pad, rotary=rotary, **extra)
        return self.norm_f.post(h, residual) if self.norm_f is not None else h


class Pooler(nn.Module):
    """tanh(Linear(h[:, 0])) (or relu, gelu): the [CLS] summary the sentence-level heads read; ModernBERT's reads the
    mean of the real tokens (``pooling="mean"``) and normalises the result (``pooler_norm``)."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.head_bias)
        self.act, self.mean = POOLER_ACTIVATIONS[cfg.pooler_activation], cfg.pooling == "mean"
        self.norm = make_norm(cfg) if cfg.pooler_norm else None

    def forward(self, h: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if not self.mean:
            x = h[:, 0]
        elif attention_mask is None:
            x = h.mean(1)
        else:
            keep = attention_mask.to(h.dtype)[..., None]
            x = (h * keep).sum(1) / keep.sum(1)
        x = self.act(self.dense(x))
        return x if self.norm is None else self.norm.post(x)


class MLMHead(nn.Module):
    """Linear, activation, LayerNorm, then the vocabulary projection (tied to the token embedding) plus a bias."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        E = cfg.embed_dim or cfg.d_model  # (back down to the embeddings' width, whose table it is tied to)
        self.dense = nn.Linear(cfg.d_model, E, bias=cfg.head_bias)
        self.act = activation_fn(cfg.activation)
        self.norm = make_norm(cfg, E)
        self.decoder = nn.Linear(E, cfg.vocab_size)

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
        self.pooler = Pooler(cfg)
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
        nsp_logits = self.nsp_head(self.pooler(h, attention_mask))
        loss = None
        if labels is None:
            logits = self.mlm_head(h)
        else:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: shape {tuple(labels.shape)} != input_ids' {tuple(input_ids.shape)}")
            logits, loss = lm_head_loss(self.mlm_head.decoder, self.mlm_head.transform(h), labels,
                                        self.config.backend, self.training if skip_logits is None else skip_logits)
        if next_sentence_label is not None:
            nsp = F.cross_entropy(upcast(nsp_logits), next_sentence_label.view(-1))
            loss = nsp if loss is None else loss + nsp
        return ModelOutput(logits=logits, loss=loss, nsp_logits=nsp_logits, hidden_states=h)

    @classmethod
    def from_hf(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, **overrides) -> "BERT":
        """Import a local HF BERT-family folder (BertForPreTraining; BertForMaskedLM / BertModel, RoBERTa, XLM-R,
        CamemBERT, DistilBERT, ELECTRA, ALBERT, DeBERTa-v2 / v3, MPNet and ModernBERT masked LMs too, the heads they
        lack left at random init with a warning, except the MLM head, which must be there); dtype / device as in
        GPT.from_hf. ``dropout`` is the checkpoint's hidden dropout (its attention and classifier rates are not
        taken: bert_hf.py); ``overrides`` set config fields (e.g. dropout=0.0)."""
        return load_bert(cls, path, dtype, device, overrides, "pretraining")


class BERTForSequenceClassification(PretrainedMixin, nn.Module):
    """The encoder, the pooler and a classifier: .logits (B, num_labels); .loss from ``labels`` by
    ``config.problem_type``, as transformers' BertForSequenceClassification: "regression" (mean squared error),
    "single_label_classification" (cross-entropy of class ids (B,)), "multi_label_classification" (binary
    cross-entropy of multi-hot (B, num_labels)); None: regression when num_labels == 1, else (``config.loss_rule``
    "bert") single-label for integer labels and multi-label for float ones, or ("deberta", DeBERTa-v2's rule)
    cross-entropy of class ids (B,) or (B, 1), integer or float, over the rows whose label is >= 0 (0 when none is),
    and for other (B, num_labels) labels the soft-label cross-entropy -(log_softmax(logits) * labels).sum(-1).mean().
    The loss is float32 for 16-bit models, in the model's dtype otherwise."""
    config_class = BERTConfig
    head_modules = ("pooler", "classifier")

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = BERTEncoder(cfg)
        self.pooler = Pooler(cfg)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        self.apply(init_weights)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ModelOutput:
        pooled = self.pooler(self.encoder(input_ids, attention_mask, token_type_ids), attention_mask)
        pooled = drop(pooled, self.config.dropout, self.training, self.config.backend)
        logits = self.classifier(pooled)
        loss = None if labels is None else classification_loss(self.config, logits, labels)
        return ModelOutput(logits=logits, loss=loss)

    @classmethod
    def from_hf(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None,
                **overrides) -> "BERTForSequenceClassification":
        """Import a local HF BERT-family folder; a *ForSequenceClassification's classifier is loaded, any other
        checkpoint's classifier (and a missing pooler) starts at random init (fine-tuning), with a warning;
        dtype / device / overrides and dropout as in BERT.from_hf; DeBERTa-v2 / v3's loss rule
        (``loss_rule="deberta"``)."""
        return load_bert(cls, path, dtype, device, overrides, "classify")


def classification_loss(cfg: BERTConfig, logits: Tensor, labels: Tensor) -> Tensor:
    """BERTForSequenceClassification's loss of logits (B, num_labels) against labels (its docstring)."""
    logits, kind = upcast(logits), cfg.problem_type
    if kind is None and cfg.num_labels > 1 and cfg.loss_rule == "deberta":
        return _deberta_loss(logits, labels)
    kind = kind or ("regression" if cfg.num_labels == 1 else
                    "multi_label_classification" if labels.is_floating_point() else "single_label_classification")
    if kind == "regression":
        out = logits.squeeze(-1) if cfg.num_labels == 1 else logits
        return F.mse_loss(out, labels.to(out.dtype).view(out.shape))
    if kind == "single_label_classification":
        return F.cross_entropy(logits, labels.long().view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).view(logits.shape))


def _deberta_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """DebertaV2ForSequenceClassification's loss with problem_type None and num_labels > 1."""
    if labels.dim() == 1 or labels.shape[-1] == 1:  # class ids, negative ones ignored
        labels = labels.reshape(-1)
        keep = labels >= 0
        ce = F.cross_entropy(logits, torch.where(keep, labels, 0).long(), reduction="none")
        return (ce * keep).sum() / keep.sum().clamp_min(1)  # the kept rows' mean (0 without any)
    return -(torch.log_softmax(logits, -1) * labels.to(logits.dtype)).sum(-1).mean()  # soft labels (B, C)
