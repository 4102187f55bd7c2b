"""torch.export (the deployment path torch recommends over TorchScript): the drop-in modules and the models export,
with dynamic batch and sequence sizes, and the exported program computes what eager does at other sizes."""
import pytest
import torch
from torch.export import Dim, export

import fastattn.nn as fnn
from fastattn.models import BERT, GPT, BERTConfig, GPTConfig, Seq2Seq, Seq2SeqConfig

E, H, V = 16, 4, 50


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = fnn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def _x(B, L):
    return torch.randn(B, L, E)


def _ids(B, L):
    return torch.randint(0, V, (B, L))


def _pad(B, L):
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, -2:] = True
    return pad


# name -> (module, inputs at (B, L), which inputs have the (batch, seq) dims)
CASES = {
    "mha": (SelfAttention, lambda B, L: (_x(B, L), _pad(B, L)), (True, True)),
    "encoder-layer": (lambda: fnn.TransformerEncoderLayer(E, H, 32, batch_first=True), lambda B, L: (_x(B, L),),
                      (True,)),
    "transformer": (lambda: fnn.Transformer(E, H, 1, 1, 32, batch_first=True), lambda B, L: (_x(B, L), _x(B, L)),
                    (True, True)),
    "layernorm": (lambda: fnn.LayerNorm(E), lambda B, L: (_x(B, L),), (True,)),
    "gpt": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, max_seq_len=32)),
            lambda B, L: (_ids(B, L),), (True,)),
    "gpt-rope-gqa": (lambda: GPT(GPTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, n_kv_head=2, pos="rotary",
                                           max_seq_len=32)), lambda B, L: (_ids(B, L),), (True,)),
    "bert": (lambda: BERT(BERTConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, max_seq_len=32)),
             lambda B, L: (_ids(B, L),), (True,)),
    "seq2seq": (lambda: Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=E, n_layer=1, n_head=H, max_seq_len=32)),
                lambda B, L: (_ids(B, L), None, _ids(B, L)), (True, False, True)),  # (source, mask, decoder inputs)
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", list(CASES))
def test_export_with_dynamic_batch_and_sequence(case):
    make, inputs, dynamic = CASES[case]
    torch.manual_seed(0)
    m = make().eval()
    b, s = Dim("b", min=1, max=16), Dim("s", min=3, max=32)
    shapes = tuple({0: b, 1: s} if d else None for d in dynamic)
    program = export(m, inputs(2, 5), dynamic_shapes=shapes)
    for B, L in ((2, 5), (3, 17), (1, 32)):  # past the decode route's 16 queries: one program for every size
        args = inputs(B, L)
        torch.testing.assert_close(_logits(program.module()(*args)), _logits(m(*args)), rtol=1e-5, atol=1e-5)


def test_export_int8_linear():
    torch.manual_seed(0)
    q = fnn.Int8Linear.from_float(torch.nn.Linear(E, 8), "w8a16")
    x = _x(2, 5)
    assert torch.equal(export(q, (x,)).module()(x), q(x))
