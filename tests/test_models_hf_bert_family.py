"""BERT.from_hf / BERTForSequenceClassification.from_hf on the rest of the BERT family: RoBERTa (and XLM-RoBERTa,
CamemBERT: the same model under other names), DistilBERT, ELECTRA, ALBERT, DeBERTa-v2 / v3, MPNet and ModernBERT,
small and randomly initialised, saved to tmp_path. Logits against transformers' own model on the same weights (fp32;
error bounded by transformers' own fp32 error against its float64 run), with right and left padding (RoBERTa numbers
positions past its padding tokens), and both of our backends; errors name what is wrong."""
import json

import pytest
import torch

import fastattn
from conftest import assert_bounded, backends_train_alike, padded_batch
from fastattn.models import BERT, BERTForSequenceClassification, CheckpointError
transformers = pytest.importorskip("transformers")

VOCAB, PAD = 97, 1
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD)
ROBERTA = {"roberta": ("RobertaConfig", "Roberta"), "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta"),
           "camembert": ("CamembertConfig", "Camembert")}


def _roberta(kind="roberta", head="ForMaskedLM", **kw):
    cfg_name, prefix = ROBERTA[kind]
    cfg = getattr(transformers, cfg_name)(**{**SMALL, "type_vocab_size": 1, **kw})
    return getattr(transformers, prefix + head)(cfg).eval()


def _distilbert(head="ForMaskedLM", **kw):
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                                        max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
                                        pad_token_id=0, **kw)
    return getattr(transformers, "DistilBert" + head)(cfg).eval()


def _electra(head="ForMaskedLM", **kw):
    return getattr(transformers, "Electra" + head)(transformers.ElectraConfig(**{**SMALL, "embedding_size": 32,
                                                                                 **kw})).eval()


def _batch(left: bool, pad=PAD):
    """2 x 12 tokens (none of them ``pad``), the second row padded by 4 on one side."""
    return padded_batch(VOCAB, 12, 4, left, pad, low=3)


def _float64(hf, path):
    return type(hf).from_pretrained(path, dtype=torch.float64).eval()


@pytest.mark.parametrize("kind", list(ROBERTA))
@pytest.mark.parametrize("left", [False, True])
def test_roberta_mlm_matches_transformers(tmp_path, kind, left):
    torch.manual_seed(0)
    hf = _roberta(kind)
    hf.save_pretrained(tmp_path)
    ours = BERT.from_hf(tmp_path)
    assert ours.config.roberta_positions and ours.config.max_seq_len == 40 - PAD - 1
    ids, mask = _batch(left)
    with torch.no_grad():
        a, b, c = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask), _float64(hf, tmp_path)(
            ids, attention_mask=mask)
    keep = mask.bool()
    assert_bounded(f"{kind} mlm", a.logits[keep], c.logits[keep].double(), b.logits[keep], torch.float32)


def test_roberta_positions_follow_the_padding(tmp_path):
    """A left-padded row's real tokens get the positions they have unpadded: the logits equal the unpadded row's
    (BERT's arange positions would shift them)."""
    torch.manual_seed(0)
    _roberta().save_pretrained(tmp_path)
    ours = BERT.from_hf(tmp_path)
    ids, mask = _batch(left=True)
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask).logits[1, 4:]
        alone = ours(ids[1:, 4:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_roberta_classifier_matches_transformers(tmp_path, backend):
    torch.manual_seed(0)
    hf = _roberta(head="ForSequenceClassification", num_labels=3)
    hf.save_pretrained(tmp_path)
    ours = BERTForSequenceClassification.from_hf(tmp_path, backend=backend)
    ids, mask = _batch(left=False)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)


def test_roberta_pretraining_heads_it_lacks_warned(tmp_path, caplog):
    _roberta().save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="fastattn"):
        BERT.from_hf(tmp_path)
    assert "nsp_head.weight" in caplog.text


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_distilbert_mlm_matches_transformers(tmp_path, sinusoidal):
    torch.manual_seed(0)
    hf = _distilbert(sinusoidal_pos_embds=sinusoidal)
    hf.save_pretrained(tmp_path)
    ours = BERT.from_hf(tmp_path)
    assert ours.config.type_vocab_size == 0 and "encoder.type_emb.weight" not in ours.state_dict()
    assert ours.encoder.pos.weight.requires_grad is not sinusoidal  # frozen, as transformers keeps it
    ids, mask = _batch(left=False, pad=0)
    with torch.no_grad():
        a, b, c = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask), _float64(hf, tmp_path)(
            ids, attention_mask=mask)
    keep = mask.bool()
    assert_bounded("distilbert mlm", a.logits[keep], c.logits[keep].double(), b.logits[keep], torch.float32)
    with pytest.raises(ValueError, match="token_type_ids: this model has no token types"):
        ours(ids, token_type_ids=torch.zeros_like(ids))


def test_distilbert_classifier_matches_transformers(tmp_path):
    """DistilBERT's pre_classifier is a relu pooler."""
    torch.manual_seed(0)
    hf = _distilbert("ForSequenceClassification", num_labels=4)
    hf.save_pretrained(tmp_path)
    ours = BERTForSequenceClassification.from_hf(tmp_path)
    assert ours.config.pooler_activation == "relu"
    ids, mask = _batch(left=False, pad=0)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


def test_electra_matches_transformers(tmp_path, caplog):
    """ELECTRA: the generator's MLM logits and the classifier's (dense, gelu, out_proj on h[:, 0]) equal
    transformers'; a discriminator checkpoint gives the classifier its encoder, the heads at random init (warned)."""
    torch.manual_seed(0)
    ids, mask = _batch(left=False)
    for head, cls in (("ForMaskedLM", BERT), ("ForSequenceClassification", BERTForSequenceClassification)):
        hf = _electra(head, **({"num_labels": 3} if cls is BERTForSequenceClassification else {}))
        with torch.no_grad():  # norm weights and biases start at 1 / 0: make them matter
            for p in hf.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        hf.save_pretrained(tmp_path / head)
        ours = cls.from_hf(tmp_path / head)
        keep = mask.bool() if cls is BERT else slice(None)
        with torch.no_grad():
            a, b, c = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask), _float64(hf, tmp_path / head)(
                ids, attention_mask=mask)
        assert_bounded(f"electra {head}", a.logits[keep], c.logits[keep].double(), b.logits[keep], torch.float32)
    assert ours.config.pooler_activation == "gelu"
    _electra("ForPreTraining").save_pretrained(tmp_path / "disc")
    with caplog.at_level("WARNING", logger="fastattn"):
        clf = BERTForSequenceClassification.from_hf(tmp_path / "disc", num_labels=2)
    assert "classifier.out_proj.weight" in caplog.text
    enc = BERTForSequenceClassification.from_hf(tmp_path / "ForSequenceClassification").encoder.state_dict()
    assert enc.keys() == clf.encoder.state_dict().keys()


def _modernbert(head="ForMaskedLM", **kw):
    """4 layers: global, local, local, global (local_attention 6: keys at most 3 away), no biases."""
    cfg = transformers.ModernBertConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=64, local_attention=6, pad_token_id=PAD, bos_token_id=2, eos_token_id=3,
        cls_token_id=2, sep_token_id=3, initializer_range=0.3), **kw})
    return getattr(transformers, "ModernBert" + head)(cfg).eval()


@pytest.mark.parametrize("head, kw", [("ForMaskedLM", {}), ("ForSequenceClassification", {}),
                                      ("ForSequenceClassification", dict(classifier_pooling="mean")),
                                      ("ForMaskedLM", dict(norm_bias=True, attention_bias=True, mlp_bias=True,
                                                           classifier_bias=True))])
@pytest.mark.parametrize("left", [False, True])
def test_modernbert_matches_transformers(tmp_path, head, kw, left):
    """ModernBERT (pre-norm, rotary with a local base on the windowed layers, windows of 3 keys either side over
    16 tokens, GeGLU, no biases; its classifier's dense, gelu, LayerNorm over [CLS] or the mean): logits within
    transformers' own fp32 error against its float64 run, both backends."""
    torch.manual_seed(0)
    hf = _modernbert(head, **kw, **({"num_labels": 3} if "Classification" in head else {}))
    ids, mask = padded_batch(VOCAB, 16, 5, left, PAD, low=4)
    for ours in _on_both_backends(tmp_path, hf, ids, mask, f"modernbert {head}"):
        assert (ours.config.sliding_window, ours.config.layer_types[:2]) == (4, ["full_attention",
                                                                                "sliding_attention"])


def _on_both_backends(path, hf, ids, mask, name):
    """hf (its 1-D weights, norms' and biases', drawn away from 1 / 0 so they matter) saved to path, imported on both
    backends: each model's logits (on the real tokens for an MLM) within transformers' fp32 error; yields each."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    cls = BERTForSequenceClassification if "Classification" in type(hf).__name__ else BERT
    keep = mask.bool() if cls is BERT else slice(None)
    with torch.no_grad():
        b, c = hf(ids, attention_mask=mask).logits, _float64(hf, path)(ids, attention_mask=mask).logits
        for backend in ("fastattn", "torch"):
            ours = cls.from_hf(path, backend=backend)
            a = ours(ids, attention_mask=mask).logits
            assert_bounded(f"{name} {backend}", a[keep], c[keep].double(), b[keep], torch.float32)
            yield ours


def _albert(head="ForMaskedLM", **kw):
    """ALBERT: 16-wide embeddings projected up to 32, one layer used at all 3 depths."""
    cfg = transformers.AlbertConfig(**{**SMALL, "embedding_size": 16, "num_hidden_layers": 3,
                                       "initializer_range": 0.3, **kw})
    return getattr(transformers, "Albert" + head)(cfg).eval()


@pytest.mark.parametrize("make, head", [(_albert, "ForMaskedLM"), (_albert, "ForSequenceClassification"),
                                        (_electra, "ForMaskedLM"), (_electra, "ForSequenceClassification")])
def test_narrow_embeddings_and_shared_layers(tmp_path, make, head):
    """ALBERT (narrow embeddings projected up, one layer shared by every depth) and ELECTRA-small (narrow
    embeddings): MLM and classifier logits within transformers' fp32 error, both backends; ALBERT's shared block
    is one module (its parameters counted once)."""
    torch.manual_seed(0)
    ids, mask = padded_batch(VOCAB, 20, 5, False, PAD, low=3)
    kw = dict(embedding_size=16) if make is _electra else {}
    hf = make(head, **kw, **({"num_labels": 3} if "Class" in head else {}))
    for ours in _on_both_backends(tmp_path, hf, ids, mask, f"{type(hf).__name__}"):
        assert ours.config.embed_dim == 16 and ours.config.shared_layers is (make is _albert)
    if make is _albert:
        blocks = ours.encoder.blocks
        assert blocks[0] is blocks[2] and sum(p.numel() for p in ours.encoder.parameters()) == sum(
            p.numel() for n, p in hf.albert.named_parameters() if not n.startswith("pooler"))
        if head == "ForMaskedLM":  # the shared block's gradients summed over its uses, alike on both backends
            backends_train_alike(lambda backend: BERT.from_hf(tmp_path, backend=backend, dropout=0.0),
                                 dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
            ours = BERT.from_hf(tmp_path)  # our own format keeps the block shared (its tensors stored once)
            ours.save_pretrained(tmp_path / "ours")
            back = BERT.from_pretrained(tmp_path / "ours")
            int8 = fastattn.quantize(BERT.from_hf(tmp_path), mode="w8a16")  # the one block's Linears quantized
            with torch.no_grad():
                want = ours(ids, attention_mask=mask).logits
                assert torch.equal(back(ids, attention_mask=mask).logits, want)
                assert (int8(ids, attention_mask=mask).logits - want).abs().max() < 0.05
            assert back.encoder.blocks[0] is back.encoder.blocks[2]
            assert type(int8.encoder.blocks[2].attn.wqkv).__name__ == "Int8Linear"


def _mpnet(head="ForMaskedLM", **kw):
    """MPNet: RoBERTa's positions, no token types, T5's relative bias (32 buckets, 16 each way, exact up to 8)."""
    cfg = transformers.MPNetConfig(**{**SMALL, "max_position_embeddings": 64, "initializer_range": 0.3, **kw})
    return getattr(transformers, "MPNet" + head)(cfg).eval()


@pytest.mark.parametrize("head, left", [("ForMaskedLM", False), ("ForMaskedLM", True),
                                        ("ForSequenceClassification", False)])
def test_mpnet_matches_transformers(tmp_path, head, left):
    """MPNet (all-mpnet-base-v2's architecture): MLM and classifier logits of a 40-token batch (distances past the
    exact buckets) within transformers' fp32 error on both backends."""
    torch.manual_seed(0)
    ids, mask = padded_batch(VOCAB, 40, 6, left, PAD, low=3)
    for ours in _on_both_backends(tmp_path, _mpnet(head, **({"num_labels": 3} if "Class" in head else {})), ids,
                                  mask, f"mpnet {head}"):
        assert (ours.config.relative_buckets, ours.config.roberta_positions) == (32, True)


def _deberta(head="ForMaskedLM", **kw):
    """DeBERTa-v3-shaped: disentangled attention over 8 log buckets out to 16 (the 20-token batch reaches past
    both), no absolute positions, no token types."""
    cfg = transformers.DebertaV2Config(**{**SMALL, **dict(
        relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
        share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
        layer_norm_eps=1e-7, initializer_range=0.3), **kw})
    return getattr(transformers, "DebertaV2" + head)(cfg).eval()


@pytest.mark.parametrize("head, kw, left", [
    ("ForMaskedLM", {}, False), ("ForMaskedLM", {}, True), ("ForMaskedLM", dict(legacy=False), True),
    ("ForMaskedLM", dict(position_biased_input=True, type_vocab_size=2), True),
    ("ForSequenceClassification", dict(num_labels=3), False)])  # (h[:, 0]: right padding)
def test_deberta_matches_transformers(tmp_path, head, kw, left):
    """DeBERTa-v2 / v3 (disentangled attention: content-to-position and position-to-content terms over bucketed
    relative positions): MLM and classifier logits within transformers' own fp32 error, both backends; the
    fastattn backend's training step matches the torch backend's."""
    torch.manual_seed(0)
    ids, mask = padded_batch(VOCAB, 20, 5, left, PAD, low=3)
    for ours in _on_both_backends(tmp_path, _deberta(head, **kw), ids, mask, f"deberta {head}"):
        assert (ours.config.rel_pos_buckets, ours.config.rel_pos_max) == (8, 16)
    if head == "ForMaskedLM" and not left:
        backends_train_alike(lambda backend: BERT.from_hf(tmp_path, backend=backend, dropout=0.0),
                             dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))


@pytest.mark.parametrize("make", [lambda **kw: transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, **kw)),
                                  _roberta, _albert, _mpnet, _deberta], ids=["bert", "roberta", "albert", "mpnet",
                                                                             "deberta"])
def test_untied_mlm_head_takes_its_decoders_bias(tmp_path, make):
    """An untied MLM head (tie_word_embeddings false): transformers ties the decoder's bias to the head's only with
    the embeddings, so its logits add the decoder's own (cls.predictions.decoder.bias, lm_head.decoder.bias), drawn
    apart from the head's here; both backends within transformers' fp32 error."""
    torch.manual_seed(0)
    ids, mask = padded_batch(VOCAB, 12, 4, False, PAD, low=3)
    hf = make(tie_word_embeddings=False).eval()
    for ours in _on_both_backends(tmp_path, hf, ids, mask, type(hf).__name__):
        assert not ours.config.tie_embeddings
    sd = hf.state_dict()
    own = next(k for k in sd if k.endswith("decoder.bias"))
    assert not torch.equal(sd[own], sd[own.replace("decoder.bias", "bias")])


def test_fine_tuning_a_roberta_import_trains(tmp_path):
    """The imported model trains on both backends alike (same losses over a few AdamW steps), and round-trips
    through our own save_pretrained / from_pretrained with its position scheme."""
    torch.manual_seed(0)
    _roberta().save_pretrained(tmp_path / "hf")
    ids, mask = _batch(left=True)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    labels[mask == 0] = -100
    model = backends_train_alike(lambda backend: BERT.from_hf(tmp_path / "hf", backend=backend),
                                 dict(input_ids=ids, attention_mask=mask, labels=labels))
    model.save_pretrained(tmp_path / "ours")
    again = BERT.from_pretrained(tmp_path / "ours").eval()
    assert again.config.roberta_positions
    with torch.no_grad():
        want = model.eval()(ids, attention_mask=mask).logits
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, want)


def test_bert_family_errors(tmp_path):
    _roberta(hidden_act="relu").save_pretrained(tmp_path / "r")
    with pytest.raises(CheckpointError, match="hidden_act 'relu'.*gelu"):
        BERT.from_hf(tmp_path / "r")
    _roberta(max_position_embeddings=2).save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="max_position_embeddings 2"):
        BERT.from_hf(tmp_path / "p")
    _distilbert("Model").save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="vocab_transform.weight.*missing"):
        BERT.from_hf(tmp_path / "d")
    clf = BERTForSequenceClassification.from_hf(tmp_path / "d", num_labels=2)  # a bare encoder: heads at init
    assert clf(torch.ones(1, 4, dtype=torch.long)).logits.shape == (1, 2)
    with pytest.raises(ValueError, match="pooler_activation"):
        BERT.config_class(pooler_activation="swish")
    _albert(num_hidden_groups=2).save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="num_hidden_groups=2"):
        BERT.from_hf(tmp_path / "a")
    for kw, key in ((dict(conv_kernel_size=3), "conv_kernel_size"), (dict(pos_att_type=["c2p"]), "pos_att_type"),
                    (dict(share_att_key=False), "share_att_key")):
        _deberta(**kw).save_pretrained(tmp_path / key)
        with pytest.raises(CheckpointError, match=key):
            BERT.from_hf(tmp_path / key)
    cfg = json.loads((tmp_path / "pos_att_type" / "config.json").read_text())
    del cfg["share_att_key"]  # transformers' default where config.json lacks it: unshared projections
    (tmp_path / "pos_att_type" / "config.json").write_text(json.dumps({**cfg, "pos_att_type": ["p2c", "c2p"]}))
    with pytest.raises(CheckpointError, match="share_att_key=False"):
        BERT.from_hf(tmp_path / "pos_att_type")
    with pytest.raises(ValueError, match="BERTConfig.rel_pos_max"):
        BERT.config_class(rel_pos_buckets=8, rel_pos_max=4)
    with pytest.raises(ValueError, match="roberta_positions: needs pos 'learned' and pos_offset = pad_token_id"):
        BERT.config_class(roberta_positions=True, pad_token_id=1)
