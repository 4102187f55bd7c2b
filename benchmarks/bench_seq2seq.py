"""pytest-benchmark: fastattn.models.Seq2Seq against transformers' BART and T5 on the same weights, same run.

A BART-base-sized model (d 768, 6 + 6 layers, 12 heads, vocab 50265) and a Flan-T5-base-sized one (d 768, 12 + 12
layers, 12 heads, gated-GELU d_ff 2048, vocab 32128) with random weights are saved once by transformers and loaded
by both (``Seq2Seq.from_hf``). Greedy generation of NEW tokens for a SOURCE-token source
(summarization-shaped: the encoder reads the source once, the decoder's cross-attention K/V are computed once):
transformers' ``generate`` (attn_implementation="sdpa", num_beams=1) and ours alternated in each round
(conftest.interleaved), in float and with w8a16 weights; prompt lookup and beam search (FASTATTN_BENCH_BEAMS, 4)
likewise. CPU float32, GPU bfloat16. Environment: FASTATTN_BENCH_SOURCE
(256), FASTATTN_BENCH_NEW (64), FASTATTN_BENCH_ROUNDS (3 on CPU). Skipped without transformers.
"""
import os

import pytest
import torch

import fastattn
import fastattn.hf
from conftest import GUARD, interleaved, interleaved_speculative, synced
from fastattn.testing import sync

transformers = pytest.importorskip("transformers")
fastattn.hf.register()  # before any model class loads (see fastattn.hf._installed_kernels_package)
from fastattn.models import Seq2Seq  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
SOURCE = int(os.environ.get("FASTATTN_BENCH_SOURCE", "256"))
NEW = int(os.environ.get("FASTATTN_BENCH_NEW", "64"))
ROUNDS = int(os.environ.get("FASTATTN_BENCH_ROUNDS", "10" if GPU else "3"))
# BART's config forces eos as the last token (forced_eos_token_id), read by both; no other processor
HF_GREEDY = dict(do_sample=False, num_beams=1, forced_bos_token_id=None, no_repeat_ngram_size=0)


def _hf_model(name):
    if name == "bart-base":
        cfg = transformers.BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                                      encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                      decoder_ffn_dim=3072, max_position_embeddings=1024)
        return transformers.BartForConditionalGeneration, cfg, 2
    cfg = transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration, cfg, 1


@pytest.fixture(scope="module", params=["bart-base", "flan-t5-base"])
def models(request, tmp_path_factory):
    cls, cfg, eos = _hf_model(request.param)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    cls(cfg).save_pretrained(path)
    hf = cls.from_pretrained(path, attn_implementation="sdpa")
    ours = {"fastattn": Seq2Seq.from_hf(path).to(DEVICE, DTYPE),
            "fastattn-w8a16": fastattn.quantize(Seq2Seq.from_hf(path).to(DEVICE, DTYPE), mode="w8a16")}
    return request.param, hf.to(DEVICE, DTYPE).eval(), ours, eos


def _source(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (1, SOURCE), generator=g).to(DEVICE)


@pytest.mark.parametrize("impl", ["fastattn", "fastattn-w8a16"])
def test_greedy_generation_interleaved(benchmark, models, impl):
    name, hf, ours, eos = models
    ids = _source(hf.config.vocab_size)

    def theirs():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **HF_GREEDY)
        sync(DEVICE)

    def mine():
        with torch.inference_mode():
            ours[impl].generate(ids, NEW, temperature=0, eos_token_id=eos, min_new_tokens=NEW)  # as theirs
        sync(DEVICE)

    interleaved(benchmark, {"transformers": theirs, impl: mine}, impl, NEW,
                f"{name} generate interleaved {str(DTYPE)[6:]} {SOURCE}->{NEW} greedy", ROUNDS, device=DEVICE,
                dtype=str(DTYPE)[6:], model=name, source=SOURCE, new=NEW, threads=torch.get_num_threads())


LOOKUP = int(os.environ.get("FASTATTN_BENCH_LOOKUP", "4"))


def test_prompt_lookup_interleaved(benchmark, models):
    """Prompt lookup (LOOKUP tokens drafted a step), ours (which also searches the source) and transformers' own,
    against both plain greedy runs, rounds interleaved (conftest.interleaved_speculative). Random weights: the
    decoder's greedy output repeats itself, as bench_models.py's GPT's does."""
    name, hf, ours, eos = models
    ids = _source(hf.config.vocab_size)
    model = ours["fastattn"]

    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, **HF_GREEDY)
    mine = dict(temperature=0, eos_token_id=eos, min_new_tokens=NEW)
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, **kw)),
            "transformers-lookup": synced(DEVICE, lambda: hf.generate(ids, prompt_lookup_num_tokens=LOOKUP, **kw)),
            "fastattn": synced(DEVICE, lambda: model.generate(ids, NEW, **mine)),
            "fastattn-lookup": synced(DEVICE, lambda: model.generate(ids, NEW, prompt_lookup_num_tokens=LOOKUP,
                                                                     **mine))}
    interleaved_speculative(benchmark, runs, model, NEW,
                            f"{name} generate prompt-lookup {str(DTYPE)[6:]} {SOURCE}->{NEW} greedy k{LOOKUP}",
                            ROUNDS, device=DEVICE, dtype=str(DTYPE)[6:], model=name, source=SOURCE, new=NEW,
                            threads=torch.get_num_threads())


BEAMS = int(os.environ.get("FASTATTN_BENCH_BEAMS", "4"))


def test_beam_search_interleaved(benchmark, models):
    """Beam search (BEAMS beams, as summarization and translation checkpoints decode), transformers' generate and
    ours alternated: NEW tokens for every beam (min_new_tokens), the same tokens (test_same_greedy_tokens)."""
    name, hf, ours, eos = models
    ids = _source(hf.config.vocab_size)
    model = ours["fastattn"]
    kw = {**HF_GREEDY, "num_beams": BEAMS}
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **kw)),
            "fastattn": synced(DEVICE, lambda: model.generate(ids, NEW, temperature=0, eos_token_id=eos,
                                                              min_new_tokens=NEW, num_beams=BEAMS))}
    interleaved(benchmark, runs, "fastattn", NEW,
                f"{name} generate beams {str(DTYPE)[6:]} {SOURCE}->{NEW} {BEAMS} beams", ROUNDS, device=DEVICE,
                dtype=str(DTYPE)[6:], model=name, source=SOURCE, new=NEW, beams=BEAMS,
                threads=torch.get_num_threads())


@GUARD
def test_same_greedy_tokens(benchmark, models):
    """The float rows generate the same tokens (a benchmark of two different computations would be worthless)."""
    _, hf, ours, eos = models
    ids = _source(hf.config.vocab_size)[:, :32]
    with torch.inference_mode():
        theirs = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **HF_GREEDY)
        mine = ours["fastattn"].generate(ids, 8, temperature=0, eos_token_id=eos, min_new_tokens=8)
        lookup = ours["fastattn"].generate(ids, 8, temperature=0, eos_token_id=eos, min_new_tokens=8,
                                           prompt_lookup_num_tokens=LOOKUP)
        theirs_lookup = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, prompt_lookup_num_tokens=LOOKUP,
                                    **HF_GREEDY)
        beams = ours["fastattn"].generate(ids, 8, temperature=0, eos_token_id=eos, min_new_tokens=8,
                                          num_beams=BEAMS)
        theirs_beams = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **{**HF_GREEDY, "num_beams": BEAMS})
    assert torch.equal(mine, theirs) and torch.equal(lookup, theirs) and torch.equal(theirs_lookup, theirs)
    assert torch.equal(beams, theirs_beams)
