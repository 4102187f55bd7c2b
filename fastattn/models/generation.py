"""Generation pieces the models share: sampling (transformers' warpers), end-of-text ids, the KV-cache
bookkeeping of CacheMixin (setup, speculative slots), the token loop and streaming."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import KVCache


@dataclass(frozen=True)
class Sampling:
    """How generate picks each token: temperature 0 = greedy (argmax); else a draw from softmax(logits / temperature)
    after transformers' warpers, in its order: ``top_k`` (the k likeliest), ``top_p`` (the smallest set whose
    probability reaches p), ``min_p`` (tokens at least min_p times the likeliest one's probability), ``typical_p``
    (locally typical sampling: the tokens whose surprise is nearest the entropy, holding that mass). The likeliest
    token always stays."""
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    typical_p: Optional[float] = None

    def check(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k: expected an int >= 1 or None, got {k!r}")
        for name, low_open in (("top_p", True), ("min_p", False), ("typical_p", True)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                                  not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0)):
                interval = "0 < {0} <= 1" if low_open else "0 <= {0} <= 1"
                raise ValueError(f"{name}: expected {interval.format(name)} or None, got {v!r}")


def sample_next(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> Tensor:
    """Next token (B,) from logits (B, V): argmax when the temperature is 0, else a draw from warped_probs."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(warped_probs(logits, sampling), 1, generator=generator).squeeze(-1)


def warped_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """The float32 distribution (..., V) that sample_next draws from for logits (..., V), temperature > 0."""
    shape, s, inf = logits.shape, sampling, float("-inf")
    logits = logits.reshape(-1, shape[-1]).float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, inf)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, -1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # the most likely token always stays
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, inf))
    if s.min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), inf)
    if s.typical_p is not None and s.typical_p < 1.0:
        logp = logits.log_softmax(-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        surprise = (-logp - entropy).abs()
        sorted_surprise, idx = torch.sort(surprise, -1)
        mass = logits.gather(-1, idx).softmax(-1).cumsum(-1)
        last = (mass < s.typical_p).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        drop = sorted_surprise > sorted_surprise.gather(-1, last)
        drop[:, 0] = False  # the most typical token stays
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), inf)
    return logits.softmax(-1).view(shape)


def token_logprobs(logits: Tensor, tokens: Tensor, sampling: Sampling) -> Tensor:
    """float32 log-probabilities (B,) of ``tokens`` (B,) under the distribution they were picked from: softmax of the
    (processed) logits (B, V) when greedy, else warped_probs (transformers' compute_transition_scores with
    normalize_logits)."""
    if sampling.temperature == 0:
        logp = logits.float().log_softmax(-1)
    else:
        logp = warped_probs(logits, sampling).log()
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def check_sampling(max_new_tokens: int, sampling: Sampling, min_new_tokens: int = 0) -> None:
    for name, n in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {n!r}")
    sampling.check()


class _FromConfig:
    """generate's ``eos_token_id`` default: the model config's (transformers' generate reads its generation_config
    when the argument is not passed; passing None means no end token)."""

    def __repr__(self) -> str:
        return "<the config's>"


FROM_CONFIG = _FromConfig()


def default_eos(eos_token_id, config):
    """eos_token_id as given, or the config's when it was not (FROM_CONFIG)."""
    return getattr(config, "eos_token_id", None) if eos_token_id is FROM_CONFIG else eos_token_id


def eos_ids(eos_token_id, device, vocab_size: int) -> Optional[Tensor]:
    """``eos_token_id`` (a token id, a list of them as in HF's generation_config, or None) as a 1-D long tensor on
    device; ValueError naming it unless every id is a token of the ``vocab_size`` the model predicts."""
    if eos_token_id is None:
        return None
    try:
        ids = torch.as_tensor(eos_token_id).flatten()
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or not ids.numel() or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"eos_token_id: expected a token id, a list of them or None, got {eos_token_id!r}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"eos_token_id: {bad.tolist()} not token ids of this model (vocab_size {vocab_size})")
    return ids.long().to(device)


def cache_len(prompt: int, max_new_tokens: int, max_seq_len: int, what: str) -> int:
    """Cache slots (positions) that a generation of max_new_tokens >= 1 after ``prompt`` tokens (``what`` they are)
    fills: the last new token is never fed back (a 15-token prompt and 2 new tokens fit 16 positions, as in
    transformers). A ValueError in generate's own arguments when that passes config.max_seq_len."""
    n = prompt + max_new_tokens - 1
    if n > max_seq_len:
        raise ValueError(f"max_new_tokens: {what} and {max_new_tokens} new tokens take {n} positions (all but the "
                         f"last new token), more than config.max_seq_len {max_seq_len}")
    return n


class CacheMixin:
    """``setup_caches`` for a model whose ``cached_blocks()`` attend causally over their own past (GPT's blocks, the
    Seq2Seq decoder's). Buffers (not in the state_dict): each block's KVCache, ``cache_padding`` (B, max_len) True =
    padding or not written yet, ``next_pos`` (B, 1) each sequence's next position, ``cache_index`` arange(max_len).
    ``decode_many`` needs the model's ``cached_logits(tokens, positions, input_pos, end)``: logits (B, W, V) of tokens
    written at cache slots input_pos, attending causally over the first ``end`` slots."""

    def cached_blocks(self) -> nn.ModuleList:
        return self.blocks

    window_slots = 0  # slots of a bounded windowed layer's cache (0: every cache holds the whole generation)
    window_offset = 0  # the generation's slot in such a cache's first slot
    window_margin = 0  # slots written and taken back (speculative headroom) a bounded cache keeps behind the window

    def setup_caches(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None, device=None, *,
                     headroom: int = 0, bound_windows: bool = False) -> None:
        """Preallocate every layer's K/V cache for ``batch`` sequences of up to ``max_len`` tokens (kept when the
        shapes already match), plus ``headroom`` slots for tokens that may be written and then taken back
        (speculative decoding's rejected drafts). ``bound_windows``: a sliding-window layer's cache holds only
        ``bounded_slots`` of them (when fewer), moved along as the generation goes (``make_room``; host syncs and
        shifts: not for a step to compile or graph)."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len: {max_len} > config.max_seq_len {self.config.max_seq_len}")
        max_len += headroom
        ref = self.tok_emb.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        blocks, cfg = self.cached_blocks(), self.config
        window = getattr(cfg, "sliding_window", None) or 0
        S = bounded_slots(window, headroom) if bound_windows and window else 0
        self.window_slots = S if S < max_len else 0
        self.window_offset, self.window_margin = 0, headroom
        for block in blocks:
            bounded = bool(self.window_slots and block.attn.window)
            cache = block.attn.cache
            # a cache made under torch.inference_mode cannot be written outside it: made anew then
            if cache is None or cache.bounded != bounded or \
                    tuple(cache.k.shape) != (batch, cfg.n_kv_head, S if bounded else max_len, cfg.head_dim) or \
                    cache.k.dtype != dtype or cache.k.device != torch.device(device) or \
                    (cache.k.is_inference() and not torch.is_inference_mode_enabled()):
                block.attn.cache = KVCache(batch, cfg.n_kv_head, S if bounded else max_len, cfg.head_dim, dtype,
                                           device, bounded)
        self.register_buffer("cache_padding", torch.ones(batch, max_len, dtype=torch.bool, device=device),
                             persistent=False)
        self.register_buffer("next_pos", torch.zeros(batch, 1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("cache_index", torch.arange(max_len, device=device), persistent=False)

    # ---- bounded sliding-window caches: the slots [window_offset, window_offset + window_slots) ----
    def window_args(self, input_pos: Tensor, padding: Optional[Tensor], end: Optional[int],
                    use_cache: bool) -> dict:
        """A bounded cache's attention arguments for a pass written at slots ``input_pos``: the positions in it, and
        when the pass reads the cache (``use_cache``), its part of the ``padding`` (the cache's, or its first ``end``
        slots') and its end."""
        off, S = self.window_offset, self.window_slots
        if use_cache:
            padding = padding[:, off:off + S] if end is None else padding[:, off:end]
        return dict(input_pos=input_pos - off, key_padding_mask=padding,
                    cache_end=None if end is None else end - off)

    def bounded_caches(self) -> List[KVCache]:
        return [b.attn.cache for b in self.cached_blocks() if b.attn.cache.bounded] if self.window_slots else []

    def make_room(self, first: int, last: int) -> None:
        """Before a pass writes slots first..last, whose rows see the window behind ``first``: when ``last`` falls
        past the bounded caches, shift them so that they start ``window_margin`` slots before that window (one copy
        per bounded_slots' chunk of steps)."""
        off, S = self.window_offset, self.window_slots
        start = first - self.config.sliding_window + 1  # the first slot a row sees
        if max(start, 0) < off or last - start + 1 + self.window_margin > S:
            raise RuntimeError(f"bounded window cache: slots {first}..{last} do not fit its {S} slots from {off}")
        if last < off + S:
            return
        new = min(start - self.window_margin, self.cache_padding.shape[1] - S)
        for c in self.bounded_caches():
            c.shift(new - off)
        self.window_offset = new

    def decode_many(self, tokens: Tensor, input_pos: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Several tokens per sequence (B, W), written at the consecutive cache slots ``input_pos`` (W,), each
        attending to the cache up to its own slot (a speculative step's drafts, checked at once). ``valid`` (B, W)
        bool, False = a filler: its slot stays padding and its position is not counted (its logits mean nothing).
        Returns logits (B, W, V)."""
        valid, positions = self.claim_slots(tokens, input_pos, valid)
        end = int(input_pos[-1]) + 1
        if self.window_slots:
            self.make_room(end - tokens.shape[1], end - 1)
        logits = self.cached_logits(tokens, positions, input_pos, end)
        self.next_pos += valid.sum(-1, keepdim=True)
        return logits

    def step_positions(self) -> Tensor:
        """next_pos for a one-token step (B, 1), clamped as claim_slots clamps: an assistant model drafts as far ahead
        of a sequence near its end as of the others, and those drafts, never kept, take the last position."""
        return self.next_pos.clamp(max=self.config.max_seq_len - 1)

    def claim_slots(self, tokens: Tensor, input_pos: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """decode_many's bookkeeping before its pass (the bound step's too): the W slots ``input_pos`` kept, or
        padding for fillers; returns ``valid`` (all True when None) and the tokens' positions (B, W). A batch drafts
        as many tokens for a sequence near its end as for the others: the drafts past its max_new_tokens, never
        kept, take the last position (a learned position table has no row for theirs)."""
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
        self.cache_padding[:, input_pos] = ~valid
        return valid, (self.next_pos + valid.cumsum(-1) - 1).clamp(0, self.config.max_seq_len - 1)

    def reject_slots(self, start: int, reject: Tensor) -> None:
        """Take back the tokens written at cache slots start, start + 1, ... that ``reject`` (B, W) marks (drafts that
        were not accepted): their slots become padding, and each sequence's next position goes back by its count."""
        self.cache_padding[:, start:start + reject.shape[1]] |= reject
        self.next_pos -= reject.sum(1, keepdim=True)

    def compact_caches(self, end: int) -> int:
        """Close the holes that rejected tokens left among the first ``end`` slots: each sequence's written slots move,
        in order, to the right end of the first n slots (n: the most any sequence has), left-padded as after
        prefill. Returns n, the slot to write next."""
        keep = ~self.cache_padding[:, :end]
        n = int(keep.sum(1).max())
        # a stable sort puts each row's padding first and its kept slots last, in order: the last n are the sources
        src = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices[:, end - n:]  # (B, n)
        for block in self.cached_blocks():
            c = block.attn.cache
            if c.bounded:
                continue
            idx = src[:, None, :, None].expand(c.k.shape[0], c.k.shape[1], n, c.k.shape[3])
            k, v = c.k[:, :, :end].gather(2, idx), c.v[:, :, :end].gather(2, idx)
            c.k[:, :, :n], c.v[:, :, :n] = k, v
        if self.window_slots:
            self._compact_bounded(src, n)
        self.cache_padding[:, :n] = ~keep.gather(1, src)
        self.cache_padding[:, n:] = True
        return n

    def _compact_bounded(self, src: Tensor, n: int) -> None:
        """compact_caches for the bounded caches: they start again window_margin slots before the window of slot n,
        each slot gathered from its source ``src`` (B, n). The sources of the slots in that window (the last kept ones
        of each active sequence: holes are closed after every step) are in the cache; older ones, never seen again,
        are clamped into it."""
        off, S = self.window_offset, self.window_slots
        new = min(max(n - self.config.sliding_window + 1 - self.window_margin, 0), self.cache_padding.shape[1] - S)
        local = (src[:, new:] - off).clamp(0, S - 1)  # (B, n - new)
        for c in self.bounded_caches():
            idx = local[:, None, :, None].expand(c.k.shape[0], c.k.shape[1], local.shape[1], c.k.shape[3])
            k, v = c.k.gather(2, idx), c.v.gather(2, idx)
            c.k[:, :, :local.shape[1]], c.v[:, :, :local.shape[1]] = k, v
        self.window_offset = new


def bounded_slots(window: int, headroom: int = 0) -> int:
    """Slots of a bounded sliding-window cache: the window, a chunk of min(window, 256) slots written between two
    shifts, and twice the headroom (rows written at once, and rows taken back)."""
    return window + min(window, 256) + 2 * headroom


def generation_loop(logits: Tensor, decode_one, out: Tensor, start: int, max_new_tokens: int, sampling: Sampling,
                    eos_token_id, generator, streamer, process, scores: Optional[List[Tensor]] = None) -> Tensor:
    """Sample from ``logits`` (B, V) after ``process(logits, tokens so far, i)`` (beam.LogitsProcessors: penalties,
    min_new_tokens, forced tokens), write the token into out[:, start + i], feed it to ``decode_one(tokens (B, 1),
    input_pos (1,))`` for the next logits; eos handling and streaming as ``GPT.generate`` documents. ``scores``: a
    list that gets each step's (B,) log-probability of the chosen tokens (token_logprobs; 0 after an eos)."""
    finished = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    index = torch.arange(start, start + max_new_tokens, device=out.device)
    eos = eos_ids(eos_token_id, out.device, logits.shape[-1])
    stream, end = stream_calls(streamer, out[:, :start])
    for i in range(max_new_tokens):
        logits = process(logits, out[:, :start + i], i)
        tok = sample_next(logits, sampling, generator)
        if scores is not None:
            scores.append(token_logprobs(logits, tok, sampling).masked_fill(finished, 0.0))
        if eos is not None:
            tok = tok.masked_fill(finished, eos[0])
            finished |= torch.isin(tok, eos)
        out[:, start + i] = tok
        if stream is not None:
            stream(tok)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            if end is not None:
                end()
            return out[:, :start + i + 1]
        logits = decode_one(tok[:, None], index[i:i + 1])
    return out


def stream_calls(streamer, prompt: Tensor):
    """(per-token call, end call) of generate's ``streamer``: a callable, called with each new token batch (B,);
    or an object with put / end like transformers' streamers (TextStreamer, TextIteratorStreamer), called as HF's
    generate calls them: put(prompt) now, put(tokens) per step, end() after the last (CPU tensors)."""
    if streamer is None:
        return None, None
    if callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None)):
        streamer.put(prompt.cpu())
        return (lambda tok: streamer.put(tok.cpu())), streamer.end
    if not callable(streamer):
        raise ValueError(f"streamer: expected a callable or an object with put / end (transformers' streamers), got "
                         f"{type(streamer).__name__}")
    return streamer, None
