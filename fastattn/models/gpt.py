"""GPT: a decoder-only causal language model on fastattn's fused ops (GPT-2, Llama, Qwen, Gemma shapes), with a static
KV cache, prefill / decode generation and import of HF checkpoints (the importers: gpt_hf.py).

    model = GPT(GPTConfig(vocab_size=50257, d_model=768, n_layer=12, n_head=12))
    out = model(input_ids, labels=input_ids)                    # out.logits (B, L, V), out.loss
    ids = model.generate(prompt, 128, temperature=0)              # greedy; temperature > 0 samples
    model = GPT.from_hf("path/to/gpt2")                           # or a Llama-family folder

Generation: ``setup_caches(batch, max_len)`` preallocates each layer's K/V (B, Hk, max_len, D); ``prefill`` runs the
prompt (left-padded batches: ``attention_mask`` 1 = token, 0 = padding on the left), writes the cache and gives the
last position's logits; ``decode_one`` runs one token per sequence against the whole cache with static shapes (the
empty and padded slots masked), so it can be compiled or graphed. Positions count each sequence's real tokens only,
so a left-padded prompt generates what it would alone. ``generate`` bounds the caches of sliding-window layers
(``setup_caches(..., bound_windows=True)``): each keeps the window and a chunk after it, shifted along on the host, so
their memory does not grow with max_new_tokens (not under ``cuda_graph``, whose captured step needs static caches).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .beam import Search
from .checkpoint import load_mapped, place
from .decode_step import bind_decode
from .generation_lock import one_generation_at_a_time
from .graphs import check_cuda_graph
from .config import ModelConfig
from .generation import FROM_CONFIG, CacheMixin, Sampling, cache_len, default_eos
from .layers import (Block, ModelOutput, PretrainedMixin, drop, embed_tokens, init_weights, keep_mask, lm_head_loss,
                     make_norm, padding_or_none, shifted_target, softcap, run_block)
from .positions import Positions
from .moe import load_balancing_loss
from .packing import Packing, check_position_ids, packing_of
from .speculative import speculation, speculative_generate

log = logging.getLogger("fastattn")


@dataclass
class GPTConfig(ModelConfig):
    """ModelConfig, and ``embed_norm``: a LayerNorm on the token embeddings (BLOOM's word_embeddings_layernorm)."""
    model_type = "gpt"
    embed_norm: bool = False
    # the token embedding row that lookups send no gradient into (nn.Embedding's padding_idx: transformers' Llama,
    # Mistral, Gemma, OPT, ... set it to their pad_token_id; from_hf reads it); None: none
    padding_idx: Optional[int] = None
    # generate's end token(s) when it is given none: an id or a list (transformers' generation_config.eos_token_id,
    # which from_hf reads); None: none
    eos_token_id: Union[int, List[int], None] = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.embed_norm, bool):
            raise ValueError(f"GPTConfig.embed_norm: expected true or false, got {self.embed_norm!r}")
        if self.padding_idx is not None and not self._is_token(self.padding_idx):
            raise ValueError(f"GPTConfig.padding_idx: expected a token id (< vocab_size {self.vocab_size}) or None, "
                             f"got {self.padding_idx!r}")
        self.check_eos()


class GPT(CacheMixin, PretrainedMixin, nn.Module):
    config_class = GPTConfig
    head_modules = ("lm_head",)
    gradient_checkpointing = None  # torch.utils.checkpoint's arguments while on (gradient_checkpointing_enable)

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tok_emb.padding_idx = cfg.padding_idx  # (after construction: the init stays as without it)
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.pos = Positions(cfg, cfg.pos_offset)
        self._refill = None  # during a generate that crosses LongRoPE's original context (_longrope_step)
        self.blocks = nn.ModuleList(Block(cfg, layer=i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_first else None  # post-norm blocks end normalised
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.apply(init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # ---- the network ----
    def embed(self, input_ids: Tensor, positions: Tensor) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """Token (+ position) embeddings (B, L, d_model) of tokens (B, L) at ``positions`` (B, L), and the rotary
        cos / sin (B, L, 1, head_dim) for the attention layers, or None."""
        x = embed_tokens(self.tok_emb, input_ids)
        if self.config.embed_scale != 1.0:  # Gemma: sqrt(d_model), in the embedding's dtype as there
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        pe = self.pos.embed(positions)
        if pe is not None:
            x = x + pe
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = drop(x, self.config.dropout, self.training, self.config.backend)
        return x, self.pos.rotary(positions, x.dtype)

    def hidden(self, input_ids: Tensor, positions: Tensor, *, causal: Optional[str] = "bottom_right",
               key_padding_mask: Optional[Tensor] = None, input_pos: Optional[Tensor] = None,
               use_cache: bool = False, cache_end: Optional[int] = None,
               packing: Optional[Packing] = None) -> Tensor:
        """Final hidden states (B, L, d_model) of tokens (B, L) at ``positions`` (B, L)."""
        h, rotary = self.embed(input_ids, positions)
        residual = None
        cache_kw = dict(key_padding_mask=key_padding_mask, input_pos=input_pos, cache_end=cache_end)
        # the windowed layers' bounded caches (setup_caches' bound_windows) hold a run of the slots: their own view
        window_kw = self.window_args(input_pos, key_padding_mask, cache_end, use_cache) \
            if self.window_slots and input_pos is not None else None
        for block in self.blocks:
            kw = window_kw if window_kw is not None and block.attn.cache.bounded else cache_kw
            h, residual = run_block(self, block, h, residual, causal=causal, rotary=rotary, use_cache=use_cache,
                                    packing=packing, **kw)
        return self.norm_f.post(h, residual) if self.norm_f is not None else h

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                *, shift_labels: Optional[Tensor] = None, skip_logits: Optional[bool] = None,
                position_ids: Optional[Tensor] = None) -> ModelOutput:
        """input_ids (B, L); attention_mask (B, L) 1 = token, 0 = padding; labels (B, L) (shifted here: position t
        predicts labels[t + 1]; -100 ignored) or shift_labels (B, L), already shifted (position t predicts
        shift_labels[t]), as transformers' loss functions name them. Returns .logits (B, L, V) and .loss.
        ``position_ids`` (B, L) or (1, L): each token's position (default: counted over the real tokens); without
        an attention_mask, positions that restart mark packed sequences (transformers' DataCollatorWithFlattening
        batches), each attending only within itself (fastattn.attention_varlen: no work across sequences). Their
        labels are the caller's: a sequence's first label should be -100 (as that collator writes it), or the token
        before it learns to predict it.
        ``skip_logits`` (default: in training, given labels): on the fastattn backend the loss comes from
        fastattn.linear_cross_entropy without the logits, and .logits is None."""
        keep = keep_mask(input_ids, attention_mask, self.config.max_seq_len)
        packing = None
        if position_ids is None:
            positions = (keep.cumsum(-1) - 1).clamp_min(0)
        else:
            positions = check_position_ids(position_ids, input_ids, self.config.max_seq_len)
            packing = packing_of(positions) if attention_mask is None else None
        target = shifted_target(labels, shift_labels, input_ids)
        routers = [] if self.config.router_aux_loss_coef and target is not None and self.training else None
        for block in self.blocks if routers is not None else ():
            block.mlp.collect = routers
        try:
            h = self.hidden(input_ids, positions, key_padding_mask=padding_or_none(keep, attention_mask),
                            packing=packing)
        finally:
            for block in self.blocks if routers is not None else ():
                block.mlp.collect = None
        if target is None:
            return ModelOutput(logits=self.logits(h))
        cap = self.config.final_softcap
        logits, loss = lm_head_loss(self.lm_head, h, target, self.config.backend,
                                    self.training if skip_logits is None else skip_logits,
                                    (lambda z: softcap(z, cap)) if cap else None)
        if not routers:
            return ModelOutput(logits=logits, loss=loss)
        aux = load_balancing_loss(routers, self.config.n_experts_per_tok, None if attention_mask is None else keep)
        return ModelOutput(logits=logits, loss=loss + self.config.router_aux_loss_coef * aux, aux_loss=aux)

    def logits(self, h: Tensor) -> Tensor:
        """The LM head on final hidden states; Gemma 2 caps the logits: c * tanh(logits / c)."""
        return softcap(self.lm_head(h), self.config.final_softcap)

    # ---- KV cache and generation (setup_caches: CacheMixin) ----
    def prefill(self, input_ids: Tensor, keep: Tensor) -> Tensor:
        """Run the prompt (B, L) (``keep``: bool (B, L), False = left padding) into the cache at positions 0..L-1;
        return the last position's logits (B, V)."""
        L = input_ids.shape[1]
        positions = (keep.cumsum(-1) - 1).clamp_min(0)
        self.cache_padding.fill_(True)
        self.cache_padding[:, :L] = ~keep
        self.next_pos.copy_(positions[:, -1:] + 1)
        self.window_offset = max(L - self.window_slots, 0) if self.window_slots else 0  # (a longer prompt's end)
        h = self.hidden(input_ids, positions, key_padding_mask=padding_or_none(keep, keep),
                        input_pos=self.cache_index[:L])
        return self.logits(h[:, -1])

    def decode_one(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """One token per sequence (B, 1), written at cache slot ``input_pos`` (1,); attends over the whole cache with
        the unwritten slots masked (static shapes; a bounded window cache first makes room: CacheMixin.make_room).
        Returns logits (B, V)."""
        self.cache_padding.index_fill_(1, input_pos, False)
        if self.window_slots:
            slot = int(input_pos[0])
            self.make_room(slot, slot)
        h = self.hidden(tokens, self.step_positions(), causal=None, key_padding_mask=self.cache_padding,
                        input_pos=input_pos, use_cache=True)
        self.next_pos += 1
        return self.logits(h[:, -1])

    def cached_logits(self, tokens: Tensor, positions: Tensor, input_pos: Tensor, end: int) -> Tensor:
        """decode_many's pass (CacheMixin)."""
        h = self.hidden(tokens, positions, key_padding_mask=self.cache_padding[:, :end], input_pos=input_pos,
                        use_cache=True, cache_end=end)
        return self.logits(h)

    @one_generation_at_a_time
    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 typical_p: Optional[float] = None,
                 eos_token_id: Union[int, Sequence[int], None] = FROM_CONFIG,
                 attention_mask: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None,
                 streamer: Optional[Any] = None, min_new_tokens: int = 0, assistant_model: Optional["GPT"] = None,
                 num_assistant_tokens: int = 4, prompt_lookup_num_tokens: Optional[int] = None,
                 max_matching_ngram_size: int = 2, num_beams: int = 1, num_return_sequences: int = 1,
                 length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, output_scores: bool = False,
                 cuda_graph: bool = False) -> Tensor:
        """Continue prompts (B, L) by up to max_new_tokens: (B, L + new). temperature 0 = greedy; else sampling with
        top_k / top_p / min_p / typical_p (generation.Sampling: transformers' warpers; each off when None, so
        sampling draws from the whole distribution unless asked: transformers' do_sample applies top_k=50 by default,
        `fastattn generate` too) from ``generator`` (seeded: reproducible). Batches of different lengths: left padding
        and
        attention_mask (1 = token). eos_token_id: an id or a list of ids (as in HF's generation_config); not given:
        config.eos_token_id (from_hf reads the checkpoint's generation_config, as transformers' generate does);
        None: no end token. After one a sequence is padded with the first; generation stops when every sequence has
        finished. The prompt and max_new_tokens - 1 new tokens (the last is not fed back) fit
        config.max_seq_len. ``min_new_tokens``: no eos id is sampled before that many new tokens (HF's
        min_new_tokens).
        ``streamer(tokens (B,))`` is called with each new token batch; a streamer object of transformers'
        (TextStreamer, TextIteratorStreamer: put / end) is called as HF's generate calls it.
        Speculative decoding (models/speculative.py; the same output when greedy, the same distribution when
        sampling): ``assistant_model``, a smaller GPT on the same tokenizer, drafts ``num_assistant_tokens`` tokens a
        step; or ``prompt_lookup_num_tokens`` tokens are drafted from the sequence itself, matching its last
        ``max_matching_ngram_size`` tokens or fewer. ``self.speculation_stats`` then tells how many were accepted.
        ``num_beams`` > 1: beam search (models/beam.py; transformers' ``length_penalty``, ``early_stopping``), the
        ``num_return_sequences`` best of each prompt in a row (B * R, L + n), their scores in ``self.beam_scores``;
        when sampling, R samples of each prompt in a row. ``repetition_penalty``, ``no_repeat_ngram_size``:
        transformers' processors, in any search but speculative. ``output_scores`` (greedy, sampling):
        ``self.token_logprobs`` (B, new), each new token's log-probability under the distribution it was picked
        from (0 after an eos), as transformers' compute_transition_scores(normalize_logits=True) gives.
        ``cuda_graph`` (a CUDA model; greedy search and sampling): the decode step is captured once and replayed
        from a CUDA graph (models/graphs.py), which takes the host's launch time out of every token; the windowed
        layers then keep caches of the whole generation (otherwise bounded: ``setup_caches``' bound_windows)."""
        eos_token_id = default_eos(eos_token_id, self.config)
        sampling = Sampling(temperature, top_k, top_p, min_p, typical_p)
        search = Search(num_beams, num_return_sequences, length_penalty, early_stopping, repetition_penalty,
                        no_repeat_ngram_size, output_scores)
        speculative = assistant_model is not None or prompt_lookup_num_tokens is not None
        input_ids, attention_mask = search.prepare(sampling, max_new_tokens, min_new_tokens, speculative, streamer,
                                                   input_ids, attention_mask)
        keep = keep_mask(input_ids, attention_mask, self.config.max_seq_len)
        B, L = input_ids.shape
        if L == 0:
            raise ValueError("input_ids: generate needs a prompt of at least one token, got (B, 0)")
        if not bool(keep[:, -1].all()):
            raise ValueError("attention_mask: generate needs prompts padded on the left (the last column is padding "
                             "in some row)")
        if cuda_graph:
            check_cuda_graph(input_ids, num_beams, speculative)
        if max_new_tokens == 0:
            return search.no_new_tokens(self, input_ids)
        slots = cache_len(L, max_new_tokens, self.config.max_seq_len, f"a prompt of {L} tokens (input_ids)")
        spec = speculation(self, B, {"the prompt plus max_new_tokens - 1": slots}, assistant_model,
                           num_assistant_tokens, prompt_lookup_num_tokens, max_matching_ngram_size)
        self.setup_caches(B, slots, headroom=spec.headroom if spec else 0, bound_windows=not cuda_graph)
        out = input_ids.new_empty(B, L + max_new_tokens)
        out[:, :L] = input_ids
        logits = self.prefill(input_ids, keep)
        at = self.pos.long_from  # LongRoPE's original context, when this generation will cross it and re-run there
        if at is not None and L <= at < L + max_new_tokens - 1 and self.config.rope_scaling.get("refill_cache", True):
            if spec is None and num_beams == 1:
                self._refill = (at, out, keep)
            else:
                log.warning("generate: beam search and speculative decoding past LongRoPE's original context (%d) "
                            "keep the cache of the short factors (with rope_scaling's refill_cache, as transformers' "
                            "Phi-3, greedy search and sampling re-run the sequence with the long ones at that step)",
                            at)
        try:
            if spec is not None:
                draft = spec.draft(out, L, self.config.vocab_size, lambda m: m.prefill(input_ids, keep),
                                   (~keep).sum(1))
                return speculative_generate(self, out, L, logits, draft, spec.k, sampling=sampling,
                                            eos_token_id=eos_token_id, generator=generator,
                                            streamer=streamer, min_new_tokens=min_new_tokens)
            if cuda_graph and self._refill is not None:
                log.info("generate: cuda_graph off for this call (LongRoPE re-runs the sequence at step %d)", at)
            return search.decode(self, logits, out, L, max_new_tokens, sampling, eos_token_id, generator, streamer,
                                 min_new_tokens, ignore=None if bool(keep.all()) else ~keep,
                                 cuda_graph=cuda_graph and self._refill is None)
        finally:
            self._refill = None

    def bound_decode_one(self) -> Callable[[Tensor, Tensor], Tensor]:
        """decode_one bound to the kernels chosen now, for the caches as set up (models/decode_step.py): the same
        step with the per-op checks done once; decode_one itself when the model cannot be bound (logged)."""
        step = bind_decode(self, self.blocks, self.embed, self.norm_f, self.lm_head) or self.decode_one
        return step if self._refill is None else self._longrope_step(step, *self._refill)

    def _longrope_step(self, step, at: int, out: Tensor, keep: Tensor):
        """``step``, except that the call feeding column ``at`` (LongRoPE's original context) re-runs every column so
        far through the prefill, its positions now past the original context: the long factors' rotary positions
        for all of them, as transformers' Phi-3 generate recomputes its cache at that step."""
        col = [keep.shape[1]]  # the column the next call feeds: the first new token's

        def call(tokens: Tensor, input_pos: Tensor) -> Tensor:
            c, col[0] = col[0], col[0] + 1
            if c != at:
                return step(tokens, input_pos)
            new = torch.ones(keep.shape[0], c + 1 - keep.shape[1], dtype=torch.bool, device=keep.device)
            return self.prefill(out[:, :c + 1], torch.cat([keep, new], 1))
        return call

    def bound_decode_many(self, width: int) -> Callable[..., Tensor]:
        """decode_many bound likewise for ``width`` tokens per sequence (or decode_many itself)."""
        return bind_decode(self, self.blocks, self.embed, self.norm_f, self.lm_head, width=width) or \
            self.decode_many

    # ---- HF checkpoints ----
    @classmethod
    def from_hf(cls, path: str, *, dtype: Optional[torch.dtype] = None, device=None, **overrides) -> "GPT":
        """Import a local HF GPT-2, Llama-family (Llama, Mistral, Qwen2, Qwen3, Phi-3; Mixtral and Qwen3-MoE's experts)
        or Gemma 1 / 2 / 3 (text) folder (config.json + model.safetensors or pytorch_model.bin; models/gpt_hf*.py
        list every family).
        ``dtype`` / ``device``: the model's (e.g. torch.bfloat16, "cuda"; default float32 on the CPU), the weights
        converted as they load. ``overrides`` set config fields (e.g. backend="torch", dropout=0.1). The model comes
        back in eval mode, as transformers' from_pretrained returns it (``.train()`` to fine-tune)."""
        from .gpt_hf import import_gpt  # the importers of each family (they build GPTConfigs: imported here)
        cfg, sd = import_gpt(path, overrides)
        model = place(cls(cfg), dtype, device)
        load_mapped(model, sd)
        return model.eval()  # as transformers' from_pretrained
