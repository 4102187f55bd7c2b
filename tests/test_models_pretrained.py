"""save_pretrained / from_pretrained and generate's length limit on tiny models (CPU): tied weights that disagree in
the file are refused, the stored dtype comes back (int8 checkpoints too), errors name the path, and generate fills
config.max_seq_len exactly (the last new token is never fed back, as in transformers) on every decoding path."""
import json

import pytest
import torch

import fastattn
from fastattn.models import GPT, CheckpointError, GPTConfig, Seq2Seq, Seq2SeqConfig

SMALL = dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, d_ff=48)


def _gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, "max_seq_len": 16, **kw})).eval()


def _longer(m, max_seq_len=64):
    """m's weights in a model of a longer context (its learned position table's first rows are m's)."""
    big = type(m)(type(m.config).from_dict({**m.config.to_dict(), "max_seq_len": max_seq_len})).to(
        next(m.parameters()).dtype).eval()
    sd = m.state_dict()
    with torch.no_grad():
        for k, t in big.state_dict().items():
            t[:sd[k].shape[0]].copy_(sd[k])
    return big


def _ids(B, L, seed):
    return torch.randint(3, 61, (B, L), generator=torch.Generator().manual_seed(seed))


# ---- tied weights ---------------------------------------------------------------------------------------------
def test_tying_an_untied_checkpoint_is_refused(tmp_path):
    """Both names of a tied pair in the file with different values: an error naming both (transformers warns and
    leaves them untied), not the embedding silently replaced by the head; equal values load tied."""
    m = _gpt(tie_embeddings=False)
    m.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"tok_emb\.weight and lm_head\.weight"):
        GPT.from_pretrained(tmp_path, tie_embeddings=True)
    with torch.no_grad():
        m.lm_head.weight.copy_(m.tok_emb.weight)
    m.save_pretrained(tmp_path)
    tied = GPT.from_pretrained(tmp_path, tie_embeddings=True)
    assert tied.lm_head.weight is tied.tok_emb.weight and torch.equal(tied.tok_emb.weight, m.tok_emb.weight)


# ---- dtype ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_from_pretrained_keeps_the_stored_dtype(tmp_path, dtype):
    m = _gpt().to(dtype)
    m.save_pretrained(tmp_path)
    back = GPT.from_pretrained(tmp_path)
    for (ka, a), (kb, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert ka == kb and b.dtype == dtype and torch.equal(a, b)
    as_float = GPT.from_pretrained(tmp_path, dtype=torch.float32)  # an explicit dtype still wins
    assert {t.dtype for t in as_float.state_dict().values()} == {torch.float32}


def test_int8_checkpoint_of_a_bfloat16_model_comes_back_the_same(tmp_path):
    """The int8 layers' float32 scales do not decide the dtype: the rest comes back bfloat16, every tensor as
    saved."""
    q = _gpt().to(torch.bfloat16)
    fastattn.quantize(q, mode="w8a16")
    q.save_pretrained(tmp_path)
    back = GPT.from_pretrained(tmp_path)
    assert fastattn.int8_layout(back) == fastattn.int8_layout(q) != {}
    for (ka, a), (kb, b) in zip(q.state_dict().items(), back.state_dict().items()):
        assert ka == kb and a.dtype == b.dtype and torch.equal(a, b)
    assert back.tok_emb.weight.dtype == torch.bfloat16
    x = _ids(1, 8, 1)
    assert torch.equal(q.generate(x, 4, temperature=0), back.generate(x, 4, temperature=0))


# ---- errors ---------------------------------------------------------------------------------------------------
def test_from_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such folder"):
        GPT.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        GPT.from_pretrained(tmp_path / "empty")
    _gpt().save_pretrained(tmp_path)
    cfg = tmp_path / "config.json"
    good = cfg.read_text()
    for text, words in [("{bad", "config.json: not readable JSON"), ("[1, 2]", "config.json: expected a JSON object"),
                        (json.dumps({**json.loads(good), "d_modle": 8}), "config.json: .*unknown key 'd_modle'")]:
        cfg.write_text(text)
        with pytest.raises(CheckpointError, match=words):
            GPT.from_pretrained(tmp_path)
    cfg.write_text(good)
    (tmp_path / "quantization.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="quantization.json: not readable JSON"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "quantization.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        GPT.from_pretrained(tmp_path)


# ---- generate up to max_seq_len -------------------------------------------------------------------------------
def _paths(m):
    """generate's decoding paths: greedy, sampling, beam search, prompt lookup, another model's drafts (its context
    longer than m's: an assistant's cache still takes prompt + max_new_tokens, models/speculative.py)."""
    torch.manual_seed(1)
    assistant = _longer(type(m)(m.config).to(next(m.parameters()).dtype))
    return {"greedy": dict(temperature=0), "sampling": dict(top_k=8), "beams": dict(temperature=0, num_beams=3,
                                                                                   num_return_sequences=2),
            "lookup": dict(temperature=0, prompt_lookup_num_tokens=3),
            "assistant": dict(top_p=0.9, assistant_model=assistant, num_assistant_tokens=3)}


def _generate(m, x, n, kw):
    """m.generate, a sampling one seeded alike for every model."""
    seeded = {} if kw.get("temperature") == 0 else {"generator": torch.Generator().manual_seed(5)}
    return m.generate(x, n, **kw, **seeded)


@pytest.mark.parametrize("L, n", [(15, 2), (10, 7), (16, 1)])
def test_gpt_generate_fills_max_seq_len(L, n):
    """A prompt of L tokens and n new ones take L + n - 1 <= max_seq_len positions: the same tokens as the same
    weights with a longer context, on every path (learned positions: a position past the table would fail)."""
    m = _gpt().double()
    big = _longer(m)
    x = _ids(2, L, L)
    for name, kw in _paths(m).items():
        assert torch.equal(_generate(m, x, n, kw), _generate(big, x, n, kw)), name
    seen = []
    m.generate(x, n, temperature=0, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), big.generate(x, n, temperature=0)[:, L:])


def test_gpt_generate_too_long_names_its_arguments():
    with pytest.raises(ValueError, match=r"max_new_tokens: a prompt of 16 tokens \(input_ids\) and 2 new tokens take "
                                         r"17 positions .* config\.max_seq_len 16"):
        _gpt().generate(_ids(1, 16, 0), 2, temperature=0)


def test_seq2seq_generate_fills_max_seq_len():
    """The start token and max_seq_len new tokens: max_seq_len decoder positions, the same tokens as a longer
    context gives."""
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(**SMALL, max_seq_len=8)).double().eval()
    big = _longer(m)
    src = _ids(1, 6, 2)
    for name, kw in _paths(m).items():
        assert torch.equal(_generate(m, src, 8, kw), _generate(big, src, 8, kw)), name
    with pytest.raises(ValueError, match=r"max_new_tokens: the decoder start token and 9 new tokens take 9 "
                                         r"positions .* config\.max_seq_len 8"):
        m.generate(src, 9, temperature=0)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "relu2"])
def test_models_pickle_with_every_activation(activation):
    """torch.save(model) / pickle of a model with each activation (gelu_tanh, every GPT-2 import, and relu2 were
    lambdas stored on the MLP: "Can't pickle local object"), BERT's MLM head too; the copy computes the same."""
    import io
    from fastattn.models import BERT, BERTConfig
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    for model in (GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=1, n_head=4, max_seq_len=32, activation=activation)),
                  BERT(BERTConfig(vocab_size=50, d_model=32, n_layer=1, n_head=4, max_seq_len=32,
                                  activation=activation))):
        buf = io.BytesIO()
        torch.save(model.eval(), buf)
        buf.seek(0)
        copy = torch.load(buf, weights_only=False)
        with torch.no_grad():
            torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=0, atol=0)
