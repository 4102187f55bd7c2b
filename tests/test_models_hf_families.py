"""GPT.from_hf on more decoder families: GPT-BigCode (SantaCoder / StarCoder: GPT-2's block with multi-query
attention), Granite (Llama with multipliers on the embeddings, scores, sublayer outputs and logits; GraniteMoE in
test_models_moe.py), OLMo 1 / 2 / 3, Cohere 1 / 2 and SmolLM3 (Cohere 2's and SmolLM3's layers without rotary
positions). Small random models (norm weights and biases drawn away from their 1 / 0 init so every sublayer moves
the greedy tokens) saved to tmp_path: logits of a left-padded batch bounded by transformers' own fp32 error against
its float64 run, greedy tokens through the bound decode step equal to transformers' generate, both backends training
alike; what GPT cannot reproduce is refused naming the key."""
import pytest
import torch

from conftest import backends_train_alike, matches_hf_causal_lm, padded_batch
from fastattn.models import GPT, GPTConfig, CheckpointError
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


def _olmo(version, **kw):  # OLMo: parameter-free LayerNorms; OLMo 2 / 3: norms on the sublayers' outputs only,
    # q / k norms over all heads; OLMo 3: sliding windows on 3 layers of 4
    cls = {1: "Olmo", 2: "Olmo2", 3: "Olmo3"}[version]
    return getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4 if version == 3 else 2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, initializer_range=0.3), **kw}))


def _cohere(version=1, **kw):  # bias-free LayerNorms, attention and MLP in parallel, interleaved rotary pairs,
    # logit_scale; Cohere 2: 3 sliding-window layers (rotary) to 1 global layer (no positions)
    cls = "Cohere" if version == 1 else "Cohere2"
    return getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2 if version == 1 else 4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, initializer_range=0.3, logit_scale=0.25), **kw}))


def _smollm3(**kw):  # Llama with no rotary positions on every 4th layer
    return transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.3), **kw}))


# name: (make, kwargs, {GPTConfig field: expected value})
MODELS = {"starcoder": (_bigcode, {}, dict(n_kv_head=1, activation="gelu_tanh")),  # multi-query
          "bigcode-mha": (_bigcode, dict(multi_query=False, activation_function="gelu"),
                          dict(n_kv_head=4, activation="gelu")),
          "granite": (_granite, dict(tie_word_embeddings=True),
                      dict(embed_scale=3.0, attn_scale=0.2, tie_embeddings=True)),
          "granite-untied-bias": (_granite, dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
                                  dict(bias=True, tie_embeddings=False)),
          "olmo": (lambda **kw: _olmo(1, **kw), {}, dict(norm="layernorm", norm_bias=False, qk_norm=False)),
          "olmo2": (lambda **kw: _olmo(2, **kw), {}, dict(qk_norm_full=True, sandwich_norm=True, input_norm=False)),
          "olmo3": (lambda **kw: _olmo(3, sliding_window=5, **kw), {},
                    dict(qk_norm_full=True, input_norm=False, sliding_window=5,
                         layer_types=["sliding_attention"] * 3 + ["full_attention"])),
          "cohere": (_cohere, {}, dict(parallel_block="one_norm", norm="layernorm", norm_bias=False,
                                       tie_embeddings=True)),
          "cohere2": (lambda **kw: _cohere(2, sliding_window=5, **kw), {},
                      dict(nope_layers=[3], sliding_window=5, parallel_block="one_norm")),
          "smollm3": (_smollm3, {}, dict(nope_layers=[3], sliding_window=None)),
          "smollm3-window": (_smollm3, dict(use_sliding_window=True, sliding_window=5, no_rope_layers=[1, 0, 1, 0]),
                             dict(nope_layers=[1, 3], sliding_window=5,
                                  layer_types=["full_attention", "sliding_attention"] * 2))}


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


@pytest.mark.parametrize("arch", ["starcoder", "granite", "olmo2", "cohere", "cohere2", "smollm3"])
def test_backends_train_alike(tmp_path, arch):
    make, kw, _ = MODELS[arch]
    _saved(tmp_path, make, kw)
    ids, mask = padded_batch(VOCAB, 12, 4, left=True, pad_id=0, low=1)
    backends_train_alike(lambda backend: GPT.from_hf(tmp_path, backend=backend, dropout=0.0),
                         dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))


@pytest.mark.parametrize("make, kw, key", [(_bigcode, dict(scale_attn_weights=False), "scale_attn_weights"),
                                           (_bigcode, dict(activation_function="silu"), "activation_function"),
                                           (lambda **kw: _olmo(1, **kw), dict(clip_qkv=8.0), "clip_qkv"),
                                           (_cohere, dict(use_qk_norm=True), "use_qk_norm"),
                                           (_cohere, dict(attention_bias=True), "attention_bias")])
def test_refused(tmp_path, make, kw, key):
    make(**kw).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=key):
        GPT.from_hf(tmp_path)


@pytest.mark.parametrize("kw, field", [(dict(input_norm=False), "input_norm"),  # needs sandwich_norm
                                       (dict(input_norm=0, sandwich_norm=True), "input_norm"),
                                       (dict(qk_norm_full=True), "qk_norm_full"),  # needs qk_norm
                                       (dict(pos="rotary", nope_layers=[1]), "nope_layers"),  # n_layer 1
                                       (dict(pos="learned", nope_layers=[0]), "nope_layers")])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, **kw)
