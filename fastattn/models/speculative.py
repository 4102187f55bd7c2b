"""Speculative decoding for ``GPT.generate`` and ``Seq2Seq.generate`` (Leviathan et al. 2023; Chen et al. 2023): a
cheap draft proposes k tokens per sequence, the model scores all of them in one step of k + 1 rows (``decode_many``,
bound like the decode step) and keeps the longest prefix it agrees with, plus one token of its own. One step reads
the weights once for up to k + 1 tokens. Drafts:

- ``assistant_model``: a smaller model of the same class on the same tokenizer, with its own KV cache (transformers'
  name);
- ``prompt_lookup_num_tokens``: the tokens that followed the latest earlier occurrence of the sequence's last n-gram
  (n from ``max_matching_ngram_size`` down to 1; an encoder-decoder's source is searched first), free to draft; pays
  where outputs copy their inputs.

Greedy (temperature 0): the output is the model's own greedy output, token for token. Sampling: draft token d is
kept with probability min(1, p(d) / q(d)) and the first one rejected is replaced by a draw from max(p - q, 0)
normalised (p, q: the model's and the draft's distributions after the warpers, generation.Sampling; q is one-hot for
prompt lookup), so every token follows the model's distribution exactly; seeded runs repeat, but draw differently
from generation without a draft.

Batches: each sequence keeps its own number of drafts. Slots of rejected drafts become padding (holes); the next step
writes after the furthest slot any sequence kept, and the cache is compacted (``CacheMixin.compact_caches``) when
its headroom runs out, and after every step with holes on a model with sliding windows or ALiBi (which count slots);
bounded window caches (``setup_caches``' bound_windows) keep the headroom behind the window for the slots taken back. An
assistant's step with fillers (sequences with one token pending beside sequences with two) counts the filler in its
windows: its drafts may differ there, never the output. T5's relative positions take slot = position, so a T5
decodes speculatively one sequence at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .generation import Sampling, eos_ids, sample_next, stream_calls, warped_probs


@dataclass
class SpeculationStats:
    """What the last speculative ``generate`` did: verification steps, draft tokens proposed and accepted (summed
    over the sequences still generating), and new tokens written."""
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class _Cursor:
    """A model's cache during speculative decoding: the next slot to write and the bound step of each width."""

    def __init__(self, model: nn.Module, slot: int):
        self.m, self.slot = model, slot
        self.capacity = model.cache_padding.shape[1]
        # sliding windows and ALiBi count distances in slots: holes would stretch them
        self.windowed = any(b.attn.window or b.attn.alibi is not None for b in model.cached_blocks())
        self.steps: Dict[int, Callable] = {}

    def reserve(self, n: int) -> None:
        """Make room for n slots written next (one round), compacting the cache when they do not fit."""
        if self.slot + n > self.capacity:
            self.slot = self.m.compact_caches(self.slot)
        if self.slot + n > self.capacity:  # generate sizes the headroom so that this cannot happen
            raise RuntimeError(f"speculative decoding: {n} slots do not fit the KV cache ({self.slot} of "
                               f"{self.capacity} in use after compaction)")

    def run(self, tokens: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Write tokens (B, W) at the next W slots (``valid`` (B, W): False = a filler; W > 1 only); their logits
        (B, W, V)."""
        W = tokens.shape[1]
        step = self.steps.get(W)
        if step is None:
            step = self.steps[W] = self.m.bound_decode_one() if W == 1 else self.m.bound_decode_many(W)
        pos = self.m.cache_index[self.slot:self.slot + W]
        logits = step(tokens, pos)[:, None] if W == 1 else step(tokens, pos, valid)
        self.slot += W
        return logits

    def take_back(self, start: int, written: Tensor, reject: Tensor, active: Tensor) -> None:
        """Of the tokens ``written`` (B, W) at slots start, start + 1, ..., take back those ``reject`` marks; the next
        slot follows the last one any sequence kept. With sliding windows, holes in active sequences are closed."""
        reject = reject & written
        self.m.reject_slots(start, reject)
        kept = written & ~reject
        cols = kept.any(0).nonzero()
        self.slot = start + (int(cols.max()) + 1 if cols.numel() else 0)
        if self.windowed and bool((~kept[active][:, :self.slot - start]).any()):
            self.slot = self.m.compact_caches(self.slot)


def _fit_vocab(logits: Tensor, V: int) -> Tensor:
    """A draft's logits (..., V_d) over the model's V ids: cut, or padded with -inf (vocabularies padded apart)."""
    Vd = logits.shape[-1]
    return logits[..., :V] if Vd >= V else F.pad(logits, (0, V - Vd), value=float("-inf"))


class _ModelDraft:
    """Drafts from a smaller model, its prompt prefilled into cache slots 0..L-1. Its cache holds every committed
    token but the ``pending`` ones (1 or 2 per sequence, left-padded: the last accepted draft when all k were
    accepted, and the model's own token)."""

    def __init__(self, draft: nn.Module, L: int, V: int):
        self.m, self.V = draft, V
        self.cur = _Cursor(draft, L)

    def start(self, first: Tensor) -> None:
        self.pending, self.valid = first[:, None], None

    def propose(self, k: int, sample: Callable[[Tensor, int], Tuple[Tensor, Optional[Tensor]]], want_q: bool):
        """k draft tokens (B, k), how many are real (B,) and the draft's distributions (B, k, V) (want_q) or None."""
        w = self.pending.shape[1]
        self.cur.reserve(w + k - 1)
        self.round_start = self.cur.slot
        logits = self.cur.run(self.pending, self.valid)[:, -1]
        drafts, qs = [], []
        for i in range(k):
            logits = _fit_vocab(logits, self.V)
            d, q = sample(logits, i)
            drafts.append(d)
            qs.append(q)
            if i < k - 1:
                logits = self.cur.run(d[:, None])[:, 0]
        drafts = torch.stack(drafts, 1)
        n = torch.full((drafts.shape[0],), k, dtype=torch.long, device=drafts.device)
        return drafts, n, (torch.stack(qs, 1) if want_q else None)

    def commit(self, drafts: Tensor, a: Tensor, new: Tensor, active: Tensor) -> None:
        """a (B,) drafts accepted, then the model's token ``new`` (B,)."""
        B, k = drafts.shape
        w = self.pending.shape[1]
        written = torch.ones(B, w + k - 1, dtype=torch.bool, device=a.device)
        if self.valid is not None:
            written[:, :w] = self.valid
        cols = torch.arange(w + k - 1, device=a.device)
        reject = (cols[None] >= w + a[:, None]) | ~active[:, None]  # the drafts past the a accepted
        self.cur.take_back(self.round_start, written, reject, active)
        full = (a == k) & active  # d_k was accepted but never run through the draft: it is pending too
        if bool(full.any()):
            self.pending = torch.stack([drafts[:, -1], new], 1)
            self.valid = torch.stack([full, torch.ones_like(full)], 1)
        else:
            self.pending, self.valid = new[:, None], None


class _LookupDraft:
    """Prompt lookup: the k tokens after the latest earlier occurrence of each sequence's last n-gram that has k
    tokens after it (else after the earliest, which has the most), searched in ``prefix`` (per sequence, e.g. an
    encoder-decoder's source tokens) and the sequence from its column ``first``."""

    def __init__(self, out: Tensor, first: Tensor, ngram: int, prefix: Optional[List[Tensor]] = None):
        self.out, self.first, self.ngram, self.prefix = out, first.tolist(), ngram, prefix

    def start(self, first: Tensor) -> None:
        pass

    def propose_for(self, seq: Tensor, k: int) -> Tensor:
        T = seq.numel()
        for n in range(min(self.ngram, T - 1), 0, -1):
            windows = seq[:T - 1].unfold(0, n, 1)  # every n-gram with a token after it
            starts = (windows == seq[T - n:]).all(1).nonzero().flatten() + n  # where each continuation starts
            if starts.numel():
                full = starts[starts + k <= T]  # a loop's latest match is right behind: the fewest tokens after it
                at = int(full[-1]) if full.numel() else int(starts[0])
                return seq[at:at + k]
        return seq[:0]

    def propose(self, k: int, ends: Tensor, active: Tensor):
        B = self.out.shape[0]
        drafts = self.out.new_zeros(B, k)
        n = torch.zeros(B, dtype=torch.long, device=self.out.device)
        for b in active.nonzero().flatten().tolist():
            seq = self.out[b, self.first[b]:int(ends[b])]
            d = self.propose_for(seq if self.prefix is None else torch.cat([self.prefix[b], seq]), k)
            drafts[b, :d.numel()], n[b] = d, d.numel()
        return drafts, n, None

    def commit(self, drafts, a, new, active) -> None:
        pass


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")


@dataclass
class Speculation:
    """generate's draft arguments, checked (``speculation``)."""
    assistant: Optional[nn.Module]
    k: int  # tokens drafted a step
    ngram: int  # prompt lookup's longest n-gram

    @property
    def headroom(self) -> int:
        return 2 * (self.k + 2)  # a round writes at most k + 1 slots (the draft's: k - 1 and 2 pending)

    def draft(self, out: Tensor, L: int, V: int, prefill: Callable[[nn.Module], None], first: Tensor,
              prefix: Optional[List[Tensor]] = None):
        """The drafter for ``out`` (B, L + max_new_tokens) holding prompts of length L: the assistant, its caches
        set up and ``prefill(assistant)`` run; or prompt lookup over ``prefix`` and each row from column ``first``."""
        if self.assistant is None:
            return _LookupDraft(out, first, self.ngram, prefix)
        self.assistant.setup_caches(out.shape[0], out.shape[1] - 1, headroom=self.headroom,  # (as the model's)
                                    bound_windows=True)
        prefill(self.assistant)
        return _ModelDraft(self.assistant, L, V)


def speculation(model: nn.Module, batch: int, lengths: Dict[str, int], assistant_model, num_assistant_tokens,
                prompt_lookup_num_tokens, max_matching_ngram_size) -> Optional[Speculation]:
    """generate's draft arguments checked: None without a draft; else one kind of draft, sizes >= 1, an assistant
    of the model's class that fits ``lengths`` (max_seq_len's use -> tokens)."""
    if assistant_model is None and prompt_lookup_num_tokens is None:
        return None
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        raise ValueError("assistant_model, prompt_lookup_num_tokens: pass one kind of draft, not both")
    if batch > 1 and getattr(model, "dec_rel", None) is not None:
        raise ValueError(f"input_ids: speculative decoding of a model with relative positions (T5) takes one "
                         f"sequence at a time, got a batch of {batch}")
    if assistant_model is None:
        _positive("prompt_lookup_num_tokens", prompt_lookup_num_tokens)
        _positive("max_matching_ngram_size", max_matching_ngram_size)
        return Speculation(None, prompt_lookup_num_tokens, max_matching_ngram_size)
    if type(assistant_model) is not type(model):
        raise TypeError(f"assistant_model: expected a {type(model).__name__}, got {type(assistant_model).__name__}")
    if assistant_model is model:
        raise ValueError("assistant_model: the model itself (it needs a cache of its own: pass a smaller copy)")
    _positive("num_assistant_tokens", num_assistant_tokens)
    dev, adev = model.tok_emb.weight.device, assistant_model.tok_emb.weight.device
    if adev != dev:
        raise ValueError(f"assistant_model: on {adev}, the model on {dev}")
    for what, n in lengths.items():
        if assistant_model.config.max_seq_len < n:
            raise ValueError(f"assistant_model: config.max_seq_len {assistant_model.config.max_seq_len} < {what} "
                             f"({n})")
    if assistant_model.training:
        raise ValueError("assistant_model: in training mode (call .eval(): its drafts would use dropout)")
    if batch > 1 and getattr(assistant_model, "dec_rel", None) is not None:
        raise ValueError(f"assistant_model: a model with relative positions (T5) drafts for one sequence at a time, "
                         f"got a batch of {batch}")
    return Speculation(assistant_model, num_assistant_tokens, 0)


def _accept(logits: Tensor, drafts: Tensor, real: Tensor, q: Optional[Tensor], sampling: Sampling,
            generator) -> Tuple[Tensor, Tensor]:
    """How many drafts (B, k) each sequence keeps (B,), and the model's own token after them (B,), from the model's
    logits (B, k + 1, V) at [last token, drafts]. ``real`` (B, k): the drafts that were proposed; ``q`` (B, k, V):
    the draft's distributions, None for a one-hot draft (prompt lookup, or any greedy one). Greedy: the prefix
    equal to the model's argmax. Sampling: keep d with probability min(1, p(d) / q(d)); the first rejected is
    replaced by a draw from max(p - q, 0), normalised (after the last kept draft: a draw from p)."""
    B, k = drafts.shape
    if sampling.temperature == 0:
        pred = logits.argmax(-1)
        a = ((drafts == pred[:, :k]) & real).int().cumprod(1).sum(1)
        return a, pred.gather(1, a[:, None]).squeeze(1)
    V = logits.shape[-1]
    p = warped_probs(logits, sampling)  # (B, k + 1, V)
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = torch.ones_like(pd) if q is None else q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(pd.shape, generator=generator, device=pd.device)
    a = ((u * qd < pd) & real).int().cumprod(1).sum(1)
    pa = p.gather(1, a[:, None, None].expand(B, 1, V)).squeeze(1)  # (B, V)
    if k == 0:
        qa = torch.zeros_like(pa)
    elif q is None:  # one-hot: max(p - q, 0) is p without the rejected token
        qa = F.one_hot(drafts.gather(1, a.clamp(max=k - 1)[:, None]).squeeze(1), V).to(pa.dtype)
    else:
        qa = q.gather(1, a.clamp(max=k - 1)[:, None, None].expand(B, 1, V)).squeeze(1)
    rejected = a < real.sum(1)
    r = torch.where(rejected[:, None], (pa - qa).clamp_min(0), pa)
    r = torch.where(r.sum(-1, keepdim=True) > 0, r, pa)  # p = q exactly: nothing to reject in favour of
    return a, torch.multinomial(r, 1, generator=generator).squeeze(1)


def speculative_generate(model: nn.Module, out: Tensor, L: int, logits: Tensor, draft, k: int, *,
                         sampling: Sampling, eos_token_id, generator, streamer,
                         min_new_tokens: int, forced_eos_token_id: Optional[int] = None) -> Tensor:
    """generate's loop with a drafter (``Speculation.draft``): ``model`` prefilled (caches with the headroom),
    out (B, L + max_new_tokens) holding the prompts, logits (B, V) of the first new token. Returns out up to the
    longest continuation."""
    B = out.shape[0]
    dev, V = out.device, logits.shape[-1]
    max_new_tokens = out.shape[1] - L
    cur = _Cursor(model, L)
    assistant_model = draft.m if isinstance(draft, _ModelDraft) else None

    eos = eos_ids(eos_token_id, dev, V)
    n = torch.zeros(B, dtype=torch.long, device=dev)  # new tokens written per sequence
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    stream, end = stream_calls(streamer, out[:, :L])
    streamed = 0
    stats = model.speculation_stats = SpeculationStats()  # filled as it goes (a streamer may stop the loop)
    cols_all = torch.arange(k + 1, device=dev)

    eos_vocab = None if eos is None or not min_new_tokens else torch.isin(torch.arange(V, device=dev), eos)
    forced_row = None if forced_eos_token_id is None else \
        torch.full((V,), float("-inf"), device=dev).index_fill_(0, torch.tensor([forced_eos_token_id], device=dev), 0)

    def no_early_eos(lg: Tensor, first_index: Tensor) -> Tensor:
        """lg (B, W, V) whose row i is new token first_index + i: no eos id before min_new_tokens, and the last new
        token ``forced_eos_token_id`` (as HF's processors)."""
        index = first_index[:, None] + torch.arange(lg.shape[1], device=dev)
        if eos_vocab is not None:
            lg = lg.masked_fill((index < min_new_tokens)[..., None] & eos_vocab, float("-inf"))
        if forced_row is not None:
            lg = torch.where((index == max_new_tokens - 1)[..., None], forced_row.to(lg.dtype), lg)
        return lg

    def commit(tokens: Tensor, count: Tensor) -> None:
        """Write the first ``count`` (B,) of tokens (B, W) after each active sequence's new tokens, stopping at an eos
        and at max_new_tokens; update n and finished."""
        W = tokens.shape[1]
        cols = cols_all[:W]
        take = (cols[None] < count[:, None]) & (cols[None] < (max_new_tokens - n)[:, None]) & ~finished[:, None]
        if eos is not None:
            hit = torch.isin(tokens, eos) & take
            first = torch.where(hit.any(1), hit.int().argmax(1), W)
            take &= cols[None] <= first[:, None]
            finished.logical_or_(hit.any(1))
        b, c = take.nonzero(as_tuple=True)
        out[b, L + n[b] + c] = tokens[b, c].to(out.dtype)  # out: the prompts' dtype (int32 prompts too)
        n.add_(take.sum(1))
        if eos is not None:  # a finished sequence is padded with the first eos id, as without a draft
            pad = (torch.arange(max_new_tokens, device=dev)[None] >= n[:, None]) & finished[:, None]
            out[:, L:] = torch.where(pad, eos[0], out[:, L:])
        finished.logical_or_(n >= max_new_tokens)

    def sample(lg: Tensor, i: int):
        """The draft's token (B,) at step i from its logits (B, V), and its distribution (B, V) when sampling."""
        lg = no_early_eos(lg[:, None], n + i)[:, 0]
        if sampling.temperature == 0:
            return lg.argmax(-1), None
        q = warped_probs(lg, sampling)
        return torch.multinomial(q, 1, generator=generator).squeeze(-1), q

    first = sample_next(no_early_eos(logits[:, None], n)[:, 0], sampling, generator)
    commit(first[:, None], torch.ones_like(n))
    stats.tokens = int(n.sum())
    last = first
    draft.start(first)
    while True:
        done_cols = int(torch.where(finished, max_new_tokens, n).min())
        last_col = int(n.max()) if bool(finished.all()) else done_cols
        if stream is not None:
            for c in range(streamed, last_col):
                stream(out[:, L + c].clone())
            streamed = max(streamed, last_col)
        if bool(finished.all()):
            break
        active = ~finished
        kr = min(k, int((max_new_tokens - n)[active].max()) - 1)
        if kr > 0:
            if assistant_model is not None:
                drafts, nd, q = draft.propose(kr, sample, sampling.temperature > 0)
            else:
                drafts, nd, q = draft.propose(kr, L + n, active)
                kr = int(nd.max())
                drafts = drafts[:, :kr]
        if kr <= 0:
            kr, drafts, nd, q = 0, last.new_zeros(B, 0), torch.zeros_like(n), None
        cur.reserve(kr + 1)
        start = cur.slot
        logits = no_early_eos(cur.run(torch.cat([last[:, None], drafts], 1)), n)  # (B, kr + 1, V)
        real = cols_all[None, :kr] < nd[:, None]
        a, new = _accept(logits, drafts, real, q, sampling, generator)
        stats.steps += 1
        stats.drafted += int(nd[active].sum())
        stats.accepted += int(a[active].sum())
        tokens = torch.cat([drafts, new[:, None]], 1).scatter(1, a[:, None], new[:, None])
        commit(tokens, a + 1)
        stats.tokens = int(n.sum())
        # the model's cache keeps `last` and the accepted drafts; a sequence that stopped keeps nothing
        reject = (cols_all[None, :kr + 1] > a[:, None]) | finished[:, None]
        cur.take_back(start, torch.ones_like(reject), reject, ~finished)
        if kr:  # (kr is 0 for a model draft only in the last round)
            draft.commit(drafts, a, new, ~finished)
        last = new
    if end is not None:
        end()
    return out[:, :L + int(n.max())]
