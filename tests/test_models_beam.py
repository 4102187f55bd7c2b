"""Beam search and the repetition processors (models/beam.py) against transformers' generate on the same weights:
small randomly initialised GPT-2, Llama (GQA), Mistral (sliding window), BLOOM (ALiBi), BART (forced BOS / EOS) and
T5 (relative positions) saved to tmp_path, batches with left padding, several eos ids so that hypotheses end at
different lengths, every early_stopping mode, length penalties of both signs, num_return_sequences; the sequences
equal, their scores within float32 rounding.
Float64 weights on both sides (the log-probabilities are float32 in both searches), so that no near-tie in the
logits' last bits decides a beam. The processors and the sampling warpers alone against transformers' own; bad
arguments named."""
import pytest
import torch

from fastattn.models import GPT, GPTConfig, Seq2Seq, Seq2SeqConfig
from fastattn.models.beam import LogitsProcessors
transformers = pytest.importorskip("transformers")

VOCAB = 53
EOS = [3, 5, 7, 11]  # several eos ids: hypotheses end early and at different steps


def _save(tmp_path, hf):
    hf.save_pretrained(tmp_path)
    return type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()


def _gpt2(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, initializer_range=0.3, bos_token_id=0, eos_token_id=0))
    return _save(tmp_path, hf)


def _llama(tmp_path):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=0, eos_token_id=0,
        pad_token_id=0))
    return _save(tmp_path, hf)


def _mistral(tmp_path):
    """A sliding window (5) shorter than prompt + continuation: the beams' reordered caches under the window."""
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, sliding_window=5, bos_token_id=0,
        eos_token_id=0, pad_token_id=0))
    return _save(tmp_path, hf)


def _bloom(tmp_path):
    """ALiBi positions (transformers' float64 BLOOM gives NaN under padding: unpadded prompts for it)."""
    hf = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0))
    return _save(tmp_path, hf)


def _prompts(L=7):
    ids = torch.randint(12, VOCAB, (3, L), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


def _hf_beams(hf, ids, mask, n, **kw):
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                      pad_token_id=EOS[0], return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences, out.sequences_scores


SEARCHES = [dict(num_beams=3), dict(num_beams=4, num_return_sequences=2, length_penalty=2.0),
            dict(num_beams=3, early_stopping=True, length_penalty=0.0),
            dict(num_beams=3, early_stopping=True, length_penalty=2.0), dict(num_beams=4, length_penalty=3.0),
            dict(num_beams=4, early_stopping="never", length_penalty=1.5, num_return_sequences=3),
            dict(num_beams=2, length_penalty=-0.5), dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.4)]


def _name(search):
    return "-".join(f"{k}={v}" for k, v in search.items())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "bloom"])
@pytest.mark.parametrize("search", SEARCHES, ids=_name)
def test_gpt_beam_search_matches_transformers(tmp_path, arch, search):
    hf = {"gpt2": _gpt2, "llama": _llama, "mistral": _mistral, "bloom": _bloom}[arch](tmp_path)
    ours = GPT.from_hf(tmp_path, dtype=torch.float64)
    ids, mask = _prompts()
    if arch == "bloom":
        mask = torch.ones_like(mask)
    want, want_scores = _hf_beams(hf, ids, mask, 12, **search)
    got = ours.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=EOS, **search)
    assert torch.equal(got, want)
    torch.testing.assert_close(ours.beam_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_beam_search_paths_agree():
    """The bound decode step, the module path (torch backend: nothing bound) and one prompt at a time give the same
    beams; beams that end all at once at max_new_tokens when no eos id is given; max_new_tokens 0 returns the
    prompts, R rows each, as beam search shapes its results."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64, pos="rotary",
                    norm="rmsnorm", mlp="swiglu")
    m = GPT(cfg).double().eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    ref = GPT(GPTConfig.from_dict({**cfg.to_dict(), "backend": "torch"})).double().eval()
    ref.load_state_dict(m.state_dict())
    ids, mask = _prompts()
    kw = dict(temperature=0, eos_token_id=EOS, num_beams=3, num_return_sequences=2)
    got = m.generate(ids, 10, attention_mask=mask, **kw)
    assert torch.equal(ref.generate(ids, 10, attention_mask=mask, **kw), got)
    scores = m.beam_scores
    for b in range(3):
        row = ids[b:b + 1, mask[b].bool()]
        alone = m.generate(row, 10, **kw)
        n, batched = alone.shape[1] - row.shape[1], got[2 * b:2 * b + 2, ids.shape[1]:]
        assert torch.equal(alone[:, row.shape[1]:], batched[:, :n]) and (batched[:, n:] == EOS[0]).all()
        torch.testing.assert_close(m.beam_scores, scores[2 * b:2 * b + 2])
    full = m.generate(ids, 6, attention_mask=mask, temperature=0, num_beams=2)
    assert full.shape == (3, ids.shape[1] + 6)
    assert torch.equal(m.generate(ids, 0, attention_mask=mask, **kw), ids.repeat_interleave(2, 0))
    assert m.beam_scores.shape == (6,)


def _bart(tmp_path):
    hf = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2, forced_eos_token_id=None,
        init_std=0.3)).eval()
    hf.generation_config.forced_bos_token_id = 0
    hf.generation_config.forced_eos_token_id = EOS[1]  # BART's generation configs force </s> at max_length
    with torch.no_grad():
        for side in (hf.model.encoder, hf.model.decoder):  # one table in BART (transformers 5 unties them)
            side.embed_tokens.weight.copy_(hf.model.shared.weight)
    return _save(tmp_path, hf)


def _t5(tmp_path):
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=0.5, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()
    return _save(tmp_path, hf)


@pytest.mark.parametrize("arch", ["bart", "t5"])
@pytest.mark.parametrize("search", [s for s in SEARCHES if s.get("length_penalty") != -0.5], ids=_name)
def test_seq2seq_beam_search_matches_transformers(tmp_path, arch, search):
    """A padded batch of sources (encoded once, the memory repeated for the beams) and one source alone (the memory a
    stride-0 view); BART's forced BOS and min_new_tokens."""
    hf = {"bart": _bart, "t5": _t5}[arch](tmp_path)
    ours = Seq2Seq.from_hf(tmp_path, dtype=torch.float64)
    ids, mask = _prompts(9)
    ids = ids.masked_fill(mask == 0, hf.config.pad_token_id)
    extra = dict(min_new_tokens=2) if arch == "bart" else {}
    for rows in (slice(0, 3), slice(1, 2)):
        want, want_scores = _hf_beams(hf, ids[rows], mask[rows], 10, **search, **extra)
        got = ours.generate(ids[rows], 10, temperature=0, attention_mask=mask[rows], eos_token_id=EOS,
                            **search, **extra)
        assert torch.equal(got, want), rows
        torch.testing.assert_close(ours.beam_scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7),
                                dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2, repetition_penalty=1.3)])
def test_greedy_processors_match_transformers(tmp_path, kw):
    """Greedy with the processors on the logits: a left-padded GPT-2 batch (the penalty skips the padding) and
    BART (its decoder start token penalised too, the forced BOS kept whatever the processors say)."""
    hf = _gpt2(tmp_path / "gpt2")
    ours = GPT.from_hf(tmp_path / "gpt2", dtype=torch.float64)
    ids, mask = _prompts()
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0, **kw)
    assert torch.equal(ours.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=None, **kw), want)
    hf = _bart(tmp_path / "bart")
    ours = Seq2Seq.from_hf(tmp_path / "bart", dtype=torch.float64)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=1, min_length=0, **kw)
    assert torch.equal(ours.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=None, **kw), want)


def test_forced_eos_in_every_search(tmp_path):
    """BART's forced_eos_token_id, read from its generation config: the last new token when max_new_tokens is
    reached, in greedy (as transformers'), speculative (prompt lookup: plain greedy's output) and sampling."""
    torch.manual_seed(0)  # (unseeded, a sampled row could end early on eos 2 and never reach the forced one)
    hf = _bart(tmp_path)
    ours = Seq2Seq.from_hf(tmp_path, dtype=torch.float64)
    assert ours.config.forced_eos_token_id == EOS[1]
    ids, mask = _prompts(9)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=1, min_length=0)
    got = ours.generate(ids, 8, temperature=0, attention_mask=mask, output_scores=True)
    assert torch.equal(got, want) and (got[:, -1] == EOS[1]).all()
    lp = ours.token_logprobs  # forced tokens are certain: log-probability 0 (the first, BOS, and the last, EOS)
    assert lp.shape == (3, 8) and (lp[:, [0, -1]] == 0).all() and (lp[:, 1:-1] < 0).all()
    assert torch.equal(ours.generate(ids, 8, temperature=0, attention_mask=mask, prompt_lookup_num_tokens=3), got)
    g = torch.Generator().manual_seed(0)
    for spec in ({}, dict(prompt_lookup_num_tokens=2)):
        sampled = ours.generate(ids, 8, temperature=1.0, attention_mask=mask, generator=g, eos_token_id=None, **spec)
        assert (sampled[:, -1] == EOS[1]).all() and (sampled[:, 1] == 0).all()
    assert (ours.generate(ids, 8, temperature=0, attention_mask=mask, forced_eos_token_id=9)[:, -1] == 9).all()
    # None turns forcing off for the call, as in transformers (not given: the config's)
    off = dict(forced_bos_token_id=None, forced_eos_token_id=None)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=1, min_length=0, **off)
    assert not torch.equal(want, got)
    assert torch.equal(ours.generate(ids, 8, temperature=0, attention_mask=mask, **off), want)


def test_several_samples_per_prompt():
    """num_return_sequences when sampling: each prompt's R samples in a row, as transformers' generate orders them,
    each what sampling the prompt repeated R times gives (same generator state); greedy refuses R > 1."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, max_seq_len=64)).eval()
    ids, mask = _prompts()
    kw = dict(temperature=1.0, attention_mask=mask)
    got = m.generate(ids, 6, num_return_sequences=2, generator=torch.Generator().manual_seed(1), **kw)
    kw["attention_mask"] = mask.repeat_interleave(2, 0)
    want = m.generate(ids.repeat_interleave(2, 0), 6, generator=torch.Generator().manual_seed(1), **kw)
    assert got.shape == (6, ids.shape[1] + 6) and torch.equal(got, want)
    assert not torch.equal(got[0::2], got[1::2])  # two samples, not one twice
    s2s = Seq2Seq(Seq2SeqConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, max_seq_len=32)).eval()
    assert s2s.generate(ids, 4, temperature=1.0, num_return_sequences=3).shape == (9, 5)
    with pytest.raises(ValueError, match="num_return_sequences: greedy search gives one sequence"):
        m.generate(ids, 3, temperature=0, num_return_sequences=2)


@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.3), dict(temperature=0.8, top_k=10)])
def test_token_logprobs_equal_transformers_transition_scores(tmp_path, kw):
    """output_scores: each new token's log-probability under the distribution it was picked from equals
    transformers' compute_transition_scores(normalize_logits=True) (greedy, with a processor, and sampled: the
    scores of our own tokens, fed to transformers as its sequences); 0 after an eos."""
    hf = _gpt2(tmp_path)
    ours = GPT.from_hf(tmp_path, dtype=torch.float64)
    ids, mask = _prompts()
    T = kw.pop("temperature", 0.0)
    got = ours.generate(ids, 10, temperature=T, attention_mask=mask, output_scores=True, eos_token_id=EOS,
                        generator=torch.Generator().manual_seed(0), **kw)
    scores = ours.token_logprobs
    assert scores.shape == (3, got.shape[1] - ids.shape[1]) and scores.dtype == torch.float32
    L = ids.shape[1]
    hf_kw = dict(do_sample=T > 0, temperature=T or None, **kw)
    steps = []
    for i in range(got.shape[1] - L):  # transformers' processed scores of each step, on our tokens
        o = hf.generate(input_ids=got[:, :L + i], attention_mask=torch.cat([mask, torch.ones_like(got[:, L:L + i])],
                        1), max_new_tokens=1, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                        eos_token_id=None, **hf_kw)
        steps.append(o.scores[0])
    want = hf.compute_transition_scores(got, tuple(steps), normalize_logits=True)
    ended = torch.zeros(3, dtype=torch.bool)
    for i in range(want.shape[1]):  # after an eos: 0 (the padding is not a choice)
        want[:, i] = want[:, i].masked_fill(ended, 0.0)
        ended |= torch.isin(got[:, L + i], torch.tensor(EOS))
    torch.testing.assert_close(scores, want.float(), rtol=1e-5, atol=1e-5)


def test_processors_equal_transformers_processors():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (4, 15), generator=g)
    scores = torch.randn(4, 40, generator=g)
    pad = torch.tensor([0, 3, 0, 5])
    ids[1, :3], ids[3, :5] = torch.arange(30, 33), torch.arange(35, 40)  # the ignored tokens: each once
    ignore = torch.arange(15)[None, :] < pad[:, None]
    for penalty in (1.3, 0.8):
        want = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pad)(ids, scores.clone())
        got = LogitsProcessors(None, 0, repetition_penalty=penalty, ignore=ignore)(scores, ids, 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ids = ids % 6  # a small alphabet: n-grams repeat
    for n in (1, 2, 3, 15, 16):
        want = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
        got = LogitsProcessors(None, 0, no_repeat_ngram_size=n)(scores, ids, 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("warp", [dict(min_p=0.2), dict(typical_p=0.7), dict(top_k=20, top_p=0.9, min_p=0.05),
                                  dict(top_p=0.8, typical_p=0.9), dict(min_p=0.0), dict(typical_p=1.0)])
def test_sampling_warpers_equal_transformers(warp):
    """The distribution sampling draws from (generation.warped_probs) equals softmax of transformers' warpers applied in
    its order (temperature, top-k, top-p, min-p, typical) to the same logits."""
    from transformers.generation import logits_process as lp

    from fastattn.models.generation import Sampling, warped_probs
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    T = 0.7
    chain = [lp.TemperatureLogitsWarper(T)]
    if "top_k" in warp:
        chain.append(lp.TopKLogitsWarper(warp["top_k"]))
    if "top_p" in warp:
        chain.append(lp.TopPLogitsWarper(warp["top_p"]))
    if "min_p" in warp:
        chain.append(lp.MinPLogitsWarper(warp["min_p"]))
    if warp.get("typical_p", 1.0) < 1.0:
        chain.append(lp.TypicalLogitsWarper(warp["typical_p"]))
    want = logits.clone()
    for w in chain:
        want = w(None, want)
    got = warped_probs(logits, Sampling(T, **warp))
    torch.testing.assert_close(got, want.softmax(-1))
    assert ((got > 0).sum(-1) < 50).all() or warp in (dict(min_p=0.0), dict(typical_p=1.0))  # something was cut


def test_bad_search_arguments_name_the_argument():
    m = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, max_seq_len=32)).eval()
    ids = torch.randint(0, VOCAB, (1, 4))
    for kw, name in [(dict(num_beams=0), "num_beams"), (dict(num_beams=2.0), "num_beams"),
                     (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                     (dict(num_beams=2, temperature=0.7), "num_beams"),
                     (dict(num_beams=2, streamer=print), "streamer"),
                     (dict(num_beams=2, prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
                     (dict(repetition_penalty=1.2, prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
                     (dict(early_stopping="sometimes"), "early_stopping"), (dict(repetition_penalty=0.0),
                                                                           "repetition_penalty"),
                     (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(length_penalty="1"),
                                                                               "length_penalty"),
                     (dict(temperature=1.0, min_p=1.5), "min_p"), (dict(temperature=1.0, typical_p=0.0), "typical_p"),
                     (dict(num_beams=2, output_scores=True), "output_scores"),
                     (dict(output_scores=True, prompt_lookup_num_tokens=2), "output_scores")]:
        with pytest.raises(ValueError, match=name):
            m.generate(ids, 3, **{"temperature": 0, **kw})
    tiny = GPT(GPTConfig(vocab_size=3, d_model=32, n_layer=1, n_head=4, max_seq_len=32)).eval()
    with pytest.raises(ValueError, match="num_beams: 2 beams with 3 eos ids take 8 candidates"):
        tiny.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0, num_beams=2, eos_token_id=[0, 1, 2])


def test_default_eos_is_the_generation_configs(tmp_path):
    """generate without eos_token_id stops where transformers' generate does without it: at the end tokens of the
    checkpoint's generation_config (a list, as Llama 3's), which from_hf reads; eos_token_id=None still means none
    (ours ran past every end token by default)."""
    hf = _gpt2(tmp_path / "gpt2")
    hf.generation_config.eos_token_id = EOS
    hf.save_pretrained(tmp_path / "gpt2")
    ours = GPT.from_hf(tmp_path / "gpt2", dtype=torch.float64)
    assert ours.config.eos_token_id == EOS
    ids, mask = _prompts()
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=EOS[0])
    got = ours.generate(ids, 12, temperature=0, attention_mask=mask)
    assert torch.equal(got, want)
    assert got.shape[1] < ids.shape[1] + 12 or torch.isin(got[:, ids.shape[1]:-1], torch.tensor(EOS)).any()
    assert ours.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=None).shape[1] == \
        ids.shape[1] + 12
    bart = _bart(tmp_path / "bart")
    s2s = Seq2Seq.from_hf(tmp_path / "bart", dtype=torch.float64)
    eos = bart.generation_config.eos_token_id
    assert s2s.config.eos_token_id == eos
    want = bart.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=eos,
                         min_length=0)
    assert torch.equal(s2s.generate(ids, 12, temperature=0, attention_mask=mask), want)
