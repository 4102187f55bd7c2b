"""Seq2Seq.from_hf on small randomly initialised BART, mBART, Marian, Pegasus and M2M100 models saved to tmp_path:
transformers' own model on the same weights (fp32; error bounded by transformers' own fp32 error against its float64
run) with padded sources, greedy generation token for token against transformers' generate (forced BOS included),
both backends alike in training, and errors naming what is wrong."""
import json

import pytest
import torch

from conftest import assert_bounded, backends_train_alike, padded_batch
from fastattn.models import CheckpointError, Seq2Seq
transformers = pytest.importorskip("transformers")

VOCAB = 61


def _bart(kind="bart", **kw):
    cls = {"bart": ("BartConfig", "BartForConditionalGeneration"),
           "mbart": ("MBartConfig", "MBartForConditionalGeneration"),
           "marian": ("MarianConfig", "MarianMTModel"),
           "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration"),
           "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration")}[kind]
    cfg = getattr(transformers, cls[0])(**{**dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2,
        forced_eos_token_id=None), **kw})
    return getattr(transformers, cls[1])(cfg).eval()


def _saved(tmp_path, hf, bias=False):
    with torch.no_grad():
        if bias:  # BART's checkpoints mostly hold zeros here; make it matter
            hf.final_logits_bias.uniform_(-1, 1)
        for side in (hf.model.encoder, hf.model.decoder):  # untied from `shared` by transformers 5 when
            side.embed_tokens.weight.copy_(hf.model.shared.weight)  # tie_word_embeddings=False; one table in BART
    hf.save_pretrained(tmp_path)
    return tmp_path


def _source(left: bool):
    return padded_batch(VOCAB, 10, 3, left, pad_id=1, low=3)


@pytest.mark.parametrize("kind, kw, bias", [
    ("bart", {}, False), ("bart", dict(scale_embedding=True), True), ("mbart", dict(scale_embedding=True), True),
    ("bart", dict(tie_word_embeddings=False, activation_function="relu"), False),
    # fixed sinusoidal positions: Marian (post-norm, swish), Pegasus (pre-norm), M2M100 / NLLB (fairseq's table)
    ("marian", dict(scale_embedding=True, pad_token_id=1), True), ("pegasus", dict(d_model=36), True),
    ("m2m_100", dict(scale_embedding=True, activation_function="relu"), False)])
@pytest.mark.parametrize("left", [False, True])
def test_logits_and_loss_match_transformers(tmp_path, kind, kw, bias, left):
    torch.manual_seed(0)
    hf = _bart(kind, **kw)
    path = _saved(tmp_path, hf, bias)
    ours = Seq2Seq.from_hf(path)
    assert ours.config.norm_first is (kind in ("mbart", "pegasus", "m2m_100")) and ours.config.lm_head_bias is bias
    hf64 = type(hf).from_pretrained(path, dtype=torch.float64).eval()
    ids, mask = _source(left)
    labels = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    labels[1, 4:] = -100
    # BART shifts labels as Seq2Seq does (start token first); mBART wraps its last token to the front: given here
    kw = dict(attention_mask=mask, labels=labels,
              decoder_input_ids=ours.shift_right(labels) if kind == "mbart" else None)
    with torch.no_grad():
        a = ours(ids, skip_logits=False, **kw)
        b, c = hf(input_ids=ids, **kw), hf64(input_ids=ids, **kw)
    assert_bounded(f"{kind} logits", a.logits, c.logits, b.logits, torch.float32)
    assert_bounded(f"{kind} loss", a.loss, c.loss, b.loss, torch.float32)


@pytest.mark.parametrize("kind", ["bart", "mbart", "marian", "pegasus", "m2m_100"])
def test_greedy_generation_matches_transformers(tmp_path, kind):
    """A batch of sources padded differently, forced BOS (as BART-large-CNN sets it): the same tokens as
    transformers' greedy generate."""
    torch.manual_seed(0)
    hf = _bart(kind, scale_embedding=kind != "bart", init_std=0.3, pad_token_id=1)  # weights that move the tokens
    hf.generation_config.forced_bos_token_id = 0  # transformers 5 keeps it there (generation_config.json)
    path = _saved(tmp_path, hf, bias=kind in ("mbart", "marian"))  # the decode step's head with a bias
    ours = Seq2Seq.from_hf(path)
    assert ours.config.forced_bos_token_id == 0
    ids, mask = _source(left=False)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                       min_length=0, eos_token_id=None, pad_token_id=1, no_repeat_ngram_size=0)
    got = ours.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=None)
    assert torch.equal(got, want)
    assert (got[:, 1] == 0).all()


def test_forced_bos_from_generation_config(tmp_path):
    """transformers 5 keeps generation settings in generation_config.json: they are read from there first."""
    torch.manual_seed(0)
    path = _saved(tmp_path, _bart())
    (path / "generation_config.json").write_text(json.dumps({"forced_bos_token_id": 5, "decoder_start_token_id": 2}))
    ours = Seq2Seq.from_hf(path)
    assert ours.config.forced_bos_token_id == 5
    out = ours.generate(_source(False)[0], 3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert (out[:, 1] == 5).all()
    with pytest.raises(ValueError, match="forced_bos_token_id: 99"):
        ours.generate(_source(False)[0], 3, temperature=0, forced_bos_token_id=99)


def test_end_tokens_list_from_generation_config(tmp_path):
    """generation_config.json's eos_token_id list is generate's default, every id in it (the first: the start
    token's fallback); from_hf kept the first alone, so rows ran past the others."""
    torch.manual_seed(0)
    path = _saved(tmp_path, _bart(init_std=0.3, pad_token_id=1))  # weights that move the tokens
    ids, mask = _source(True)
    plain = Seq2Seq.from_hf(path).generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=None)
    stop = next(int(t) for t in plain[0, 1:-2] if t not in (1, 2))  # a token the first row makes, not eos / pad
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop], "decoder_start_token_id": 2,
                                                             "forced_eos_token_id": None}))
    ours = Seq2Seq.from_hf(path)
    assert ours.config.eos_token_id == [2, stop]
    hf = transformers.BartForConditionalGeneration.from_pretrained(path).eval()
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2)
    got = ours.generate(ids, 12, temperature=0, attention_mask=mask)
    assert torch.equal(got, want)
    j = int((plain[0] == stop).nonzero()[0, 0])  # row 0 ends at its first `stop`, then holds eos[0]
    assert got[0, j] == stop and (got[0, j + 1:] == 2).all() and not torch.equal(got[0], plain[0, :got.shape[1]])


def test_decoder_start_falls_back_to_bos(tmp_path):
    """mBART's config class leaves decoder_start_token_id null: transformers' generate then starts the decoder with
    bos_token_id (0, not eos 2), and so does Seq2Seq's."""
    torch.manual_seed(0)
    hf = _bart("mbart", decoder_start_token_id=None, bos_token_id=0, eos_token_id=2, init_std=0.3,
               scale_embedding=True)
    ours = Seq2Seq.from_hf(_saved(tmp_path, hf))
    assert ours.config.decoder_start_token_id == 0
    ids, mask = _source(left=False)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1,
                       min_length=0, eos_token_id=None, pad_token_id=1, no_repeat_ngram_size=0)
    assert torch.equal(ours.generate(ids, 8, temperature=0, attention_mask=mask, eos_token_id=None), want)
    assert (want[:, 0] == 0).all()


def test_backends_train_alike_and_round_trip(tmp_path):
    torch.manual_seed(0)
    path = _saved(tmp_path / "hf", _bart(scale_embedding=True), bias=True)
    ids, mask = _source(left=True)
    labels = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    model = backends_train_alike(lambda backend: Seq2Seq.from_hf(path, backend=backend),
                                 dict(input_ids=ids, attention_mask=mask, labels=labels))
    model.eval().save_pretrained(tmp_path / "ours")
    again = Seq2Seq.from_pretrained(tmp_path / "ours").eval()
    assert (again.config.pos_offset, again.config.lm_head_bias) == (2, True)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask, labels=labels, skip_logits=False).logits,
                                   model(ids, attention_mask=mask, labels=labels, skip_logits=False).logits)


def test_errors_name_the_setting(tmp_path):
    _bart(decoder_attention_heads=2).save_pretrained(tmp_path / "heads")
    with pytest.raises(CheckpointError, match="encoder_attention_heads 4 != decoder_attention_heads 2"):
        Seq2Seq.from_hf(tmp_path / "heads")
    _bart(tie_word_embeddings=False).save_pretrained(tmp_path / "untied")  # three different token tables
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight' differs from the shared"):
        Seq2Seq.from_hf(tmp_path / "untied")
    _bart(activation_function="gelu_fast").save_pretrained(tmp_path / "act")
    with pytest.raises(CheckpointError, match="gelu_fast"):
        Seq2Seq.from_hf(tmp_path / "act")
    path = _saved(tmp_path / "key", _bart())
    from safetensors.torch import load_file, save_file
    sd = load_file(path / "model.safetensors")
    sd.pop("model.decoder.layers.1.encoder_attn.v_proj.weight")
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.encoder_attn\.v_proj\.weight.*missing"):
        Seq2Seq.from_hf(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "blenderbot"}))
    with pytest.raises(CheckpointError, match="'blenderbot'.*bart, mbart, marian, pegasus, m2m_100, t5, mt5"):
        Seq2Seq.from_hf(path)
    with pytest.raises(ValueError, match="pos_offset: needs pos 'learned'"):
        Seq2Seq.config_class(pos="rotary", pos_offset=2)


def test_sinusoidal_tables_equal_transformers():
    """The fixed position tables the importer builds equal transformers' own, to the bit at even widths over 1026
    rows (M2M100's in float32 as its code computes it: long positions' angles round alike)."""
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding
    from fastattn.models.seq2seq_hf import sinusoidal_halves
    for d in (32, 1024):
        fairseq, marian = M2M100SinusoidalPositionalEmbedding, MarianSinusoidalPositionalEmbedding
        assert torch.equal(sinusoidal_halves(1026, d, True), fairseq.get_embedding(1026, d))
        assert torch.equal(sinusoidal_halves(1026, d, False), marian(1026, d).create_weight())
