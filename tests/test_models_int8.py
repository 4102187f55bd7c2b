"""INT8 inference on fastattn.models: fastattn.quantize (w8a8 with SmoothQuant calibration, w8a16) and
fastattn.convert(int8=...) on GPT, BERT and Seq2Seq; generation runs quantized; the quality loss is reported as the
perplexity delta of a small byte-level GPT trained here on real text (the first 50 kB of the embedded corpus) and
evaluated on held-out text, bounded loosely."""
import json
import re

import pytest
import torch

import fastattn
from fastattn.data import default_corpus
from fastattn.models import BERT, GPT, BERTConfig, GPTConfig, Seq2Seq, Seq2SeqConfig
from fastattn.nn import Int8Linear

CTX = 64


def _text_bytes():
    """Real English that no commit changes (this file trained on the README, so a README edit could fail it)."""
    text = default_corpus().encode()[:50_000]
    data = torch.tensor(list(text), dtype=torch.long)
    cut = int(len(data) * 0.85)
    return data[:cut], data[cut:]


def _batches(data, n, B, g):
    starts = torch.randint(0, len(data) - CTX - 1, (n, B), generator=g)
    return [torch.stack([data[s:s + CTX] for s in row]) for row in starts]


@torch.no_grad()
def _perplexity(model, data) -> float:
    windows = data[: (len(data) - 1) // CTX * CTX].view(-1, CTX)
    losses = [model(w[None], labels=w[None]).loss for w in windows]
    return torch.stack(losses).mean().exp().item()


@pytest.fixture(scope="module")
def trained_gpt():
    """A 2-layer byte-level GPT trained for a few seconds on real text: far from uniform (perplexity 256)."""
    torch.manual_seed(0)
    train, held = _text_bytes()
    m = GPT(GPTConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, d_ff=192, max_seq_len=CTX + 32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for batch in _batches(train, 120, 16, g):
        opt.zero_grad()
        m(batch, labels=batch).loss.backward()
        opt.step()
    return m.eval(), train, held


def _copy(model: GPT, **kw) -> GPT:
    q = GPT(GPTConfig.from_dict({**model.config.to_dict(), **kw})).eval()
    q.load_state_dict(model.state_dict())
    return q


@pytest.mark.parametrize("mode", ["w8a8", "w8a8-smoothquant", "w8a16"])
def test_perplexity_delta_reported_and_bounded(trained_gpt, mode, capsys):
    """Held-out perplexity, float vs int8 (the tied LM head quantized too)."""
    model, train, held = trained_gpt
    ref = _perplexity(model, held)
    calib = _batches(train, 4, 4, torch.Generator().manual_seed(1)) if mode == "w8a8-smoothquant" else None
    q = _copy(model)
    fastattn.quantize(q, calib_data=calib, mode=mode.split("-")[0])
    assert sum(isinstance(mod, Int8Linear) for mod in q.modules()) == 2 * 4 + 1  # 4 per block + the LM head
    ppl = _perplexity(q, held)
    with capsys.disabled():
        print(f"\n[int8 {mode}] held-out perplexity: float {ref:.3f}, int8 {ppl:.3f} ({(ppl / ref - 1) * 100:+.2f}%)")
    assert ref < 64  # the model learned something of the text (uniform bytes: 256; measured 20-28 here)
    assert abs(ppl / ref - 1) < 0.02  # loose: measured at about 0.02% here (a tiny model: few outliers)


def test_smoothquant_leaves_a_tied_embedding_alone(trained_gpt):
    """SmoothQuant scales a Linear's weight out of place: a tied LM head's token embedding keeps its values."""
    model, train, _ = trained_gpt
    q = _copy(model)
    assert q.lm_head.weight is q.tok_emb.weight
    fastattn.quantize(q, calib_data=_batches(train, 2, 4, torch.Generator().manual_seed(1)), mode="w8a8")
    assert torch.equal(q.tok_emb.weight, model.tok_emb.weight)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantized_generation(trained_gpt, mode):
    model, train, _ = trained_gpt
    q = _copy(model)
    fastattn.quantize(q, mode=mode)
    prompt = train[:16][None]
    ref, out = model.generate(prompt, 12, temperature=0), q.generate(prompt, 12, temperature=0)
    assert out.shape == (1, 28) and torch.equal(out[:, :16], prompt)
    assert (out[0, 16:] == ref[0, 16:]).float().mean() >= 0.5  # mostly the float model's greedy continuation


def test_quantize_and_convert_other_models():
    torch.manual_seed(0)
    small = dict(vocab_size=40, d_model=32, n_layer=1, n_head=4, d_ff=48, max_seq_len=32)
    ids = torch.randint(3, 40, (2, 7))
    bert = BERT(BERTConfig(**small, tie_embeddings=False)).eval()
    ref = bert(ids).logits
    fastattn.quantize(bert, calib_data=[ids], mode="w8a8")
    out = bert(ids).logits
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    s2s = Seq2Seq(Seq2SeqConfig(**small)).eval()
    ref = s2s.generate(ids, 5, temperature=0)
    fastattn.convert(s2s, int8="w8a16")
    assert sum(isinstance(mod, Int8Linear) for mod in s2s.modules()) > 0
    assert s2s.generate(ids, 5, temperature=0).shape == ref.shape


@pytest.mark.parametrize("mode", ["w8a8-smoothquant", "w8a8_static", "w8a16"])
def test_quantized_save_and_load(trained_gpt, mode, tmp_path):
    """save_pretrained of a quantized model stores its int8 weights and layout; from_pretrained gives the same
    model back (same logits and generation), and a float save over the folder drops the layout."""
    model, train, held = trained_gpt
    q = _copy(model)
    calib = _batches(train, 2, 4, torch.Generator().manual_seed(1)) if mode != "w8a16" else None
    fastattn.quantize(q, calib_data=calib, mode=mode.split("-")[0])
    q.save_pretrained(tmp_path)
    layout = fastattn.int8_layout(q)
    assert json.loads((tmp_path / "quantization.json").read_text()) == layout and len(layout) == 9
    assert (tmp_path / "model.safetensors").stat().st_size < 0.5 * sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    back = GPT.from_pretrained(tmp_path).eval()
    assert fastattn.int8_layout(back) == layout
    for a, b in zip(q.state_dict().items(), back.state_dict().items()):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and torch.equal(a[1], b[1])
    x = held[:CTX][None]
    with torch.no_grad():
        assert torch.equal(q(x).logits, back(x).logits)
    assert torch.equal(q.generate(x[:, :16], 8, temperature=0), back.generate(x[:, :16], 8, temperature=0))
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "quantization.json").exists()
    assert fastattn.int8_layout(GPT.from_pretrained(tmp_path)) == {}


def test_int8_layout_bad_input(trained_gpt):
    model, _, _ = trained_gpt
    spec = {"mode": "w8a16", "in_features": 64, "out_features": 256, "bias": False, "smooth": False}
    cases = [({"nope": spec}, "'nope' is not an nn.Linear of this model (no such module)"),
             ({"blocks.0": spec}, "'blocks.0' is not an nn.Linear of this model (a Block)"),
             ({"lm_head": {**spec, "in_features": 32}}, "32 -> 256 features, the model's Linear 64 -> 256"),
             ({"lm_head": {**spec, "mode": "int4"}}, "mode 'int4' is not one of"),
             ({"lm_head": {**spec, "bias": "no"}}, "layout['lm_head']: expected {mode, in_features"),
             ({"lm_head": {**spec, "in_features": True}}, "layout['lm_head']: expected")]
    for layout, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            fastattn.apply_int8_layout(_copy(model), layout)
    with pytest.raises(TypeError, match="layout: expected a dict"):
        fastattn.apply_int8_layout(_copy(model), [spec])
    q = fastattn.apply_int8_layout(_copy(model), {"lm_head": spec})
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.mode == "w8a16" and q.lm_head.bias is None


def test_cast_after_loading_is_loading_in_the_dtype(trained_gpt, tmp_path):
    """GPT.from_pretrained(int8 folder).to(bfloat16) is the model from_pretrained(..., dtype=bfloat16) gives: the
    Int8Linear scales, smooth and bias stay float32 either way (the cast rounded them to bf16)."""
    model, train, held = trained_gpt
    q = _copy(model)
    fastattn.quantize(q, calib_data=_batches(train, 2, 4, torch.Generator().manual_seed(1)), mode="w8a8_static")
    q.save_pretrained(tmp_path)
    a = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    b = GPT.from_pretrained(tmp_path).to(torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert b.lm_head.weight_scale.dtype == torch.float32 and b.lm_head.weight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(a(held[:CTX][None]).logits, b(held[:CTX][None]).logits)
