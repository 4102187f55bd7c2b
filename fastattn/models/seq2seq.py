"""Seq2Seq: a BART-style encoder-decoder on fastattn's fused ops (T5's relative-position bias as an option), with
static-KV-cache generation in which each decoder layer's cross-attention keys and values are computed once from the
encoder output.

    model = Seq2Seq(Seq2SeqConfig(vocab_size=1000, d_model=256, n_layer=4, n_head=4))
    out = model(input_ids, attention_mask, labels=target)       # decoder inputs: labels shifted right
    ids = model.generate(input_ids, 64, temperature=0, attention_mask=mask)   # (B, 1 + new), from the start token

Token embeddings are shared by the encoder, the decoder and (tied) the LM head; each side has its own positions and
(``embed_norm``) its own embedding LayerNorm, as in BART. Encoder padding may sit on either side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .beam import Search
from .checkpoint import load_mapped, place
from .decode_step import bind_decode
from .generation_lock import one_generation_at_a_time
from .graphs import check_cuda_graph
from .config import ModelConfig
from .generation import FROM_CONFIG, CacheMixin, Sampling, cache_len, default_eos
from .layers import (Block, ModelOutput, PretrainedMixin, init_weights, check_skip_padding, drop, embed_tokens,
                     keep_mask, lm_head_loss, make_norm, padding_or_none, token_positions, run_block)
from .positions import Positions
from .packing import Packing, check_position_ids, packing_of
from .speculative import speculation, speculative_generate


@dataclass
class Seq2SeqConfig(ModelConfig):
    n_decoder_layer: Optional[int] = None  # None: n_layer
    embed_norm: bool = True
    pad_token_id: int = 1
    # the token embedding's padding_idx is pad_token_id: lookups send no gradient into that row (transformers' BART
    # family; from_hf sets it); the init is unchanged
    embed_padding_idx: bool = False
    # generate's end token(s) when it is given none: an id or a list (transformers' generation_config), None: none
    eos_token_id: Union[int, List[int], None] = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: Optional[int] = None  # generate's first new token, forced (BART-large-CNN's 0, mBART-50's)
    forced_eos_token_id: Optional[int] = None  # and its last (max_new_tokens reached), as BART's generation configs
    # T5's relative positions: a learned bias per head and bucket of (key - query) position, added to the scores of
    # every self-attention layer (one table per side); 0 = none (then pos gives the positions)
    relative_buckets: int = 0
    relative_max_distance: int = 128
    # M2M100 / NLLB: positions numbered over the real tokens, skipping padding (layers.token_positions)
    roberta_positions: bool = False
    model_type = "seq2seq"

    def __post_init__(self):
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self.check_eos()
        ids = ("pad_token_id", "decoder_start_token_id") + tuple(
            name for name in ("forced_bos_token_id", "forced_eos_token_id") if getattr(self, name) is not None)
        self.check_ints(("n_decoder_layer", "relative_buckets") + ids, 0)
        self.check_ints(("relative_max_distance",), 1)
        if self.relative_buckets and (self.pos != "none" or self.relative_buckets < 4 or self.relative_buckets % 2
                                      or self.relative_max_distance <= self.relative_buckets // 2):
            raise ValueError(f"Seq2SeqConfig.relative_buckets: an even number >= 4 with pos 'none' and "
                             f"relative_max_distance > relative_buckets / 2; got {self.relative_buckets} (pos "
                             f"{self.pos!r}, relative_max_distance {self.relative_max_distance})")
        check_skip_padding(self, "roberta_positions")
        if not isinstance(self.embed_padding_idx, bool):
            raise ValueError(f"Seq2SeqConfig.embed_padding_idx: expected true or false, got {self.embed_padding_idx!r}")
        for name in ids:
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"Seq2SeqConfig.{name}: {getattr(self, name)} is not a token id (vocab_size "
                                 f"{self.vocab_size})")


def relative_buckets(rel: Tensor, bidirectional: bool, n: int, max_distance: int) -> Tensor:
    """T5's bucket (in [0, n)) of each relative position rel = key - query: half the buckets per direction when
    bidirectional, else only keys before the query count; the first half of a direction's buckets are exact
    distances, the rest logarithmic up to max_distance, the last one everything beyond."""
    out = torch.zeros_like(rel)
    if bidirectional:
        n //= 2
        out = out + (rel > 0).long() * n
        rel = rel.abs()
    else:
        rel = (-rel).clamp_min(0)
    exact = n // 2
    far = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    return out + torch.where(rel < exact, rel, far.clamp_max(n - 1))


class RelativeBias(nn.Module):
    """T5's relative-position bias: ``weight`` (buckets, heads); called with query positions (B | 1, L) and key
    positions (S,), returns the scores' bias (B | 1, H, L, S)."""

    def __init__(self, cfg: "Seq2SeqConfig", bidirectional: bool):
        super().__init__()
        self.bidirectional, self.max_distance = bidirectional, cfg.relative_max_distance
        self.weight = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_head).normal_(std=0.02))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        buckets = relative_buckets(k_pos[None, None, :] - q_pos[..., None], self.bidirectional,
                                   self.weight.shape[0], self.max_distance)
        return F.embedding(buckets, self.weight).permute(0, 3, 1, 2)


class Seq2Seq(CacheMixin, PretrainedMixin, nn.Module):
    config_class = Seq2SeqConfig
    head_modules = ("lm_head",)
    gradient_checkpointing = None  # torch.utils.checkpoint's arguments while on (gradient_checkpointing_enable)

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config: expected a Seq2SeqConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.embed_padding_idx:  # (after construction: the init stays as without it)
            self.tok_emb.padding_idx = cfg.pad_token_id
        self.enc_pos, self.dec_pos = Positions(cfg, cfg.pos_offset), Positions(cfg, cfg.pos_offset)
        self.enc_embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.dec_embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_decoder_layer))
        self.enc_rel = RelativeBias(cfg, bidirectional=True) if cfg.relative_buckets else None
        self.dec_rel = RelativeBias(cfg, bidirectional=False) if cfg.relative_buckets else None
        self.enc_norm_f = make_norm(cfg) if cfg.norm_first else None
        self.dec_norm_f = make_norm(cfg) if cfg.norm_first else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.apply(init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.memory_kv: Optional[List[Tuple[Tensor, Tensor]]] = None  # per decoder layer, during generate
        self.memory_pad: Optional[Tensor] = None

    def cached_blocks(self) -> nn.ModuleList:
        return self.decoder

    def _embed(self, ids: Tensor, positions: Tensor, pos: Positions, norm: Optional[nn.Module], name: str):
        x = embed_tokens(self.tok_emb, ids, name)
        if self.config.embed_scale != 1.0:  # mBART, BART with scale_embedding: sqrt(d_model)
            x = x * self.config.embed_scale
        pe = pos.embed(positions)
        if norm is not None:
            x = norm.post(x, pe)  # LayerNorm(tokens + positions) in one call
        elif pe is not None:
            x = x + pe
        x = drop(x, self.config.dropout, self.training, self.config.backend)
        return x, pos.rotary(positions, x.dtype)

    def _embed_decoder(self, ids: Tensor, positions: Tensor):
        return self._embed(ids, positions, self.dec_pos, self.dec_embed_norm, "decoder_input_ids")

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, positions: Optional[Tensor] = None,
               packing: Optional[Packing] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Encoder output (B, S, d_model) and its key_padding_mask (B, S) (True = padding) or None; ``positions`` and
        ``packing``: packed sequences (forward's position_ids)."""
        B, S = input_ids.shape
        pad = padding_or_none(keep_mask(input_ids, attention_mask, self.config.max_seq_len), attention_mask)
        if positions is None:
            positions = token_positions(input_ids, self.config.pad_token_id, self.config.roberta_positions)
        h, rotary = self._embed(input_ids, positions, self.enc_pos, self.enc_embed_norm, "input_ids")
        bias, extra = None, {} if packing is None else {"packing": packing}
        if self.enc_rel is not None:  # T5: by column when packed (a sequence's columns are its positions, shifted)
            cols = torch.arange(S, device=input_ids.device) if packing is not None else positions[0]
            bias = self.enc_rel(cols[None] if packing is not None else positions[:1], cols)
        residual = None
        for block in self.encoder:
            h, residual = run_block(self, block, h, residual, key_padding_mask=pad, rotary=rotary, attn_bias=bias,
                                    **extra)
        return (self.enc_norm_f.post(h, residual) if self.enc_norm_f is not None else h), pad

    def decode(self, decoder_input_ids: Tensor, positions: Tensor, memory_kv: List[Tuple[Tensor, Tensor]],
               memory_pad: Optional[Tensor], *, causal: Optional[str] = "bottom_right",
               key_padding_mask: Optional[Tensor] = None, input_pos: Optional[Tensor] = None,
               use_cache: bool = False, cache_end: Optional[int] = None, packing: Optional[Packing] = None,
               memory_packing: Optional[Packing] = None) -> Tensor:
        """Decoder hidden states (B, T, d_model); ``memory_kv``: each layer's cross-attention K/V; ``packing`` /
        ``memory_packing``: packed sequences of the decoder and of the memory (sequence n reads sequence n)."""
        h, rotary = self._embed_decoder(decoder_input_ids, positions)
        bias = None  # keys: the (first cache_end slots of the) cache when decoding (slot = position), else the inputs
        if self.dec_rel is not None and packing is not None:  # by column when packed, as the encoder's
            cols = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device)
            bias = self.dec_rel(cols[None], cols)
        elif self.dec_rel is not None:
            bias = self.dec_rel(positions, self.cache_index[:cache_end] if use_cache else positions[0])
        extra = {} if packing is None else {"packing": packing, "memory_packing": memory_packing}
        residual = None
        for block, mem in zip(self.decoder, memory_kv):
            h, residual = run_block(self, block, h, residual, memory=mem, memory_mask=memory_pad, causal=causal,
                                    key_padding_mask=key_padding_mask, rotary=rotary, input_pos=input_pos,
                                    use_cache=use_cache, attn_bias=bias, cache_end=cache_end, **extra)
        return self.dec_norm_f.post(h, residual) if self.dec_norm_f is not None else h

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs from labels: the start token, then labels[:, :-1] (-100 -> pad_token_id)."""
        out = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, self.config.pad_token_id)
        return out

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                skip_logits: Optional[bool] = None, position_ids: Optional[Tensor] = None,
                decoder_position_ids: Optional[Tensor] = None) -> ModelOutput:
        """.logits (B, T, V) of the decoder; .loss: cross-entropy against labels (B, T) (-100 ignored; no shift:
        the decoder inputs are the labels shifted right when decoder_input_ids is None). ``skip_logits`` (default:
        in training, given labels): on the fastattn backend the loss comes from fastattn.linear_cross_entropy
        without the logits, and .logits is None. ``position_ids`` (B, S) and ``decoder_position_ids`` (B, T), both
        or neither, without an attention_mask: packed pairs, each row holding the same number of sources and of
        targets (positions restarting at each), source n of a row read by target n only, each attending within
        itself (attention_varlen; decoder_input_ids are then the caller's: each target's own start token)."""
        packed = position_ids is not None or decoder_position_ids is not None
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("decoder_input_ids: needed when labels is None")
            if packed:
                raise ValueError("decoder_input_ids: needed with position_ids (each packed target starts with its "
                                 "own start token; shifting the labels right would start only the first)")
            decoder_input_ids = self.shift_right(labels)
        keep_mask(decoder_input_ids, None, self.config.max_seq_len, "decoder_input_ids")  # checks shape and length
        enc_pack = dec_pack = enc_pos = None
        if packed:
            enc_pos, positions, enc_pack, dec_pack = self._packed(input_ids, attention_mask, decoder_input_ids,
                                                                  position_ids, decoder_position_ids)
        else:
            positions = token_positions(decoder_input_ids, self.config.pad_token_id, self.config.roberta_positions)
        memory, pad = self.encode(input_ids, attention_mask, positions=enc_pos, packing=enc_pack)
        h = self.decode(decoder_input_ids, positions, [b.cross_attn.memory(memory) for b in self.decoder], pad,
                        packing=dec_pack, memory_packing=enc_pack)
        if labels is None:
            return ModelOutput(logits=self.lm_head(h))
        if labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} != decoder_input_ids' "
                             f"{tuple(decoder_input_ids.shape)}")
        logits, loss = lm_head_loss(self.lm_head, h, labels, self.config.backend,
                                    self.training if skip_logits is None else skip_logits)
        return ModelOutput(logits=logits, loss=loss)

    def _packed(self, input_ids, attention_mask, decoder_input_ids, position_ids, decoder_position_ids):
        """forward's packed pairs: (encoder positions, decoder positions, their Packings), checked."""
        if position_ids is None or decoder_position_ids is None:
            raise ValueError("position_ids, decoder_position_ids: give both (the sources' and the targets' positions "
                             "of packed pairs) or neither")
        if attention_mask is not None:
            raise ValueError("position_ids: packed pairs take no attention_mask (each sequence is found from its "
                             "positions)")
        n = self.config.max_seq_len
        enc_pos = check_position_ids(position_ids, input_ids, n)
        dec_pos = check_position_ids(decoder_position_ids, decoder_input_ids, n)
        enc, dec = packing_of(enc_pos, always=True), packing_of(dec_pos, always=True)
        if enc.cu_seqlens is not None:  # values readable (not traced, not on the meta device)
            counts = [pk.seq_ids[:, -1] - pk.seq_ids[:, 0] + 1 for pk in (enc, dec)]  # sequences a row
            if not torch.equal(*counts):
                raise ValueError(f"position_ids, decoder_position_ids: each row needs as many targets as sources, "
                                 f"got {counts[0].tolist()} sources and {counts[1].tolist()} targets")
        return enc_pos, dec_pos, enc, dec

    @classmethod
    def from_hf(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, **overrides) -> "Seq2Seq":
        """Import a local HF BART, mBART, Marian, Pegasus, M2M100 / NLLB, T5 (v1.0, v1.1 / Flan-T5) or mT5 folder
        (the *ForConditionalGeneration models or their base models; seq2seq_hf.py and seq2seq_t5.py say what carries
        over); dtype / device / overrides as in GPT.from_hf. In eval mode, as transformers' from_pretrained returns
        it. ``dropout`` is the checkpoint's hidden one (BART's dropout, T5's dropout_rate; their attention and
        activation dropouts are not taken); ``dropout=p`` overrides it. The BART family's pad row of the token
        embedding gets no gradient from the lookups (``embed_padding_idx``), as transformers' padding_idx. Original
        T5's output scale d_model ** -0.5 is folded into dec_norm_f.weight: exact in inference, but fine-tuning
        moves that weight differently from transformers' (seq2seq_t5.py)."""
        from .seq2seq_hf import import_seq2seq
        cfg, sd = import_seq2seq(path, overrides)
        model = place(cls(cfg), dtype, device)
        load_mapped(model, sd)
        return model.eval()

    # ---- generation (setup_caches: CacheMixin) ----
    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor], decoder_input_ids: Tensor) -> Tensor:
        """Encode, compute each layer's cross-attention K/V once, run the decoder prompt (B, T) into the cache; the
        last position's logits (B, V)."""
        memory, self.memory_pad = self.encode(input_ids, attention_mask)
        self.memory_kv = [b.cross_attn.memory(memory) for b in self.decoder]
        B, T = decoder_input_ids.shape
        positions = self.cache_index[:T].expand(B, T)
        self.cache_padding.fill_(True)
        self.cache_padding[:, :T] = False
        self.next_pos.fill_(T)
        h = self.decode(decoder_input_ids, positions, self.memory_kv, self.memory_pad, input_pos=self.cache_index[:T])
        return self.lm_head(h[:, -1])

    def decode_one(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """One decoder token per sequence (B, 1) at cache slot ``input_pos`` (1,), over the whole (static) cache."""
        self.cache_padding.index_fill_(1, input_pos, False)
        h = self.decode(tokens, self.step_positions(), self.memory_kv, self.memory_pad, causal=None,
                        key_padding_mask=self.cache_padding, input_pos=input_pos, use_cache=True)
        self.next_pos += 1
        return self.lm_head(h[:, -1])

    def cached_logits(self, tokens: Tensor, positions: Tensor, input_pos: Tensor, end: int) -> Tensor:
        """decode_many's decoder pass (CacheMixin)."""
        h = self.decode(tokens, positions, self.memory_kv, self.memory_pad, input_pos=input_pos, use_cache=True,
                        key_padding_mask=self.cache_padding[:, :end], cache_end=end)
        return self.lm_head(h)

    @one_generation_at_a_time
    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 typical_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = FROM_CONFIG,
                 attention_mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 streamer: Optional[Any] = None, decoder_start_token_id: Optional[int] = None,
                 min_new_tokens: int = 0, forced_bos_token_id: Optional[int] = FROM_CONFIG,
                 forced_eos_token_id: Optional[int] = FROM_CONFIG,
                 assistant_model: Optional["Seq2Seq"] = None, num_assistant_tokens: int = 4,
                 prompt_lookup_num_tokens: Optional[int] = None, max_matching_ngram_size: int = 2,
                 num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float = 1.0,
                 early_stopping: Union[bool, str] = False, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, output_scores: bool = False, cuda_graph: bool = False) -> Tensor:
        """Decoder tokens (B, 1 + new) for the source input_ids (B, S): the start token, then up to max_new_tokens
        (temperature 0 = greedy; sampling, eos, min_new_tokens, streamer, speculative decoding, beam search, the
        repetition processors, output_scores and cuda_graph as in GPT.generate; prompt lookup searches the source,
        then the tokens decoded so far; with T5's relative positions, speculative decoding takes one sequence at a
        time). The first new token is ``forced_bos_token_id`` and the last (the max_new_tokens-th)
        ``forced_eos_token_id`` when there is one, as transformers' generate forces them (not given: the config's;
        None: none).
        ``eos_token_id`` not given: config.eos_token_id, as transformers' generate reads its generation_config (None:
        no end token)."""
        eos_token_id = default_eos(eos_token_id, self.config)
        sampling = Sampling(temperature, top_k, top_p, min_p, typical_p)
        search = Search(num_beams, num_return_sequences, length_penalty, early_stopping, repetition_penalty,
                        no_repeat_ngram_size, output_scores)
        speculative = assistant_model is not None or prompt_lookup_num_tokens is not None
        input_ids, attention_mask = search.prepare(sampling, max_new_tokens, min_new_tokens, speculative, streamer,
                                                   input_ids, attention_mask)
        keep_mask(input_ids, attention_mask, self.config.max_seq_len)  # checks shapes and length
        if cuda_graph:
            check_cuda_graph(input_ids, num_beams, speculative)
        start = self.config.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
        B = input_ids.shape[0]
        out = input_ids.new_full((B, 1 + max_new_tokens), start)
        if max_new_tokens == 0:
            return search.no_new_tokens(self, out)
        slots = cache_len(1, max_new_tokens, self.config.max_seq_len, "the decoder start token")
        spec = speculation(self, B, {"the source": input_ids.shape[1], "max_new_tokens": slots},
                           assistant_model, num_assistant_tokens, prompt_lookup_num_tokens, max_matching_ngram_size)
        self.setup_caches(B, slots, headroom=spec.headroom if spec else 0)
        try:
            logits = self.prefill(input_ids, attention_mask, out[:, :1])
            forced = self.config.forced_bos_token_id if forced_bos_token_id is FROM_CONFIG else forced_bos_token_id
            last = self.config.forced_eos_token_id if forced_eos_token_id is FROM_CONFIG else forced_eos_token_id
            for name, t in (("forced_bos_token_id", forced), ("forced_eos_token_id", last)):
                if t is not None and not 0 <= t < logits.shape[-1]:
                    raise ValueError(f"{name}: {t} is not a token id (vocab_size {logits.shape[-1]})")
            if spec is not None:
                if forced is not None:
                    logits = torch.full_like(logits, float("-inf")).index_fill_(
                        -1, logits.new_tensor([forced]).long(), 0.0)
                source = list(input_ids) if attention_mask is None else \
                    [row[m.bool()] for row, m in zip(input_ids, attention_mask)]
                draft = spec.draft(out, 1, self.config.vocab_size,
                                   lambda m: m.prefill(input_ids, attention_mask, out[:, :1]),
                                   torch.zeros(B, dtype=torch.long), source)
                return speculative_generate(self, out, 1, logits, draft, spec.k, sampling=sampling,
                                            eos_token_id=eos_token_id,
                                            generator=generator, streamer=streamer, min_new_tokens=min_new_tokens,
                                            forced_eos_token_id=last)
            return search.decode(self, logits, out, 1, max_new_tokens, sampling, eos_token_id, generator, streamer,
                                 min_new_tokens, forced, None if last is None else (max_new_tokens - 1, last),
                                 cuda_graph=cuda_graph)
        finally:
            self.memory_kv = self.memory_pad = None
            if spec is not None and spec.assistant is not None:
                spec.assistant.memory_kv = spec.assistant.memory_pad = None

    def bound_decode_one(self) -> Callable[[Tensor, Tensor], Tensor]:
        """decode_one bound to the kernels chosen now, for the caches and memory of the last prefill
        (models/decode_step.py); decode_one itself when the model cannot be bound (logged)."""
        return bind_decode(self, self.decoder, self._embed_decoder, self.dec_norm_f, self.lm_head, self.memory_kv,
                           self.memory_pad) or self.decode_one

    def bound_decode_many(self, width: int) -> Callable[..., Tensor]:
        """decode_many bound likewise for ``width`` tokens per sequence (or decode_many itself)."""
        return bind_decode(self, self.decoder, self._embed_decoder, self.dec_norm_f, self.lm_head, self.memory_kv,
                           self.memory_pad, width=width) or self.decode_many
