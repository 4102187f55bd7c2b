"""pytest-benchmark: fastattn.models.Seq2Seq against transformers' BART on the same weights, same run.

A BART-base-sized model (d 768, 6 + 6 layers, 12 heads, vocab 50265) with random weights is saved once by
transformers and loaded by both (``Seq2Seq.from_hf``). Greedy generation of NEW tokens for a SOURCE-token source
(summarization-shaped: the encoder reads the source once, the decoder's cross-attention K/V are computed once):
transformers' ``generate`` (attn_implementation="sdpa", num_beams=1) and ours alternated in each round
(conftest.interleaved), in float and with w8a16 weights. CPU float32, GPU bfloat16. Environment: FASTATTN_BENCH_SOURCE
(256), FASTATTN_BENCH_NEW (64), FASTATTN_BENCH_ROUNDS (3 on CPU). Skipped without transformers.
"""
import os

import pytest
import torch

import fastattn
import fastattn.hf
from conftest import interleaved
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
HF_GREEDY = dict(do_sample=False, num_beams=1, forced_bos_token_id=None, forced_eos_token_id=None,
                 no_repeat_ngram_size=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                                  encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                  decoder_ffn_dim=3072, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("hf-bart")
    transformers.BartForConditionalGeneration(cfg).save_pretrained(path)
    hf = transformers.BartForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    ours = {"fastattn": Seq2Seq.from_hf(path).to(DEVICE, DTYPE),
            "fastattn-w8a16": fastattn.quantize(Seq2Seq.from_hf(path).to(DEVICE, DTYPE), mode="w8a16")}
    return hf.to(DEVICE, DTYPE).eval(), ours


def _source(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (1, SOURCE), generator=g).to(DEVICE)


@pytest.mark.parametrize("impl", ["fastattn", "fastattn-w8a16"])
def test_greedy_generation_interleaved(benchmark, models, impl):
    hf, ours = models
    ids = _source(hf.config.vocab_size)

    def theirs():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **HF_GREEDY)
        sync(DEVICE)

    def mine():
        with torch.inference_mode():
            ours[impl].generate(ids, NEW, temperature=0, eos_token_id=2, min_new_tokens=NEW)  # as theirs
        sync(DEVICE)

    interleaved(benchmark, {"transformers": theirs, impl: mine}, impl, NEW,
                f"bart-base generate interleaved {str(DTYPE)[6:]} {SOURCE}->{NEW} greedy", ROUNDS, device=DEVICE,
                dtype=str(DTYPE)[6:], model="bart-base", source=SOURCE, new=NEW, threads=torch.get_num_threads())


def test_same_greedy_tokens(models):
    """The float rows generate the same tokens (a benchmark of two different computations would be worthless)."""
    hf, ours = models
    ids = _source(hf.config.vocab_size)[:, :32]
    with torch.inference_mode():
        theirs = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **HF_GREEDY)
        mine = ours["fastattn"].generate(ids, 8, temperature=0, eos_token_id=2, min_new_tokens=8)
    assert torch.equal(mine, theirs)
