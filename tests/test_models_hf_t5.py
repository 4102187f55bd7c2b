"""Seq2Seq.from_hf on small randomly initialised T5 (v1.0: ReLU, tied head with the output scaling; v1.1 / Flan:
gated GELU), mT5 and gated-SiLU configs saved to tmp_path: T5's relative-position buckets against transformers' own,
logits and loss of padded sources bounded by transformers' fp32 error against its float64 run, greedy tokens equal to
transformers' generate, both backends training alike (the bias' gradient included); bad configs refused."""
import logging

import pytest
import torch

from conftest import assert_bounded, backends_train_alike, padded_batch
from fastattn.models import CheckpointError, Seq2Seq, Seq2SeqConfig
from fastattn.models.seq2seq import relative_buckets
transformers = pytest.importorskip("transformers")

VOCAB = 61
VARIANTS = {"t5-v1.0": ("T5", dict(feed_forward_proj="relu")),  # tie_word_embeddings unset: the output scaled
            # (transformers 5 ties T5's and mT5's head to the embedding whatever the config says)
            "flan-t5": ("T5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
            "mt5": ("MT5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
            "gated-silu": ("T5", dict(feed_forward_proj="gated-silu", tie_word_embeddings=False))}


def _t5(variant, **kw):
    prefix, extra = VARIANTS[variant]
    cfg = getattr(transformers, prefix + "Config")(**{**dict(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), **extra, **kw})
    return getattr(transformers, prefix + "ForConditionalGeneration")(cfg).eval()


def _source(left: bool):
    return padded_batch(VOCAB, 14, 5, left, pad_id=0, low=2)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_transformers(bidirectional):
    rel = torch.arange(-300, 301)[None, :]
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(relative_buckets(rel, bidirectional, 32, 128), theirs)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("left", [False, True])
def test_logits_and_loss_match_transformers(tmp_path, variant, left):
    torch.manual_seed(0)
    hf = _t5(variant)
    hf.save_pretrained(tmp_path)
    ours = Seq2Seq.from_hf(tmp_path)
    assert (ours.config.relative_buckets, ours.config.head_dim, ours.config.attn_scale) == (16, 16, 1.0)
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids, mask = _source(left)
    labels = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # past 8 exact buckets
    labels[1, 9:] = -100
    kw = dict(attention_mask=mask, labels=labels)
    with torch.no_grad():
        a, b, c = ours(ids, skip_logits=False, **kw), hf(input_ids=ids, **kw), hf64(input_ids=ids, **kw)
    assert_bounded(f"{variant} logits", a.logits, c.logits, b.logits, torch.float32)
    assert_bounded(f"{variant} loss", a.loss, c.loss, b.loss, torch.float32)


@pytest.mark.parametrize("variant", ["t5-v1.0", "flan-t5"])
def test_greedy_generation_matches_transformers(tmp_path, variant, caplog):
    """The decoder's relative bias over the static cache (slot = position) as transformers computes it per step, in
    the bound decode step (its GEMVs; the bias through the flash kernel's float mask)."""
    torch.manual_seed(0)
    hf = _t5(variant, initializer_factor={"t5-v1.0": 2.0, "flan-t5": 8.0}[variant])  # weights that move the tokens
    hf.save_pretrained(tmp_path)
    ours = Seq2Seq.from_hf(tmp_path)
    ids, mask = _source(left=False)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False,
                       num_beams=1)
    with caplog.at_level(logging.DEBUG, logger="fastattn"):
        got = ours.generate(ids, 14, temperature=0, attention_mask=mask, eos_token_id=1, min_new_tokens=14)
    assert "not bound" not in caplog.text
    assert torch.equal(got, want)
    assert len(set(got[0, 1:].tolist())) > 3  # not one token repeated


def test_backends_train_alike(tmp_path):
    """The fastattn backend routes the bias' gradient through the reference attention, the torch backend through
    SDPA's float mask: the same losses over three AdamW steps, and the bias tables move."""
    torch.manual_seed(0)
    _t5("flan-t5").save_pretrained(tmp_path)
    ids, mask = _source(left=True)
    labels = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    before = Seq2Seq.from_hf(tmp_path).enc_rel.weight.detach().clone()
    model = backends_train_alike(lambda backend: Seq2Seq.from_hf(tmp_path, backend=backend),
                                 dict(input_ids=ids, attention_mask=mask, labels=labels))
    assert not torch.equal(model.enc_rel.weight.detach(), before)


def test_refused(tmp_path):
    transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="'umt5'.*t5, mt5"):  # a bias table per layer
        Seq2Seq.from_hf(tmp_path)
    with pytest.raises(ValueError, match="Seq2SeqConfig.relative_buckets"):
        Seq2SeqConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, relative_buckets=32)  # pos "learned"
