"""GPT.from_hf on more decoder families: GPT-BigCode (SantaCoder / StarCoder: GPT-2's block with multi-query
attention), Granite (Llama with multipliers on the embeddings, scores, sublayer outputs and logits; GraniteMoE in
test_models_moe.py). Small random models (norm weights and biases drawn away from their 1 / 0 init so every sublayer
moves the greedy tokens) saved to tmp_path: logits of a left-padded batch bounded by transformers' own fp32 error
against its float64 run, greedy tokens through the bound decode step equal to transformers' generate, both backends
training alike; what GPT cannot reproduce is refused naming the key."""
import pytest
import torch

from conftest import backends_train_alike, matches_hf_causal_lm, padded_batch
from fastattn.models import GPT, CheckpointError
transformers = pytest.importorskip("transformers")

VOCAB = 71


def _bigcode(**kw):
    return transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(**{**dict(
        vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw}))


def _granite(**kw):  # its four multipliers (the scale of the embeddings, scores, sublayer outputs and logits)
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.3, embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
        logits_scaling=4.0), **kw}))


# name: (make, kwargs, {GPTConfig field: expected value})
MODELS = {"starcoder": (_bigcode, {}, dict(n_kv_head=1, activation="gelu_tanh")),  # multi-query
          "bigcode-mha": (_bigcode, dict(multi_query=False, activation_function="gelu"),
                          dict(n_kv_head=4, activation="gelu")),
          "granite": (_granite, dict(tie_word_embeddings=True),
                      dict(embed_scale=3.0, attn_scale=0.2, tie_embeddings=True)),
          "granite-untied-bias": (_granite, dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
                                  dict(bias=True, tie_embeddings=False))}


def _saved(tmp_path, make, kw):
    torch.manual_seed(0)
    hf = make(**kw).eval()
    with torch.no_grad():  # biases and norm weights start at 0 / 1 in transformers' init: make them matter
        for name, p in hf.named_parameters():
            if name.endswith(".bias") or p.dim() == 1:
                p.uniform_(-0.5, 0.5).add_(0.0 if name.endswith(".bias") else 1.0)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("arch", list(MODELS))
def test_matches_transformers(tmp_path, arch, caplog):
    make, kw, fields = MODELS[arch]
    ours = matches_hf_causal_lm(tmp_path, _saved(tmp_path, make, kw), VOCAB, caplog)
    assert {k: getattr(ours.config, k) for k in fields} == fields


@pytest.mark.parametrize("arch", ["starcoder", "granite"])
def test_backends_train_alike(tmp_path, arch):
    make, kw, _ = MODELS[arch]
    _saved(tmp_path, make, kw)
    ids, mask = padded_batch(VOCAB, 12, 4, left=True, pad_id=0, low=1)
    backends_train_alike(lambda backend: GPT.from_hf(tmp_path, backend=backend, dropout=0.0),
                         dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))


@pytest.mark.parametrize("make, kw, key", [(_bigcode, dict(scale_attn_weights=False), "scale_attn_weights"),
                                           (_bigcode, dict(activation_function="silu"), "activation_function")])
def test_refused(tmp_path, make, kw, key):
    make(**kw).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=key):
        GPT.from_hf(tmp_path)
