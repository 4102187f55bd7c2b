"""pytest-benchmark: the model families from_hf gained in session 21, against transformers' own model on the same
weights, same run, rounds interleaved (conftest.interleaved; ratios of minima).

- ModernBERT-base-sized (d 768, 22 layers, 12 heads, GeGLU 1152, windows of 64 keys either side on two layers of
  three): the masked-LM forward of BATCH x SEQ tokens, ``BERT.from_hf`` against ModernBertForMaskedLM ("sdpa");
- OLMo-2-shaped at GPT-2-small size (d 768, 12 layers, 12 heads, SwiGLU 2048, output-only norms, q / k norms over
  all heads): greedy generation of NEW tokens after PROMPT, ``GPT.from_hf`` against Olmo2ForCausalLM.generate;
- Marian opus-mt-sized (d 512, 6 + 6 layers, 8 heads, vocab 58101, fixed sinusoidal positions): greedy translation
  of a PROMPT-token source into NEW tokens, ``Seq2Seq.from_hf`` against MarianMTModel.generate;
- DeBERTa-v3-base-sized (d 768, 12 layers, 12 heads, 256 relative buckets, vocab 128100): the sequence classifier's
  forward of BATCH x SEQ tokens, ``BERTForSequenceClassification.from_hf`` against DebertaV2ForSequenceClassification
  (transformers runs its own eager attention here).

CPU float32, GPU bfloat16. Environment (FASTATTN_BENCH_*): BATCH (4), SEQ (512), PROMPT (128), NEW (64), ROUNDS
(3 on CPU). Skipped without transformers.
"""
import pytest
import torch

import fastattn.hf
from conftest import env_int, interleaved, synced

transformers = pytest.importorskip("transformers")
fastattn.hf.register()  # before any model class loads (see fastattn.hf._installed_kernels_package)
from fastattn.models import BERT, GPT, BERTForSequenceClassification, Seq2Seq  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH, SEQ, PROMPT, NEW = env_int("BATCH", 4), env_int("SEQ", 512), env_int("PROMPT", 128), env_int("NEW", 64)
ROUNDS = env_int("ROUNDS", 10 if GPU else 3)
INFO = dict(device=DEVICE, dtype=str(DTYPE)[6:], threads=torch.get_num_threads())


def _pair(tmp_path_factory, name, hf_cls, cfg, ours_cls):
    """(transformers' model, ours) on the same random weights, saved once by transformers."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    hf_cls(cfg).save_pretrained(path)
    hf = hf_cls.from_pretrained(path, attn_implementation="sdpa").to(DEVICE, DTYPE).eval()
    return hf, ours_cls.from_hf(path).to(DEVICE, DTYPE)


def _ids(vocab, shape):
    return torch.randint(4, vocab, shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_modernbert_mlm_forward(benchmark, tmp_path_factory):
    cfg = transformers.ModernBertConfig(vocab_size=50368, hidden_size=768, intermediate_size=1152,
                                        num_hidden_layers=22, num_attention_heads=12, max_position_embeddings=8192)
    hf, ours = _pair(tmp_path_factory, "modernbert", transformers.ModernBertForMaskedLM, cfg, BERT)
    ids = _ids(cfg.vocab_size, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    runs = {"transformers": synced(DEVICE, lambda: hf(input_ids=ids, attention_mask=mask)),
            "fastattn": synced(DEVICE, lambda: ours(ids, attention_mask=mask))}
    interleaved(benchmark, runs, "fastattn", BATCH * SEQ, f"modernbert-base mlm forward {BATCH}x{SEQ}", ROUNDS,
                model="modernbert-base", batch=BATCH, seq=SEQ, **INFO)
    if DTYPE == torch.float32:  # the same logits, within float32 rounding over 22 layers
        with torch.inference_mode():
            torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                       hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-3, atol=1e-3)


def test_olmo2_greedy_generation(benchmark, tmp_path_factory):
    cfg = transformers.Olmo2Config(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, max_position_embeddings=1024, pad_token_id=1,
                                   bos_token_id=None, eos_token_id=None)
    hf, ours = _pair(tmp_path_factory, "olmo2", transformers.Olmo2ForCausalLM, cfg, GPT)
    ids = _ids(cfg.vocab_size, (1, PROMPT))
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=1)
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, **kw)),
            "fastattn": synced(DEVICE, lambda: ours.generate(ids, NEW, temperature=0))}
    interleaved(benchmark, runs, "fastattn", NEW, f"olmo2 (gpt2-small size) generate {PROMPT}+{NEW} greedy", ROUNDS,
                model="olmo2-124M", prompt=PROMPT, new=NEW, **INFO)
    if DTYPE == torch.float32:  # the timed runs made the same tokens (bfloat16's rounding may part greedy paths)
        with torch.inference_mode():
            assert torch.equal(hf.generate(ids, **kw), ours.generate(ids, NEW, temperature=0))


def test_marian_greedy_translation(benchmark, tmp_path_factory):
    cfg = transformers.MarianConfig(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
                                    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                                    decoder_ffn_dim=2048, max_position_embeddings=512, pad_token_id=58100,
                                    decoder_start_token_id=58100, eos_token_id=0, scale_embedding=True)
    hf, ours = _pair(tmp_path_factory, "marian", transformers.MarianMTModel, cfg, Seq2Seq)
    ids = _ids(cfg.vocab_size - 1, (1, PROMPT))
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=1)
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, **kw)),
            "fastattn": synced(DEVICE, lambda: ours.generate(ids, NEW, temperature=0, min_new_tokens=NEW))}
    interleaved(benchmark, runs, "fastattn", NEW, f"marian opus-mt-sized translate {PROMPT}->{NEW} greedy", ROUNDS,
                model="opus-mt", source=PROMPT, new=NEW, **INFO)
    if DTYPE == torch.float32:  # the timed runs made the same tokens
        with torch.inference_mode():
            assert torch.equal(hf.generate(ids, **kw), ours.generate(ids, NEW, temperature=0, min_new_tokens=NEW))


def test_deberta_classifier_forward(benchmark, tmp_path_factory):
    cfg = transformers.DebertaV2Config(vocab_size=128100, hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                                       relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
                                       norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                                       type_vocab_size=0, layer_norm_eps=1e-7, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deberta")
    transformers.DebertaV2ForSequenceClassification(cfg).save_pretrained(path)
    hf = transformers.DebertaV2ForSequenceClassification.from_pretrained(path).to(DEVICE, DTYPE).eval()
    ours = BERTForSequenceClassification.from_hf(path).to(DEVICE, DTYPE)
    ids = _ids(cfg.vocab_size, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    runs = {"transformers": synced(DEVICE, lambda: hf(input_ids=ids, attention_mask=mask)),
            "fastattn": synced(DEVICE, lambda: ours(ids, attention_mask=mask))}
    interleaved(benchmark, runs, "fastattn", BATCH * SEQ, f"deberta-v3-base classifier forward {BATCH}x{SEQ}",
                ROUNDS, model="deberta-v3-base", batch=BATCH, seq=SEQ, **INFO)
    if DTYPE == torch.float32:  # the same logits
        with torch.inference_mode():
            torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                       hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-3, atol=1e-3)
