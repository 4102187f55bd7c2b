"""Beam search and transformers' repetition processors for ``GPT.generate`` and ``Seq2Seq.generate``.

Beam search keeps ``num_beams`` running hypotheses per sequence: each step scores every continuation of every beam
(accumulated log-probabilities), keeps the best, and files those that end (an eos id, or the length limit) among the
finished hypotheses, scored by sum of log-probabilities / (generated length ** ``length_penalty``). It follows
transformers' own (vectorised, 4.50+) beam search step by step: ``max(2, 1 + number of eos ids) * num_beams``
candidates a step, ``early_stopping`` True / False / "never" with its stopping heuristic, so that, fed the same
logits, it picks the same tokens (tests/test_models_beam.py compares with transformers' ``generate``).

Caches: the prompt is run once per sequence, then each layer's K/V cache (and a Seq2Seq's cross-attention memory)
is repeated for the beams (``expand_caches``); after each step the beams that changed parent copy their parent's
written cache rows (``reorder_caches``), not every row.

``repetition_penalty`` and ``no_repeat_ngram_size`` (``LogitsProcessors``) mean what they mean in transformers: the
penalty divides a positive score and multiplies a negative one of every token already in the sequence (the prompt's
tokens but not its left padding, a Seq2Seq's decoder start token included); an n-gram already in the sequence
(prompt and padding included) is not completed again. Greedy and sampling apply them to the logits, beam search to
the log-probabilities, each as transformers does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hugepages
from .generation import Sampling, check_sampling, eos_ids, generation_loop
from .graphs import GraphedStep

EarlyStopping = Union[bool, str]


@dataclass
class Search:
    """generate's search arguments (transformers' names and defaults)."""
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    output_scores: bool = False

    def check(self, temperature: float, speculative: bool, streamer) -> None:
        for name, low in (("num_beams", 1), ("num_return_sequences", 1), ("no_repeat_ngram_size", 0)):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {n!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences: {self.num_return_sequences} > num_beams {self.num_beams} (beam "
                             f"search returns at most its beams)")
        if self.num_beams == 1 and self.num_return_sequences > 1 and temperature == 0:
            raise ValueError(f"num_return_sequences: greedy search gives one sequence per prompt, not "
                             f"{self.num_return_sequences} (sample with temperature > 0, or use num_beams)")
        if not any(self.early_stopping is v for v in (True, False)) and self.early_stopping != "never":
            raise ValueError(f"early_stopping: expected True, False or 'never', got {self.early_stopping!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty: expected a float, got {self.length_penalty!r}")
        p = self.repetition_penalty
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"repetition_penalty: expected a float > 0 (1 = none), got {p!r}")
        if self.num_beams > 1:
            if temperature != 0:
                raise ValueError(f"num_beams: beam search here is greedy (temperature 0), got temperature "
                                 f"{temperature} (beam sampling is not supported)")
            if streamer is not None:
                raise ValueError("streamer: beam search's tokens are known only at its end (as in transformers)")
        if not isinstance(self.output_scores, bool):
            raise ValueError(f"output_scores: expected true or false, got {self.output_scores!r}")
        if self.output_scores and (speculative or self.num_beams > 1):
            raise ValueError("output_scores: per-token log-probabilities come from greedy search and sampling (beam "
                             "search leaves its hypotheses' scores in beam_scores; speculative decoding has none)")
        if speculative and (self.num_beams > 1 or p != 1.0 or self.no_repeat_ngram_size):
            raise ValueError("assistant_model / prompt_lookup_num_tokens: speculative decoding does not combine with "
                             "num_beams > 1, repetition_penalty or no_repeat_ngram_size")

    def prepare(self, sampling: Sampling, max_new_tokens: int, min_new_tokens: int, speculative: bool, streamer,
                input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """generate's arguments checked (a ValueError naming the bad one); the prompts as ``samples`` gives them."""
        check_sampling(max_new_tokens, sampling, min_new_tokens)
        self.check(sampling.temperature, speculative, streamer)
        return self.samples(input_ids, attention_mask)

    def decode(self, model: nn.Module, logits: Tensor, out: Tensor, start: int, max_new_tokens: int,
               sampling: Sampling, eos_token_id, generator, streamer, min_new_tokens: int,
               forced_first: Optional[int] = None, forced_last: Optional[Tuple[int, int]] = None,
               ignore: Optional[Tensor] = None, cuda_graph: bool = False) -> Tensor:
        """generate after the prefill's ``logits`` (B, V), out (B, start + max_new_tokens) holding the tokens so far:
        beam search when num_beams > 1, else greedy / sampling (``generation_loop``; ``model.token_logprobs`` when
        output_scores; ``cuda_graph``: its decode step replayed from a CUDA graph, models/graphs.py). The
        processors' arguments as ``processors`` takes them."""
        eos = eos_ids(eos_token_id, out.device, logits.shape[-1])
        process = self.processors(eos, min_new_tokens, forced_first, forced_last, ignore)
        if self.num_beams > 1:
            return self.run(model, logits, out[:, :start], max_new_tokens, eos, process)
        scores = [] if self.output_scores else None
        step = model.bound_decode_one()
        out = generation_loop(logits, GraphedStep(step) if cuda_graph else step, out, start, max_new_tokens, sampling,
                              eos_token_id, generator, streamer, process, scores)
        if scores is not None:
            model.token_logprobs = torch.stack(scores, 1)
        return out

    def samples(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """The prompts (and mask) each repeated num_return_sequences times in a row when sampling several per prompt
        (as transformers' generate expands them), else as given."""
        R = self.num_return_sequences
        if self.num_beams > 1 or R == 1 or not isinstance(input_ids, Tensor):
            return input_ids, attention_mask
        return input_ids.repeat_interleave(R, 0), \
            attention_mask.repeat_interleave(R, 0) if isinstance(attention_mask, Tensor) else attention_mask

    def no_new_tokens(self, model: nn.Module, seqs: Tensor) -> Tensor:
        """generate's result for max_new_tokens 0: the sequences so far (B, T), each num_return_sequences times in a
        row under beam search (scores 0), as its results are shaped."""
        if self.num_beams == 1:
            return seqs
        seqs = seqs.repeat_interleave(self.num_return_sequences, 0)
        model.beam_scores = torch.zeros(seqs.shape[0], device=seqs.device)
        return seqs

    def processors(self, eos: Optional[Tensor], min_new_tokens: int, forced_first: Optional[int] = None,
                   forced_last: Optional[Tuple[int, int]] = None,
                   ignore: Optional[Tensor] = None) -> "LogitsProcessors":
        if ignore is not None and self.num_beams > 1:
            ignore = _beams(ignore, self.num_beams)
        return LogitsProcessors(eos, min_new_tokens, self.repetition_penalty, self.no_repeat_ngram_size,
                                forced_first, forced_last, ignore)

    def run(self, model: nn.Module, logits: Tensor, prompt: Tensor, max_new_tokens: int, eos: Optional[Tensor],
            process: "LogitsProcessors") -> Tensor:
        """Beam search from the prefill's ``logits`` (B, V) on ``model``'s caches (B sequences, expanded here);
        the sequences, their scores left in ``model.beam_scores``."""
        expand_caches(model, self.num_beams)
        out, model.beam_scores = beam_search(_beams(logits, self.num_beams), model.bound_decode_one(), model, prompt,
                                             max_new_tokens, self.num_beams, eos, process, self.length_penalty,
                                             self.early_stopping, self.num_return_sequences)
        return out


class LogitsProcessors:
    """The score processing of one generate call, in transformers' order: repetition penalty, no-repeat n-grams,
    no eos before ``min_new_tokens``, then the forced tokens: ``forced_first`` (a Seq2Seq's forced_bos_token_id) as
    the first new token, ``forced_last`` = (i, token) (its forced_eos_token_id) as new token i, the last.
    ``ignore`` (N, T0): the prompt positions the penalty skips (left padding) or None."""

    def __init__(self, eos: Optional[Tensor], min_new_tokens: int, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, forced_first: Optional[int] = None,
                 forced_last: Optional[Tuple[int, int]] = None, ignore: Optional[Tensor] = None):
        self.eos, self.min_new, self.penalty, self.ngram = eos, min_new_tokens, float(repetition_penalty), \
            no_repeat_ngram_size
        self.forced = {} if forced_first is None else {0: forced_first}
        if forced_last is not None:  # (in a one-token generation it wins, as transformers' ForcedEOS comes last)
            self.forced[forced_last[0]] = forced_last[1]
        self.ignore = ignore

    def __call__(self, scores: Tensor, ids: Tensor, i: int) -> Tensor:
        """scores (N, V) for new token ``i`` (0-based) after the tokens ``ids`` (N, T)."""
        V = scores.shape[-1]
        if self.penalty != 1.0:
            idx = ids
            if self.ignore is not None:  # skipped positions point at a spare column, dropped after
                idx = ids.clone()
                idx[:, :self.ignore.shape[1]].masked_fill_(self.ignore, V)
            padded = F.pad(scores, (0, 1))
            idx = idx.clamp(max=V)
            s = padded.gather(1, idx)
            s = torch.where(s < 0, s * self.penalty, s / self.penalty)
            scores = padded.scatter(1, idx, s)[:, :V]
        n, T = self.ngram, ids.shape[1]
        if n and T >= n:  # a window whose first n - 1 tokens equal the last n - 1 bans its last token
            windows = ids.unfold(1, n, 1)
            hit = (windows[..., :-1] == ids[:, T - n + 1:].unsqueeze(1)).all(-1)
            banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
            banned.scatter_(1, torch.where(hit, windows[..., -1].clamp(max=V), V), True)
            scores = scores.masked_fill(banned[:, :V], float("-inf"))
        if self.eos is not None and i < self.min_new:  # transformers' MinNewTokensLengthLogitsProcessor
            scores = scores.index_fill(-1, self.eos, float("-inf"))
        if i in self.forced:
            scores = torch.full_like(scores, float("-inf")).index_fill_(
                -1, torch.tensor([self.forced[i]], device=scores.device), 0.0)
        return scores


def _beams(t: Tensor, k: int) -> Tensor:
    """t (B, ...) with each row repeated k times in a row: (B * k, ...); a stride-0 view when B == 1."""
    return t.unsqueeze(1).expand(t.shape[0], k, *t.shape[1:]).reshape(t.shape[0] * k, *t.shape[1:])


def expand_caches(model: nn.Module, k: int) -> None:
    """Repeat each sequence's KV cache (its written slots and bookkeeping) for k beams; a Seq2Seq's cross-attention
    memory too (read-only: a view for one sequence)."""
    for block in model.cached_blocks():
        c = block.attn.cache
        for name in ("k", "v"):
            t = getattr(c, name)
            new = hugepages.zeros((t.shape[0] * k, *t.shape[1:]), t.dtype, t.device)
            new.view(t.shape[0], k, *t.shape[1:]).copy_(t.unsqueeze(1))
            setattr(c, name, new)
    model.cache_padding = model.cache_padding.repeat_interleave(k, 0)
    model.next_pos = model.next_pos.repeat_interleave(k, 0)
    if getattr(model, "memory_kv", None) is not None:
        model.memory_kv = [(_beams(mk, k), _beams(mv, k)) for mk, mv in model.memory_kv]
        if model.memory_pad is not None:
            model.memory_pad = _beams(model.memory_pad, k)


def reorder_caches(model: nn.Module, parent: Tensor, end: int) -> None:
    """Beam j takes beam parent[j]'s cache over the first ``end`` slots (only the beams whose parent is another)."""
    moved = (parent != torch.arange(parent.shape[0], device=parent.device)).nonzero().squeeze(1)
    if moved.numel() == 0:
        return
    src = parent[moved]
    for block in model.cached_blocks():
        c = block.attn.cache
        e = end - model.window_offset if c.bounded else end  # (a bounded window cache: from its first slot)
        c.k[moved, :, :e] = c.k[src, :, :e]
        c.v[moved, :, :e] = c.v[src, :, :e]
    model.cache_padding[moved] = model.cache_padding[src]
    model.next_pos[moved] = model.next_pos[src]


def beam_search(logits: Tensor, decode_one: Callable[[Tensor, Tensor], Tensor], model: nn.Module, prompt: Tensor,
                max_new_tokens: int, num_beams: int, eos: Optional[Tensor], process: LogitsProcessors,
                length_penalty: float, early_stopping: EarlyStopping,
                num_return_sequences: int) -> Tuple[Tensor, Tensor]:
    """Beam search after the prefill: ``logits`` (B * K, V) of the last prompt token, the caches already expanded
    (``expand_caches``), ``decode_one(tokens (B * K, 1), input_pos (1,))`` the next logits. ``prompt`` (B, T0): the
    tokens so far (a GPT's prompt, a Seq2Seq's start token), written at cache slots 0..T0-1. Returns (sequences
    (B * R, T0 + n), scores (B * R,)): the best R = num_return_sequences finished hypotheses per sequence, best
    first, padded after their eos with eos[0] (n: the longest), and their length-penalised scores."""
    B, T0 = prompt.shape
    K, dev = num_beams, prompt.device
    keep = max(2, 1 + (0 if eos is None else eos.numel())) * K  # enough candidates that K never end at once
    if keep > K * logits.shape[-1]:
        raise ValueError(f"num_beams: {K} beams with {keep // K - 1} eos ids take {keep} candidates a step, more than "
                         f"the {K} x {logits.shape[-1]} continuations of a vocabulary this small")
    first_k = torch.arange(keep, device=dev) < K
    max_len = T0 + max_new_tokens
    fill = int(eos[0]) if eos is not None else -1
    running = prompt.new_full((B, K, max_len), fill)
    running[:, :, :T0] = prompt.unsqueeze(1)
    finished = running.clone()
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9  # at first every beam is the prompt: take the first's continuations only
    fin_scores = torch.full((B, K), -1e9, device=dev)
    fin_flag = torch.zeros(B, K, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    offsets = torch.arange(B, device=dev).unsqueeze(1) * K
    for i in range(max_new_tokens):
        cur = T0 + i
        logp = F.log_softmax(logits.float(), -1)
        logp = process(logp, running[:, :, :cur].reshape(B * K, cur), i)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + run_scores.unsqueeze(-1)).view(B, K * V)
        top_scores, top_idx = torch.topk(acc, keep)
        parent = top_idx // V
        cand = running.gather(1, parent.unsqueeze(-1).expand(B, keep, max_len)).clone()
        cand[:, :, cur] = top_idx % V
        ended = (cand[:, :, cur].unsqueeze(-1) == eos).any(-1) if eos is not None else \
            torch.zeros_like(first_k).expand(B, keep)
        if cur + 1 >= max_len:
            ended = torch.ones_like(ended)
        # the K best that go on
        alive = top_scores + ended.float() * -1e9
        nxt = torch.topk(alive, K).indices
        running, run_scores, run_parent = cand.gather(1, nxt.unsqueeze(-1).expand(B, K, max_len)), \
            alive.gather(1, nxt), parent.gather(1, nxt)
        # the K best finished so far: those kept, and the candidates among the first K that ended now
        just = ended & first_k
        scored = top_scores / ((cur + 1 - T0) ** length_penalty)
        scored += (fin_flag.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        scored += (~improvable).float() * -1e9
        scored += (~just) * -1e9
        best = torch.topk(torch.cat((fin_scores, scored), 1), K).indices
        finished = torch.cat((finished, cand), 1).gather(1, best.unsqueeze(-1).expand(B, K, max_len))
        fin_scores = torch.cat((fin_scores, scored), 1).gather(1, best)
        fin_flag = torch.cat((fin_flag, just), 1).gather(1, best)
        fin_len = torch.cat((fin_len, torch.full_like(scored, i + 1, dtype=torch.long)), 1).gather(1, best)
        # can a running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_len - T0
        else:
            best_len = cur + 1 - T0
        worst = torch.where(fin_flag, fin_scores.min(1, keepdim=True).values, -1.0e9)
        improvable = improvable & (run_scores[:, :1] / (best_len ** length_penalty) > worst).any(-1, keepdim=True)
        if not bool(improvable.any() & ~(fin_flag.all() & (early_stopping is True)) & ~ended.all()):
            break
        reorder_caches(model, (run_parent + offsets).flatten(), cur)
        logits = decode_one(running[:, :, cur].reshape(B * K, 1), model.cache_index[cur:cur + 1])
    R = num_return_sequences
    n = int(fin_len[:, :R].max())
    return finished[:, :R, :T0 + n].reshape(B * R, T0 + n), fin_scores[:, :R].reshape(B * R)
