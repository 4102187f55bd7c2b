"""Bounded sliding-window caches (CacheMixin.setup_caches' bound_windows, which generate sets): a windowed layer keeps
bounded_slots(W) slots, shifted along as the generation passes them, whatever max_new_tokens. Generating far past
the window gives the tokens of the whole-cache path (forced here by bounded_slots covering everything) and of a
greedy loop over full forwards: Mistral-style (every layer windowed) and Gemma-2-style (alternating) tiny models,
left-padded prompts of different lengths (one longer than the bounded cache), greedy, sampling, beams, speculative
decoding (prompt lookup, an assistant), streaming, the modules' decode_one and the bound step."""
import copy

import pytest
import torch

from fastattn.models import GPT, GPTConfig, generation
from fastattn.models.decode_step import DecodeStep
from fastattn.models.generation import CacheMixin, bounded_slots
from conftest import HAS_GPU

VOCAB, W = 53, 5
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=256, pos="rotary",
             norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, sliding_window=W)
VARIANTS = {
    "mistral": dict(),
    "gemma2-alternating": dict(mlp="geglu", activation="gelu_tanh", layer_types=["sliding_attention", "full_attention"],
                               attn_softcap=20.0, final_softcap=15.0, sandwich_norm=True, embed_scale=32 ** 0.5),
}


def _model(variant, seed=0, noise=0.0, **kw):
    """A float64 model with peaked outputs (weights scaled up: greedy choices far from ties); ``noise``: a near copy
    (an assistant that agrees on most tokens, not all)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**SMALL, **VARIANTS[variant], **kw})).eval().double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(6)
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _prompts(L=14, pad=(0, 3, 9)):
    """Left-padded prompts (rows of 14, 11 and 5 tokens; 14 > bounded_slots(5)) with repeats, and their mask."""
    ids = torch.randint(0, VOCAB, (len(pad), L), generator=torch.Generator().manual_seed(3))
    ids[:, L // 2:] = ids[:, :L - L // 2]
    mask = torch.ones_like(ids)
    for b, n in enumerate(pad):
        mask[b, :n] = 0
    return ids, mask


def _whole(monkeypatch, m, *args, **kw):
    """m.generate on today's whole caches: a bounded cache's slots cover every generation."""
    with monkeypatch.context() as mp:
        mp.setattr(generation, "bounded_slots", lambda window, headroom=0: 10 ** 9)
        out = m.generate(*args, **kw)
        assert m.window_slots == 0
    return out


def _check_bounded(m, headroom=0):
    """Every windowed layer's cache holds bounded_slots(W) slots, every other one the whole generation."""
    S = bounded_slots(W, headroom)
    assert m.window_slots == S
    for i, b in enumerate(m.blocks):
        slots = b.attn.cache.k.shape[2]
        assert (slots == S) == bool(m.config.layer_window(i)) and slots <= m.cache_padding.shape[1]


def _greedy_reference(m, ids, mask, n):
    """n greedy tokens from full forwards over the whole sequence (no cache)."""
    out, mask = ids, mask.bool()
    with torch.no_grad():
        for _ in range(n):
            tok = m(out, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            out, mask = torch.cat([out, tok], 1), torch.cat([mask, torch.ones_like(tok, dtype=torch.bool)], 1)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_far_past_the_window(variant, monkeypatch):
    """60 new tokens (12 windows; the caches shift many times), streamed: the full forwards' tokens and the whole
    cache's; the windowed layers' caches keep their size for a longer generation."""
    m = _model(variant)
    ids, mask = _prompts()
    streamed = []
    out = m.generate(ids, 60, temperature=0, attention_mask=mask, eos_token_id=None, streamer=streamed.append)
    _check_bounded(m)
    assert m.window_offset > 40  # (shifted all along)
    assert torch.equal(out, _greedy_reference(m, ids, mask, 60))
    assert torch.equal(torch.stack(streamed, 1), out[:, 14:])
    assert torch.equal(out, _whole(monkeypatch, m, ids, 60, temperature=0, attention_mask=mask, eos_token_id=None))
    m.generate(ids, 150, temperature=0, attention_mask=mask, eos_token_id=None)
    _check_bounded(m)


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "modules"])
def test_decode_steps_equal_the_whole_cache(bound):
    """The bound step (and the modules' decode_one) on bounded caches, fed the same tokens as on whole caches:
    the same logits at every step (to float64 rounding: fewer masked keys)."""
    m, ref = _model("gemma2-alternating"), _model("gemma2-alternating")
    ids, mask = _prompts()
    seq = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    got = []
    with torch.no_grad():
        for model, bounded in ((m, True), (ref, False)):
            model.setup_caches(3, 63, bound_windows=bounded)
            logits = [model.prefill(ids, mask.bool())]
            step = model.bound_decode_one() if bound else model.decode_one
            assert isinstance(step, DecodeStep) == bound
            for t in range(49):
                logits.append(step(seq[:, t:t + 1], model.cache_index[14 + t:15 + t]))
            got.append(torch.stack(logits))
    _check_bounded(m)
    assert ref.window_slots == 0 and m.window_offset > 40
    torch.testing.assert_close(got[0], got[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_with_a_seed(variant, monkeypatch):
    """Sampling (top_k) from a seeded generator, with output_scores: the whole cache's draws."""
    m = _model(variant)
    ids, mask = _prompts()
    kw = dict(temperature=1.0, top_k=20, attention_mask=mask, eos_token_id=None, output_scores=True)
    out = m.generate(ids, 50, generator=torch.Generator().manual_seed(7), **kw)
    _check_bounded(m)
    scores = m.token_logprobs
    assert torch.equal(out, _whole(monkeypatch, m, ids, 50, generator=torch.Generator().manual_seed(7), **kw))
    torch.testing.assert_close(scores, m.token_logprobs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beams(variant, monkeypatch):
    """Beam search (the beams' caches reordered in the bounded caches): the whole cache's hypotheses and scores."""
    m = _model(variant)
    ids, mask = _prompts()
    kw = dict(temperature=0, attention_mask=mask, eos_token_id=None, num_beams=3, num_return_sequences=2)
    out = m.generate(ids, 40, **kw)
    _check_bounded(m)
    scores = m.beam_scores
    assert torch.equal(out, _whole(monkeypatch, m, ids, 40, **kw))
    torch.testing.assert_close(scores, m.beam_scores, rtol=1e-9, atol=1e-9)


DRAFTS = {
    "lookup": lambda variant: dict(prompt_lookup_num_tokens=3),
    "assistant": lambda variant: dict(assistant_model=_model(variant, seed=1, noise=0.03), num_assistant_tokens=3),
}


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_speculative_greedy(variant, draft):
    """Speculative decoding (rejected drafts taken back, holes closed in the bounded caches): plain greedy's tokens;
    the model's (and the assistant's) windowed caches bounded."""
    m = _model(variant)
    ids, mask = _prompts()
    kw = DRAFTS[draft](variant)
    plain = m.generate(ids, 100, temperature=0, attention_mask=mask, eos_token_id=None)
    out = m.generate(ids, 100, temperature=0, attention_mask=mask, eos_token_id=None, **kw)
    assert torch.equal(out, plain)
    st = m.speculation_stats
    assert 0 < st.accepted < st.drafted, st  # some drafts rejected
    headroom = 2 * (3 + 2)
    _check_bounded(m, headroom)
    assert m.window_offset > 40
    if draft == "assistant":
        _check_bounded(kw["assistant_model"], headroom)


def test_speculative_through_the_modules():
    """The "torch" backend (no bound step: the modules' decode_one and decode_many on the bounded caches): plain
    greedy's tokens with prompt lookup."""
    m = _model("gemma2-alternating", backend="torch")
    assert m.bound_decode_one() == m.decode_one
    ids, mask = _prompts()
    plain = _greedy_reference(m, ids, mask, 60)
    out = m.generate(ids, 60, temperature=0, attention_mask=mask, eos_token_id=None, prompt_lookup_num_tokens=3)
    _check_bounded(m, 2 * (3 + 2))
    assert torch.equal(out, plain) and 0 < m.speculation_stats.accepted < m.speculation_stats.drafted


@pytest.mark.parametrize("draft", list(DRAFTS))
def test_speculative_sampling_with_a_seed(draft, monkeypatch):
    """Sampled speculative decoding from a seeded generator: the whole caches' draws."""
    m = _model("mistral")
    ids, mask = _prompts()
    kw = dict(temperature=1.0, top_k=10, attention_mask=mask, eos_token_id=None, **DRAFTS[draft]("mistral"))
    out = m.generate(ids, 60, generator=torch.Generator().manual_seed(5), **kw)
    _check_bounded(m, 2 * (3 + 2))
    assert torch.equal(out, _whole(monkeypatch, m, ids, 60, generator=torch.Generator().manual_seed(5), **kw))


def test_cache_size_does_not_grow_with_max_new_tokens():
    """The bytes held by the windowed layers' caches: the same for 20 and 200 new tokens; the full layers' grow."""
    m = _model("gemma2-alternating")
    ids, mask = _prompts()
    sizes = []
    for n in (20, 200):
        m.generate(ids, n, temperature=0, attention_mask=mask, eos_token_id=None)
        sizes.append([b.attn.cache.k.numel() for b in m.blocks])
    assert sizes[0][0] == sizes[1][0] == 3 * 2 * bounded_slots(W) * 8
    assert sizes[1][1] > sizes[0][1]


def test_shift_keeps_the_window_and_refuses_a_lost_one():
    """make_room: the window behind the written slot stays, and the headroom's slots before it (drafts written and
    taken back: the next write goes back by up to that many); a write whose window has been dropped is refused."""
    m = _model("mistral")
    ids, mask = _prompts(L=40)
    m.setup_caches(3, 120, headroom=10, bound_windows=True)
    m.prefill(ids, mask.bool())
    S = m.window_slots
    assert m.window_offset == 40 - S  # a prompt longer than the cache: its last S slots
    m.make_room(S + 20, S + 22)
    assert 40 - S < m.window_offset <= S + 20 - W + 1 - 10
    m.make_room(S + 11, S + 11)  # back by 9 slots
    with pytest.raises(RuntimeError, match="bounded window cache"):
        m.make_room(m.window_offset, m.window_offset)
    assert CacheMixin.window_slots == 0  # (a class default: the model without bounded caches)


# ---- on the GPU: a float32 copy of the model, its steps on the GPU's kernels (Triton attention with a window) ----
def _greedy_far_from_ties(m, ids, mask, n):
    """The float64 model m's n greedy tokens (the CPU), having checked that float32 cannot change one: along their
    path each chosen logit leads the next by over 20x the largest error of a float32 copy's logits there (so a float32
    run elsewhere, within a few times that error, picks the same tokens)."""
    out = m.generate(ids, n, temperature=0, attention_mask=mask, eos_token_id=None)
    keep = torch.cat([mask.bool(), torch.ones(len(ids), n, dtype=torch.bool)], 1)[:, :-1]
    L = ids.shape[1]
    with torch.no_grad():
        logits = m(out[:, :-1], attention_mask=keep).logits[:, L - 1:]
        err = (copy.deepcopy(m).float()(out[:, :-1], attention_mask=keep).logits[:, L - 1:] - logits).abs().max()
    assert torch.equal(logits.argmax(-1), out[:, L:])
    top2 = logits.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 20 * err
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_greedy_and_speculative(variant, monkeypatch):
    """A float32 copy on the GPU, bounded caches there: greedy far past the window, then speculative (prompt lookup,
    an assistant also on the GPU) greedy: the float64 model's tokens on the CPU (no float32 near-tie on their path)
    and the whole cache's; the windowed caches bounded, on the GPU."""
    m64 = _model(variant)
    ids, mask = _prompts()
    want = _greedy_far_from_ties(m64, ids, mask, 60)
    m = copy.deepcopy(m64).float().cuda()
    kw = dict(temperature=0, attention_mask=mask.cuda(), eos_token_id=None)
    ids = ids.cuda()
    out = m.generate(ids, 60, **kw)
    _check_bounded(m)
    assert m.window_offset > 40 and all(b.attn.cache.k.is_cuda for b in m.blocks)
    assert out.is_cuda and torch.equal(out.cpu(), want)
    assert torch.equal(_whole(monkeypatch, m, ids, 60, **kw).cpu(), want)
    for draft, make in DRAFTS.items():
        spec = make(variant)
        if "assistant_model" in spec:
            spec["assistant_model"] = spec["assistant_model"].float().cuda()
        assert torch.equal(m.generate(ids, 60, **kw, **spec).cpu(), want), draft
        assert 0 < m.speculation_stats.accepted < m.speculation_stats.drafted, (draft, m.speculation_stats)
        _check_bounded(m, 2 * (3 + 2))
        assert m.window_offset > 40


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_beams(monkeypatch):
    """Beam search on the GPU (float32; the beams' caches reordered in bounded caches there): the whole cache's
    hypotheses on the GPU, and the float64 model's on the CPU; the scores to float32 rounding of the float64 ones
    (the hypotheses compared without a check for near-ties: the greedy paths' margins above make them unlikely)."""
    m64 = _model("gemma2-alternating")
    ids, mask = _prompts()
    kw = dict(temperature=0, eos_token_id=None, num_beams=3, num_return_sequences=2)
    want = m64.generate(ids, 40, attention_mask=mask, **kw)
    want_scores = m64.beam_scores
    m = copy.deepcopy(m64).float().cuda()
    ids, kw["attention_mask"] = ids.cuda(), mask.cuda()
    out = m.generate(ids, 40, **kw)
    _check_bounded(m)
    scores = m.beam_scores
    assert torch.equal(out.cpu(), want)
    # (float32 logits off by about 5e-5 here: each log-probability by about twice that, their length-normalized sum too)
    torch.testing.assert_close(scores.cpu(), want_scores, rtol=0, atol=2e-4)
    assert torch.equal(_whole(monkeypatch, m, ids, 40, **kw), out)
    torch.testing.assert_close(m.beam_scores, scores, rtol=1e-5, atol=1e-5)
