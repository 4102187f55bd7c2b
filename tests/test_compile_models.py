"""torch.compile(fullgraph=True) of whole models and drop-in modules, training and inference: no graph break, and
the same loss and gradients as eager (aot_eager runs the same kernels, so the match is exact up to op order; two
models also under inductor, torch.compile's default backend).

They failed before: every model's padding test was a data-dependent branch, the torch.func check in the drop-ins
an untraceable call, the attention backward's fake promised q's layout where the kernels return contiguous
gradients (a view failed at run time), and a post-norm add+norm got a zero gradient for its non-differentiable
stored sum (the kernel refused its shape)."""
import copy

import pytest
import torch

import fastattn
from conftest import grads_equal
from fastattn.models import BERT, GPT, BERTConfig, GPTConfig, Seq2Seq, Seq2SeqConfig

V, D, L = 97, 32, 12
SMALL = dict(vocab_size=V, d_model=D, n_layer=2, n_head=4, max_seq_len=64)


def _ids_mask():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


def _models():
    ids, _ = _ids_mask()
    return {
        "gpt": (lambda: GPT(GPTConfig(**SMALL)), dict(labels=ids)),
        "llama": (lambda: GPT(GPTConfig(**SMALL, n_kv_head=2, pos="rotary", norm="rmsnorm", mlp="swiglu")),
                  dict(labels=ids)),
        "bert": (lambda: BERT(BERTConfig(**SMALL)), dict(labels=ids)),  # post-norm
        "seq2seq": (lambda: Seq2Seq(Seq2SeqConfig(**SMALL)), dict(decoder_input_ids=ids[:, :5], labels=ids[:, :5])),
    }


def _compiled(module, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(module, backend=backend, fullgraph=True)


# aot_eager runs the kernels eager runs: equal up to op order. Inductor (the default backend: C++ for the ops around
# ours on the CPU) fuses and reorders the float32 math around them: torch's own compile error (measured: the loss
# equal, gradients within 3e-7 of their largest element).
TRAIN_CASES = [(n, "aot_eager") for n in _models()] + [("llama", "inductor"), ("bert", "inductor")]


@pytest.mark.parametrize("name, backend", TRAIN_CASES)
def test_model_training_step(name, backend):
    make, kw = _models()[name]
    torch.manual_seed(0)
    eager = make().train()
    comp = copy.deepcopy(eager)
    ids, mask = _ids_mask()
    want = eager(ids, attention_mask=mask, **kw).loss
    want.backward()
    got = _compiled(comp, backend)(ids, attention_mask=mask, **kw).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads_equal(eager, comp, rtol=1e-6 if backend == "aot_eager" else 1e-5)


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("masked", [False, True])
def test_model_inference(name, masked):
    make, kw = _models()[name]
    kw = {k: v for k, v in kw.items() if k != "labels"}
    torch.manual_seed(0)
    model = make().eval()
    ids, mask = _ids_mask()
    mask = mask if masked else None
    with torch.no_grad():
        want = model(ids, attention_mask=mask, **kw).logits
        got = _compiled(model, "eager")(ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _modules(norm_first):
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, 9:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    nn = fastattn.nn
    kw = dict(dropout=0.0, batch_first=True, norm_first=norm_first)
    return {
        "mha": (lambda: nn.MultiheadAttention(D, 4, batch_first=True), (x, x, x),
                dict(key_padding_mask=pad, need_weights=False)),
        "encoder_layer": (lambda: nn.TransformerEncoderLayer(D, 4, 64, **kw), (x,), dict(src_key_padding_mask=pad)),
        "decoder_layer": (lambda: nn.TransformerDecoderLayer(D, 4, 64, **kw), (x, x),
                          dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)),
        "transformer": (lambda: nn.Transformer(D, 4, 2, 2, 64, **kw), (x, x[:, :7]), dict(src_key_padding_mask=pad)),
    }


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("name", ["mha", "encoder_layer", "decoder_layer", "transformer"])
def test_module_training_step(name, norm_first):
    make, args, kw = _modules(norm_first)[name]
    torch.manual_seed(0)
    eager = make().train()
    comp = copy.deepcopy(eager)

    def loss(module):
        out = module(*args, **kw)
        return (out[0] if isinstance(out, tuple) else out).square().sum()

    want = loss(eager)
    want.backward()
    got = loss(_compiled(comp))
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    grads_equal(eager, comp)

