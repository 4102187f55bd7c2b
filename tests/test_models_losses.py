"""The models' heads and losses against transformers: DeBERTa-v2's classification loss with problem_type None (its
own rule, recorded by from_hf), losses in the model's dtype (float64 kept, 16-bit in float32; gradcheck in float64),
the checkpoint's dropout taken by from_hf (an override still wins), and no gradient from the lookups into the pad
token's embedding row where transformers' embedding has padding_idx (BERT and BART families; not T5)."""
import json

import pytest
import torch
from torch.func import functional_call

from conftest import padded_batch
from fastattn.models import (BERT, GPT, BERTConfig, BERTForSequenceClassification, GPTConfig, Seq2Seq,
                             Seq2SeqConfig)


def _transformers():
    return pytest.importorskip("transformers")


# ---- DeBERTa-v2 / v3's loss rule ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deberta(tmp_path_factory):
    """num_labels -> (transformers' DebertaV2ForSequenceClassification, ours from its folder)."""
    T, out = _transformers(), {}
    for n in (1, 3):
        torch.manual_seed(0)
        cfg = T.DebertaV2Config(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=40, relative_attention=True,
                                position_buckets=8, max_relative_positions=20, pos_att_type=["p2c", "c2p"],
                                norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                                num_labels=n, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        path = tmp_path_factory.mktemp(f"deberta{n}")
        T.DebertaV2ForSequenceClassification(cfg).save_pretrained(path)
        out[n] = (T.DebertaV2ForSequenceClassification.from_pretrained(path).eval(),
                  BERTForSequenceClassification.from_hf(path))
    return out


LABELS = {  # name -> (num_labels, labels for 3 rows)
    "class ids": (3, lambda: torch.tensor([0, 2, 1])),
    "float class ids": (3, lambda: torch.tensor([0.0, 2.0, 1.0])),
    "negative ids ignored": (3, lambda: torch.tensor([0, -1, 2])),
    "float negative ids": (3, lambda: torch.tensor([-1.0, 1.0, 2.0])),
    "ids (B, 1)": (3, lambda: torch.tensor([[2], [-5], [0]])),
    "all ignored": (3, lambda: torch.tensor([-1, -1, -1])),
    "soft labels": (3, lambda: torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), -1)),
    "multi-hot": (3, lambda: torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])),
    "regression": (1, lambda: torch.tensor([0.5, -1.0, 2.0])),
}


@pytest.mark.parametrize("kind", list(LABELS))
def test_deberta_loss_rule_matches_transformers(deberta, kind):
    n, make = LABELS[kind]
    hf, ours = deberta[n]
    assert ours.config.loss_rule == "deberta" and ours.config.to_dict()["loss_rule"] == "deberta"
    ids, labels = torch.randint(3, 60, (3, 8), generator=torch.Generator().manual_seed(0)), make()
    column = labels.dim() == 2 and labels.shape[1] == 1  # (transformers' gather fails on (B, 1): its (B,) meaning)
    with torch.no_grad():
        want = hf(input_ids=ids, labels=labels.view(-1) if column else labels).loss
    got = ours(ids, labels=labels).loss
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)
    got.backward()  # (0 without a kept row, still a loss of the graph)


def test_loss_rule_default_and_check():
    assert BERTConfig().loss_rule == "bert"
    with pytest.raises(ValueError, match="loss_rule"):
        BERTConfig(loss_rule="roberta")


def test_loss_rule_survives_save_and_load(deberta, tmp_path):
    deberta[3][1].save_pretrained(tmp_path)
    assert BERTForSequenceClassification.from_pretrained(tmp_path).config.loss_rule == "deberta"


# ---- losses in the model's dtype ------------------------------------------------------------------------------------
V, D = 13, 8
IDS = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(0))


def _tiny(kind):
    """(model, the head parameter to gradcheck, forward kwargs giving .loss) of a tiny model, eval mode."""
    common = dict(vocab_size=V, d_model=D, n_layer=1, n_head=2, max_seq_len=16)
    if kind == "bert classifier":
        m = BERTForSequenceClassification(BERTConfig(**common, num_labels=3))
        return m, "classifier.bias", dict(labels=torch.tensor([0, 2]))
    if kind == "bert regression":
        m = BERTForSequenceClassification(BERTConfig(**common, num_labels=1))
        return m, "classifier.bias", dict(labels=torch.tensor([0.5, -1.0]))
    if kind == "bert multi-label":
        m = BERTForSequenceClassification(BERTConfig(**common, num_labels=3))
        return m, "classifier.bias", dict(labels=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    if kind == "bert mlm + nsp":
        m = BERT(BERTConfig(**common))
        return m, "mlm_head.decoder.bias", dict(labels=IDS, next_sentence_label=torch.tensor([0, 1]))
    if kind == "gpt":
        return GPT(GPTConfig(**common, lm_head_bias=True)), "lm_head.bias", dict(labels=IDS)
    return Seq2Seq(Seq2SeqConfig(**common, lm_head_bias=True)), "lm_head.bias", dict(labels=IDS[:, :4])


KINDS = ["bert classifier", "bert regression", "bert multi-label", "bert mlm + nsp", "gpt", "seq2seq"]


@pytest.mark.parametrize("kind", KINDS)
def test_float64_loss_stays_float64_and_passes_gradcheck(kind):
    torch.manual_seed(0)
    m, name, kw = _tiny(kind)
    m = m.double().eval()
    assert m(IDS, **kw).loss.dtype == torch.float64
    w = dict(m.named_parameters())[name].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: functional_call(m, {name: w}, (IDS,), kw).loss, (w,))


@pytest.mark.parametrize("kind", KINDS)
def test_16_bit_loss_is_float32(kind):
    torch.manual_seed(0)
    m, _, kw = _tiny(kind)
    assert m.to(torch.bfloat16).eval()(IDS, **kw).loss.dtype == torch.float32


# ---- the checkpoint's dropout -------------------------------------------------------------------------------------
SMALL_BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32)
SMALL_BART = dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                  decoder_start_token_id=2)
SMALL_GPT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32)
# name -> (config class, model class, config kwargs, ours, the dropout from_hf takes, keys stripped from config.json)
DROPOUT = {
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(SMALL_BERT, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0), BERTForSequenceClassification,
             0.1, ()),
    "bert, key missing": ("BertConfig", "BertForSequenceClassification", dict(SMALL_BERT),
                          BERTForSequenceClassification, 0.1, ("hidden_dropout_prob",)),
    "albert, key missing": ("AlbertConfig", "AlbertForSequenceClassification", dict(SMALL_BERT, embedding_size=16),
                            BERTForSequenceClassification, 0.0, ("hidden_dropout_prob",)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=50, dim=16, hidden_dim=32, n_layers=1, n_heads=2, max_position_embeddings=32,
                        dropout=0.1, attention_dropout=0.0), BERTForSequenceClassification, 0.1, ()),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(SMALL_BART, dropout=0.1, attention_dropout=0.0),
             Seq2Seq, 0.1, ()),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.1), Seq2Seq,
           0.1, ()),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.1, embd_pdrop=0.0,
                  attn_pdrop=0.0), GPT, 0.1, ()),
    "gpt2, key missing": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=32), GPT, 0.1, ("resid_pdrop",)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, ffn_dim=32, max_position_embeddings=32,
                                                 word_embed_proj_dim=16, dropout=0.1), GPT, 0.1, ()),
    # Llama's only dropout is on the attention probabilities: not taken (0, as before)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL_GPT, attention_dropout=0.1), GPT, 0.0, ()),
}


def _saved_hf(tmp_path, case):
    T = _transformers()
    cfg_name, model_name, kw, ours, want, stripped = DROPOUT[case]
    torch.manual_seed(0)
    getattr(T, model_name)(getattr(T, cfg_name)(**kw)).save_pretrained(tmp_path)
    if stripped:  # transformers reads the class default for these
        hf = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k not in stripped}))
    return ours, want


def _outputs(model):
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(decoder_input_ids=ids[:, :5]) if isinstance(model, Seq2Seq) else {}
    return model(ids, **kw).logits


@pytest.mark.parametrize("case", list(DROPOUT))
def test_from_hf_takes_the_checkpoints_dropout(tmp_path, case):
    ours, want = _saved_hf(tmp_path, case)
    m = ours.from_hf(tmp_path)
    assert m.config.dropout == pytest.approx(want)
    e1, e2 = _outputs(m), _outputs(m)
    assert torch.equal(e1, e2)  # eval: deterministic
    t = _outputs(m.train())
    assert not torch.allclose(t, e1) if want else torch.equal(t, e1)
    off = ours.from_hf(tmp_path, dropout=0.0).train()  # an override wins
    assert off.config.dropout == 0.0 and torch.equal(_outputs(off), e1)
    assert ours.from_hf(tmp_path, dropout=0.3).config.dropout == 0.3


# ---- the pad token's embedding row ----------------------------------------------------------------------------------
def _pad_grads(tmp_path, family):
    """(ours, transformers') gradients of the token embedding from one loss of a padded batch, and the pad id."""
    T = _transformers()
    torch.manual_seed(0)
    if family == "bert":
        hf = T.BertForMaskedLM(T.BertConfig(**SMALL_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                            pad_token_id=0)).eval()
        pad, ours_cls = 0, BERT
    elif family == "bart":
        hf = T.BartForConditionalGeneration(T.BartConfig(**SMALL_BART, dropout=0.0, pad_token_id=1)).eval()
        pad, ours_cls = 1, Seq2Seq
    else:
        hf = T.T5ForConditionalGeneration(T.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                     num_heads=2, dropout_rate=0.0,
                                                     decoder_start_token_id=0)).eval()
        pad, ours_cls = 0, Seq2Seq
    hf.save_pretrained(tmp_path)
    ours = ours_cls.from_hf(tmp_path)
    ids, mask = padded_batch(50, 8, 3, False, pad, low=3)
    labels = torch.randint(3, 50, (2, 8 if family == "bert" else 5), generator=torch.Generator().manual_seed(1))
    labels[0, 2] = -100  # (a seq2seq decoder reads it as the pad token)
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, mask, labels=labels).loss.backward()
    emb = ours.encoder.tok_emb if family == "bert" else ours.tok_emb
    return emb.weight.grad, hf.get_input_embeddings().weight.grad, pad


@pytest.mark.parametrize("family", ["bert", "bart", "t5"])
def test_pad_row_gradient_matches_transformers(tmp_path, family):
    got, want, pad = _pad_grads(tmp_path, family)
    assert want[pad].abs().sum() > 0  # (tied heads: the projection's share still reaches the row)
    torch.testing.assert_close(got[pad], want[pad], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [lambda **kw: BERT(BERTConfig(vocab_size=V, d_model=D, n_layer=1, n_head=2, **kw)),
                                  lambda **kw: Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=D, n_layer=1, n_head=2,
                                                                     **kw))])
def test_embed_padding_idx_keeps_our_init_and_default(make):
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    padded = make(embed_padding_idx=True)
    emb = padded.encoder.tok_emb if isinstance(padded, BERT) else padded.tok_emb
    assert emb.padding_idx == padded.config.pad_token_id
    assert (plain.encoder.tok_emb if isinstance(plain, BERT) else plain.tok_emb).padding_idx is None  # our default
    for (k, a), b in zip(plain.state_dict().items(), padded.state_dict().values()):
        assert torch.equal(a, b), k  # the same init, pad row included
