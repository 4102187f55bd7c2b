"""The meta device (shapes, no data), where torch's own modules run: shape inference, memory and FLOP estimates of a
model built under ``torch.device("meta")``. fastattn's ops run there on their reference backend; every module and
model gives the outputs and gradients of its CPU run, in shape and dtype."""
import pytest
import torch

import fastattn
import fastattn.nn as fnn
from fastattn.models import BERT, GPT, BERTConfig, GPTConfig, Seq2Seq, Seq2SeqConfig

E, H, V = 16, 4, 50


def _x(dev, L=5):
    return torch.randn(2, L, E, device=dev)


def _pad(dev):
    return torch.tensor([[False] * 5, [False, False, False, True, True]], device=dev)


def _ids(dev, L=5):
    return torch.zeros(2, L, dtype=torch.long, device=dev)


CASES = {  # name -> (build (under torch.device), call(module, device) -> tensor or tuple)
    "mha": (lambda: fnn.MultiheadAttention(E, H, dropout=0.1, batch_first=True),
            lambda m, d: m(_x(d), _x(d), _x(d), key_padding_mask=_pad(d))),
    "mha-weights-kdim": (lambda: fnn.MultiheadAttention(E, H, kdim=8, vdim=12, add_bias_kv=True, batch_first=True),
                         lambda m, d: m(_x(d), torch.randn(2, 7, 8, device=d), torch.randn(2, 7, 12, device=d),
                                        average_attn_weights=False)),
    "encoder-layer": (lambda: fnn.TransformerEncoderLayer(E, H, 32, batch_first=True, norm_first=True),
                      lambda m, d: m(_x(d), src_key_padding_mask=_pad(d))),
    "transformer": (lambda: fnn.Transformer(E, H, 1, 1, 32, batch_first=True),
                    lambda m, d: m(_x(d), _x(d), tgt_mask=fnn.Transformer.generate_square_subsequent_mask(5, device=d),
                                   tgt_is_causal=True)),
    "gpt": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H)),
            lambda m, d: m(_ids(d), labels=_ids(d)).loss),
    "gpt-rope-gqa": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, n_kv_head=2, pos="rotary",
                                           norm="rmsnorm", mlp="swiglu")),
                     lambda m, d: m(_ids(d)).logits),
    "bert": (lambda: BERT(BERTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H)), lambda m, d: m(_ids(d)).logits),
    "seq2seq": (lambda: Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H)),
                lambda m, d: m(_ids(d), decoder_input_ids=_ids(d, 3)).logits),
    # with an attention_mask (its "anything padded?" test has no data to read on meta)
    "gpt-mask": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H)),
                 lambda m, d: m(_ids(d), attention_mask=(~_pad(d)).long(), labels=_ids(d)).loss),
    "bert-mask": (lambda: BERT(BERTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H)),
                  lambda m, d: m(_ids(d), attention_mask=(~_pad(d)).long()).logits),
    "seq2seq-mask": (lambda: Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H)),
                     lambda m, d: m(_ids(d), attention_mask=(~_pad(d)).long(), decoder_input_ids=_ids(d, 3)).logits),
}


def _run(case, dev, train):
    torch.manual_seed(0)
    build, call = CASES[case]
    with torch.device(dev):
        m = build().train(train)
    out = call(m, dev)
    outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    if train:
        sum(t.sum() for t in outs).backward()
        outs += [p.grad for p in m.parameters() if p.grad is not None]  # (heads the call does not use: None)
    return [(tuple(t.shape), t.dtype, t.device.type) for t in outs]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_modules_and_models_run_on_meta(case, train):
    cpu, meta = _run(case, "cpu", train), _run(case, "meta", train)
    assert [s[:2] for s in meta] == [s[:2] for s in cpu]
    assert all(s[2] == "meta" for s in meta)


def test_ops_run_on_meta():
    m = "meta"
    q = torch.randn(1, 2, 5, 8, device=m, requires_grad=True)
    out = fastattn.attention(q, q, q, causal="top_left", dropout_p=0.1)
    out.sum().backward()
    assert out.shape == q.grad.shape == q.shape and q.grad.device.type == m
    assert fastattn.decode_attention(q.detach()[:, :, :1], q.detach(), q.detach()).shape == (1, 2, 1, 8)
    x = torch.randn(3, 8, device=m)
    assert fastattn.add_layer_norm(x, x, torch.ones(8, device=m), torch.zeros(8, device=m)).shape == (3, 8)
    loss = fastattn.linear_cross_entropy(x, torch.randn(V, 8, device=m), torch.zeros(3, dtype=torch.long, device=m))
    assert loss.shape == () and loss.device.type == m
    (a, sa), (w, sw) = fastattn.quantize_per_token(x), fastattn.quantize_per_channel(torch.randn(4, 8, device=m))
    assert fastattn.int8_matmul(a, w, sa, sw).shape == (3, 4) and fastattn.w8a16_matmul(x, w, sw).shape == (3, 4)
