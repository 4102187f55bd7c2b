"""Speculative decoding (fastattn/models/speculative.py): decode_many (several tokens per sequence against the
cache) against the full forward, bound and through the modules, for GPT and the Seq2Seq decoder; greedy generation
with an assistant model or prompt lookup equal to plain greedy generation token for token (left-padded batches whose
sequences accept different numbers of drafts, eos and min_new_tokens, sliding windows, ALiBi, int8, cache
compaction, streaming, BART and T5); the lookup rule; sampled tokens following the model's distribution (a
chi-square test over every continuation); and the errors."""
import pytest
import torch

from conftest import assert_bounded
from fastattn.models import GPT, GPTConfig, Seq2Seq, Seq2SeqConfig
from fastattn.models.decode_step import DecodeStep
from fastattn.models.generation import CacheMixin
from fastattn.models.speculative import _LookupDraft

VOCAB = 53
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=160)
VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(pos="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    "mistral-window": dict(pos="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, sliding_window=6),
    "alibi": dict(pos="alibi", n_head=8),
    "gemma2-alternating-softcap": dict(
        pos="rotary", norm="rmsnorm", mlp="geglu", activation="gelu_tanh", bias=False, n_kv_head=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], attn_softcap=20.0, final_softcap=15.0,
        sandwich_norm=True, embed_scale=32 ** 0.5),
}


def _model(variant, seed=0, dtype=torch.float64, **kw):
    """A model with peaked outputs (weights scaled up: greedy choices far from ties)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**SMALL, **VARIANTS[variant], **kw})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(6)
    return m.to(dtype)


def _near_copy(m, noise, seed=1):
    """A draft that agrees with m on most tokens but not all: m's weights plus noise."""
    d = type(m)(m.config).eval().to(m.tok_emb.weight.dtype)
    d.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return d


def _prompts(B, L, seed=3, pad=(0, 4, 9)):
    """Left-padded prompts with repeats in them (prompt lookup finds n-grams), and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    ids[:, L // 2:] = ids[:, :L - L // 2]
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        mask[b, :pad[b % len(pad)]] = 0
    return ids, mask


# ---- decode_many ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bound", [True, False], ids=["bound", "modules"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_many_equals_full_forward(variant, bound):
    """Prefill, then W tokens a step (some of them fillers, valid=False, and some taken back as rejected drafts),
    against the full forward over the kept tokens: fp32 error bounded by the full forward's own against float64.
    The kept slots are compacted at the end (and after every step on a windowed model)."""
    m = _model(variant, dtype=torch.float32)
    m64 = _model(variant)
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, VOCAB, (2, 40), generator=g)
    P, W = 12, 4
    m.setup_caches(2, 40, headroom=12)
    m.prefill(seq[:, :P], torch.ones(2, P, dtype=torch.bool))
    step = m.bound_decode_many(W) if bound else m.decode_many
    assert isinstance(step, DecodeStep) == bound
    done = torch.tensor([P, P])  # tokens of seq in each sequence's cache
    slot = P
    rounds = [(torch.tensor([4, 2]), None), (torch.tensor([1, 4]), torch.tensor([[False, True, True, True],
                                                                                [True, True, True, True]])),
              (torch.tensor([3, 3]), None)]
    with torch.no_grad():
        for kept, valid in rounds:
            if m.config.sliding_window or m.config.pos == "alibi":  # a filler's slot would count (generate has none)
                valid = None
            fill = torch.zeros(2, dtype=torch.long) if valid is None else (~valid).sum(1)
            idx = (done[:, None] + torch.arange(W) - fill[:, None]).clamp_min(0)
            tokens = seq.gather(1, idx)
            logits = step(tokens, m.cache_index[slot:slot + W], valid)
            for b in range(2):
                for i in range(int(fill[b]), W):
                    n = int(idx[b, i]) + 1
                    assert_bounded(f"row {b} token {n}", logits[b, i], m64(seq[b:b + 1, :n]).logits[0, -1],
                                   m(seq[b:b + 1, :n]).logits[0, -1], torch.float32)
            reject = torch.arange(W)[None] >= (fill + kept)[:, None]
            m.reject_slots(slot, reject)
            done += kept
            slot += W
            if m.config.sliding_window or m.config.pos == "alibi":  # they count slots: no holes (as generate does)
                slot = m.compact_caches(slot)
        slot = m.compact_caches(slot)
        assert slot == int(done.max()) and m.next_pos.flatten().tolist() == done.tolist()
        logits = m.decode_one(seq.gather(1, done[:, None]), m.cache_index[slot:slot + 1])
        for b in range(2):
            n = int(done[b]) + 1
            assert_bounded(f"after compaction, row {b}", logits[b], m64(seq[b:b + 1, :n]).logits[0, -1],
                           m(seq[b:b + 1, :n]).logits[0, -1], torch.float32)


# ---- greedy: the same tokens ------------------------------------------------------------------------------------
DRAFTS = {
    "near-copy": lambda m: dict(assistant_model=_near_copy(m, 0.02), num_assistant_tokens=3),
    "stranger": lambda m: dict(assistant_model=_model("gpt2", seed=7, d_model=16, n_layer=1, n_head=2),
                               num_assistant_tokens=2),
    "lookup": lambda m: dict(prompt_lookup_num_tokens=4),
}


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_plain_greedy(variant, draft):
    m = _model(variant)
    ids, mask = _prompts(3, 14)
    plain = m.generate(ids, 30, temperature=0, attention_mask=mask)
    kw = DRAFTS[draft](m)
    out = m.generate(ids, 30, temperature=0, attention_mask=mask, **kw)
    assert torch.equal(out, plain)
    st = m.speculation_stats
    assert st.tokens == 90 and st.steps < 90 and 0 <= st.accepted <= st.drafted
    if draft == "near-copy":  # the test must see sequences accept different numbers of drafts
        assert 0.3 < st.acceptance < 1.0, st


@pytest.mark.parametrize("draft", ["near-copy", "lookup"])
def test_greedy_with_eos_and_min_new_tokens(draft):
    m = _model("gpt2")
    ids, mask = _prompts(3, 14)
    plain = m.generate(ids, 30, temperature=0, attention_mask=mask)
    eos = [int(plain[0, 20]), int(plain[2, 25])]  # tokens the plain run produces: sequences end early
    kw = dict(temperature=0, attention_mask=mask, eos_token_id=eos, min_new_tokens=4)
    ref = m.generate(ids, 30, **kw)
    assert ref.shape[1] < 44
    assert torch.equal(m.generate(ids, 30, **kw, **DRAFTS[draft](m)), ref)


def test_cache_compaction_keeps_the_output(monkeypatch):
    """A headroom-filling run (a long generation whose sequences accept different numbers of drafts) compacts the
    cache on the way, and still gives plain greedy's tokens."""
    calls = []
    compact = CacheMixin.compact_caches
    monkeypatch.setattr(CacheMixin, "compact_caches", lambda self, end: calls.append(end) or compact(self, end))
    m = _model("llama-gqa")
    ids, mask = _prompts(3, 10)
    plain = m.generate(ids, 120, temperature=0, attention_mask=mask)
    out = m.generate(ids, 120, temperature=0, attention_mask=mask, assistant_model=_near_copy(m, 0.03),
                     num_assistant_tokens=4)
    assert calls and torch.equal(out, plain)


def test_fp32_bound_path_and_torch_backend():
    """fp32 models on the kernels' bound steps and on the "torch" backend: plain greedy's tokens."""
    for backend in ("fastattn", "torch"):
        m = _model("llama-gqa", dtype=torch.float32, backend=backend)
        ids, mask = _prompts(2, 12)
        plain = m.generate(ids, 24, temperature=0, attention_mask=mask)
        out = m.generate(ids, 24, temperature=0, attention_mask=mask, assistant_model=_near_copy(m, 0.02))
        assert torch.equal(out, plain), backend


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_int8_models(mode):
    """Quantized model and draft (Int8Linear's bound rows, W per sequence): plain greedy's tokens."""
    import fastattn
    m = fastattn.quantize(_model("llama-gqa", dtype=torch.float32), mode=mode)
    d = fastattn.quantize(_near_copy(_model("llama-gqa", dtype=torch.float32), 0.02), mode=mode)
    ids, mask = _prompts(3, 14)
    plain = m.generate(ids, 24, temperature=0, attention_mask=mask)
    for kw in (dict(assistant_model=d), dict(prompt_lookup_num_tokens=3)):
        assert torch.equal(m.generate(ids, 24, temperature=0, attention_mask=mask, **kw), plain)


def test_streamer_sees_the_plain_columns():
    """Sequences several tokens apart (each accepts its own number of drafts) still stream one whole column a
    call, as plain generation does."""
    m = _model("gpt2")
    ids, mask = _prompts(3, 14)
    got = {"plain": [], "spec": []}
    m.generate(ids, 20, temperature=0, attention_mask=mask, streamer=got["plain"].append)
    m.generate(ids, 20, temperature=0, attention_mask=mask, streamer=got["spec"].append,
               assistant_model=_near_copy(m, 0.02))
    assert m.speculation_stats.accepted > 0
    assert len(got["spec"]) == len(got["plain"]) == 20
    assert all(torch.equal(a, b) for a, b in zip(got["spec"], got["plain"]))


def test_assistant_with_a_padded_vocabulary():
    """An assistant whose vocabulary is padded past the model's (as Qwen's sizes are): its extra ids, which its head
    scores highest here, are never drafted (the model has no embedding for them)."""
    m = _model("gpt2")
    d = _near_copy(m, 0.02)
    big = GPT(GPTConfig.from_dict({**d.config.to_dict(), "vocab_size": VOCAB + 11})).eval().double()
    sd = d.state_dict()
    sd["tok_emb.weight"] = torch.cat([sd["tok_emb.weight"], 10 * sd["tok_emb.weight"][:11]])
    sd["lm_head.weight"] = sd["tok_emb.weight"]
    big.load_state_dict(sd)
    ids, mask = _prompts(2, 12)
    for kw in (dict(temperature=0), dict(temperature=1.0, generator=torch.Generator().manual_seed(0))):
        out = m.generate(ids, 20, attention_mask=mask, assistant_model=big, **kw)
        if kw["temperature"] == 0:
            assert torch.equal(out, m.generate(ids, 20, temperature=0, attention_mask=mask))
        assert int(out.max()) < VOCAB


def test_prompt_lookup_proposals():
    """After the latest earlier occurrence of the longest matching n-gram (up to max_matching_ngram_size) with k
    tokens after it, searched in the prefix (an encoder-decoder's source) and the row from its first real column;
    in a loop, the earliest (the most tokens after it); nothing when no 1-gram matches."""
    out = torch.tensor([[0, 0, 5, 6, 9, 5, 6, 7, 1, 2, 5, 6],
                        [3, 4, 8, 2, 2, 2, 2, 2, 2, 2, 2, 9]])
    d = _LookupDraft(out, torch.tensor([2, 0]), 2, prefix=None)
    drafts, n, _ = d.propose(3, torch.tensor([12, 12]), torch.tensor([True, True]))
    assert n.tolist() == [3, 0] and drafts[0].tolist() == [7, 1, 2]  # "5 6" last seen before "7 1 2", not "9"
    d = _LookupDraft(out, torch.tensor([2, 0]), 2, prefix=[torch.tensor([1]), torch.tensor([9, 4, 1, 1])])
    drafts, n, _ = d.propose(3, torch.tensor([5, 12]), torch.tensor([True, True]))
    assert n.tolist() == [0, 3] and drafts[1].tolist() == [4, 1, 1]  # row 1: "9" found in its source only
    loop = _LookupDraft(torch.tensor([[7, 4, 4, 4, 4, 4]]), torch.tensor([0]), 2)
    drafts, n, _ = loop.propose(3, torch.tensor([6]), torch.tensor([True]))
    assert n.tolist() == [3] and drafts[0].tolist() == [4, 4, 4]  # the latest "4 4" with 3 tokens after it
    drafts, n, _ = loop.propose(4, torch.tensor([6]), torch.tensor([True]))
    assert n.tolist() == [3]  # none has 4 after it: the earliest, with the most


# ---- encoder-decoder ------------------------------------------------------------------------------------------
S2S = {
    "bart": dict(),
    "t5": dict(norm_first=True, pos="none", norm="rmsnorm", mlp="geglu", activation="gelu_tanh", embed_norm=False,
               bias=False, attn_scale=1.0, relative_buckets=8, relative_max_distance=12),
}


def _s2s(variant, dtype=torch.float64):
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(**{**SMALL, "max_seq_len": 64}, **S2S[variant])).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(6)
    return m.to(dtype)


def _sources(B):
    ids, mask = _prompts(B, 16, pad=(0, 4, 6))
    return ids.flip(1), mask.flip(1)  # padded on the right, as tokenizers pad an encoder's input


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "modules"])
@pytest.mark.parametrize("variant", list(S2S))
def test_seq2seq_decode_many_equals_full_forward(variant, bound):
    """The decoder's decode_many (cross-attention on W rows; T5's relative bias on them) against the full forward:
    fp32 error bounded by the full forward's own against float64. T5 in batches of one (no holes: slot = position)."""
    m, m64 = _s2s(variant, torch.float32), _s2s(variant)
    B = 1 if variant == "t5" else 2
    src, mask = _sources(B)
    g = torch.Generator().manual_seed(6)
    dec = torch.randint(0, VOCAB, (B, 20), generator=g)
    W = 4
    with torch.no_grad():
        m.setup_caches(B, 20)
        m.prefill(src, mask, dec[:, :4])
        step = m.bound_decode_many(W) if bound else m.decode_many
        assert isinstance(step, DecodeStep) == bound
        for start in (4, 8):
            logits = step(dec[:, start:start + W], m.cache_index[start:start + W])
            for i in range(W):
                n = start + i + 1
                assert_bounded(f"token {n}", logits[:, i], m64(src, mask, dec[:, :n]).logits[:, -1],
                               m(src, mask, dec[:, :n]).logits[:, -1], torch.float32)


@pytest.mark.parametrize("draft", ["lookup", "near-copy", "copy"])
@pytest.mark.parametrize("variant", list(S2S))
def test_seq2seq_greedy_equals_plain_greedy(variant, draft):
    m = _s2s(variant)
    src, mask = _sources(1 if variant == "t5" else 3)
    plain = m.generate(src, 24, temperature=0, attention_mask=mask, eos_token_id=None)  # (all 24: drafts to check)
    kw = {"lookup": dict(prompt_lookup_num_tokens=3), "near-copy": dict(assistant_model=_near_copy(m, 0.01)),
          "copy": dict(assistant_model=_near_copy(m, 0.0))}[draft]
    assert torch.equal(m.generate(src, 24, temperature=0, attention_mask=mask, eos_token_id=None, **kw), plain)
    if draft == "copy":  # a draft that is the model proposes what it generates
        assert m.speculation_stats.acceptance == 1.0
    assert m.memory_kv is None and all(getattr(v, "memory_kv", None) is None for v in kw.values())


def test_int32_prompts():
    """int32 input_ids (greedy, sampling and beams take them; out keeps their dtype): drafting wrote int64 tokens
    into the int32 output and raised."""
    m, s = _model("gpt2"), _s2s(list(S2S)[0])
    ids, mask = _prompts(3, 14)
    src, smask = _sources(3)
    for model, x, am in ((m, ids, mask), (s, src, smask)):
        plain = model.generate(x.int(), 12, temperature=0, attention_mask=am)
        assert plain.dtype == torch.int32
        for kw in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=_near_copy(model, 0.01))):
            assert torch.equal(model.generate(x.int(), 12, temperature=0, attention_mask=am, **kw), plain)


def test_seq2seq_t5_batches_are_refused():
    m = _s2s("t5")
    src, mask = _sources(2)
    with pytest.raises(ValueError, match="input_ids: speculative decoding of a model with relative positions"):
        m.generate(src, 4, attention_mask=mask, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="assistant_model: a model with relative positions"):
        _s2s("bart").generate(src, 4, attention_mask=mask, assistant_model=_near_copy(m, 0.0))


# ---- sampling: the model's distribution -------------------------------------------------------------------------
def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probs (cells expected < 5 merged into one)."""
    N = counts.sum()
    exp = probs * N
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    x2 = ((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), x2.double() / 2))


@pytest.mark.parametrize("draft,warp", [("near-copy", {}), ("near-copy", dict(top_k=3)),
                                        ("lookup", dict(top_p=0.9)), ("near-copy", dict(min_p=0.1)),
                                        ("lookup", dict(typical_p=0.8))])
def test_sampling_follows_the_model_distribution(draft, warp):
    """4 new tokens of a 5-token vocabulary, sampled for 20000 copies of one prompt in one batch: the counts of the
    625 continuations against their exact probabilities under the model (temperature 1.5, after each warper)."""
    V, T, new = 5, 1.5, 4
    torch.manual_seed(11)
    m = GPT(GPTConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2, max_seq_len=16)).eval().double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    kw = dict(assistant_model=_near_copy(m, 1.0), num_assistant_tokens=3) if draft == "near-copy" else \
        dict(prompt_lookup_num_tokens=3)
    N = 20000
    out = m.generate(prompt.expand(N, -1), new, temperature=T, generator=torch.Generator().manual_seed(0), **warp,
                     **kw)
    st = m.speculation_stats
    assert 0.05 < st.acceptance < 0.95, st  # drafts kept and drafts rejected: both rules at work
    codes = (out[:, -new:] * V ** torch.arange(new - 1, -1, -1)).sum(1)
    counts = torch.bincount(codes, minlength=V ** new).double()
    # exact probabilities: the product of each step's warped distribution, every continuation at once
    from fastattn.models.generation import Sampling, warped_probs
    seqs = torch.cartesian_prod(*[torch.arange(V)] * new)  # (V^new, new), in the codes' order
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        probs = warped_probs(m(full).logits[:, prompt.shape[1] - 1:-1], Sampling(T, **warp))
    exact = probs.gather(-1, seqs[..., None]).squeeze(-1).prod(1)
    assert _chi2_pvalue(counts, exact) > 1e-3


def test_sampling_is_reproducible_for_a_seed():
    m = _model("gpt2")
    ids, mask = _prompts(2, 12)
    kw = dict(temperature=0.8, top_k=10, attention_mask=mask, assistant_model=_near_copy(m, 0.02))
    a = m.generate(ids, 20, generator=torch.Generator().manual_seed(4), **kw)
    b = m.generate(ids, 20, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)


# ---- errors -----------------------------------------------------------------------------------------------------
def test_bad_draft_arguments_name_the_argument():
    m = _model("gpt2")
    ids = torch.randint(0, VOCAB, (1, 5))
    d = _near_copy(m, 0.0)
    cases = [(dict(assistant_model=d, prompt_lookup_num_tokens=2), ValueError, "one kind of draft"),
             (dict(assistant_model=torch.nn.Linear(2, 2)), TypeError, "assistant_model: expected a GPT"),
             (dict(assistant_model=m), ValueError, "assistant_model: the model itself"),
             (dict(assistant_model=d, num_assistant_tokens=0), ValueError, "num_assistant_tokens"),
             (dict(prompt_lookup_num_tokens=True), ValueError, "prompt_lookup_num_tokens"),
             (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=0), ValueError, "max_matching_ngram_size"),
             (dict(assistant_model=_model("gpt2", max_seq_len=8)), ValueError, "assistant_model: config.max_seq_len"),
             (dict(assistant_model=_near_copy(m, 0.0).train()), ValueError, "training mode")]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            m.generate(ids, 6, temperature=0, **kw)


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_drafts_at_the_end_of_max_seq_len(pos):
    """Generations that fill max_seq_len (the last token never fed back): an assistant drafts as far ahead of the
    end as k says, at positions past a learned table (IndexError), and was refused one token short of the limit the
    model itself takes; greedy drafts must still give plain greedy's tokens."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=2, n_head=2, max_seq_len=16, pos=pos)).eval()
    a = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=1, n_head=2, max_seq_len=16, pos=pos)).eval()
    for L, n in [(15, 2), (10, 7), (1, 16)]:
        ids = torch.randint(0, 50, (3, L), generator=torch.Generator().manual_seed(L))
        plain = m.generate(ids, n, temperature=0, eos_token_id=None)
        for k in (1, 8):
            assert torch.equal(m.generate(ids, n, temperature=0, eos_token_id=None, assistant_model=a,
                                          num_assistant_tokens=k), plain), (L, n, k)
            assert torch.equal(m.generate(ids, n, temperature=0, eos_token_id=None, prompt_lookup_num_tokens=k),
                               plain), (L, n, k)
