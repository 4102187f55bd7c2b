"""GPT.from_hf on more decoder families: GPT-BigCode (SantaCoder / StarCoder: GPT-2's block with multi-query
attention), Granite (Llama with multipliers on the embeddings, scores, sublayer outputs and logits; GraniteMoE in
test_models_moe.py), OLMo 1 / 2 / 3, Cohere 1 / 2 and SmolLM3 (Cohere 2's and SmolLM3's layers without rotary
positions). Small random models (norm weights and biases drawn away from their 1 / 0 init so every sublayer moves
the greedy tokens) saved to tmp_path: logits of a left-padded batch bounded by transformers' own fp32 error against
its float64 run, greedy tokens through the bound decode step equal to transformers' generate, both backends training
alike; what GPT cannot reproduce is refused naming the key."""
import json

import pytest
import torch

from conftest import assert_bounded, backends_train_alike, matches_hf_causal_lm, padded_batch
from fastattn.models import GPT, GPTConfig, CheckpointError
transformers = pytest.importorskip("transformers")

VOCAB = 71


def _bigcode(**kw):
    return transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(**{**dict(
        vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw}))


def _hf(cls: str, n_layer=2, **kw):
    """transformers' {cls}ForCausalLM on a small Llama-shaped {cls}Config (4 layers where a pattern repeats every 4)."""
    return getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layer, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.3), **kw}))


def _family(cls: str, n_layer=2, **fixed):
    return lambda **kw: _hf(cls, n_layer, **{**fixed, **kw})


# Granite's four multipliers scale the embeddings, scores, sublayer outputs and logits
GRANITE = dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0)
FOUR = ["sliding_attention"] * 3 + ["full_attention"]
LLAMA_LONGROPE = dict(original_max_position_embeddings=16, short_factor=[1.0, 1.2, 1.5, 2.0],
                      long_factor=[2.0, 4.0, 8.0, 16.0])
# name: (make, kwargs, {GPTConfig field: expected value})
MODELS = {"starcoder": (_bigcode, {}, dict(n_kv_head=1, activation="gelu_tanh")),  # multi-query
          "bigcode-mha": (_bigcode, dict(multi_query=False, activation_function="gelu"),
                          dict(n_kv_head=4, activation="gelu")),
          "granite": (_family("Granite", **GRANITE), dict(tie_word_embeddings=True),
                      dict(embed_scale=3.0, attn_scale=0.2, tie_embeddings=True)),
          "granite-untied-bias": (_family("Granite", **GRANITE), dict(attention_bias=True, mlp_bias=True),
                                  dict(bias=True, tie_embeddings=False)),
          # OLMo: parameter-free LayerNorms; OLMo 2 / 3: norms on the sublayers' outputs only, q / k norms over all
          # heads; OLMo 3: sliding windows on 3 layers of 4
          "olmo": (_family("Olmo"), {}, dict(norm="layernorm", norm_bias=False, qk_norm=False)),
          "olmo2": (_family("Olmo2"), {}, dict(qk_norm_full=True, sandwich_norm=True, input_norm=False)),
          "olmo3": (_family("Olmo3", 4, sliding_window=5), {},
                    dict(qk_norm_full=True, input_norm=False, sliding_window=5, layer_types=FOUR)),
          # Cohere: bias-free LayerNorms, attention and MLP in parallel, interleaved rotary pairs, logit_scale;
          # Cohere 2: 3 sliding-window layers (rotary) to 1 global layer (no positions)
          "cohere": (_family("Cohere", logit_scale=0.25), {},
                     dict(parallel_block="one_norm", norm="layernorm", norm_bias=False, tie_embeddings=True)),
          "cohere2": (_family("Cohere2", 4, logit_scale=0.25, sliding_window=5), {},
                      dict(nope_layers=[3], sliding_window=5, parallel_block="one_norm")),
          # SmolLM3: no rotary positions on every 4th layer (or as no_rope_layers says)
          "smollm3": (_family("SmolLM3", 4), {}, dict(nope_layers=[3], sliding_window=None)),
          "smollm3-window": (_family("SmolLM3", 4), dict(use_sliding_window=True, sliding_window=5,
                                                         no_rope_layers=[1, 0, 1, 0]),
                             dict(nope_layers=[1, 3], sliding_window=5,
                                  layer_types=["full_attention", "sliding_attention"] * 2)),
          # EXAONE 4: OLMo 2's output norms with per-head q / k norms; with a window, global layers without positions
          "exaone4": (_family("Exaone4", 4, sliding_window=5), {},
                      dict(qk_norm=True, qk_norm_full=False, input_norm=False, nope_layers=[3], layer_types=FOUR)),
          "exaone4-global": (_family("Exaone4", sliding_window=None, layer_types=["full_attention"] * 2), {},
                             dict(nope_layers=None, sliding_window=None)),
          # StarCoder2: LayerNorms and Linears with biases, an ungated GELU MLP, a window on every layer
          "starcoder2": (_family("Starcoder2", sliding_window=5), {},
                         dict(mlp="gelu", norm="layernorm", norm_bias=True, bias=True, sliding_window=5)),
          # Helium, ERNIE 4.5: rotary pairs interleaved; GLM / GLM-4: on half of each head, q / k / v biases, fused
          # gate_up_proj (GLM-4 with sandwich norms); Seed-OSS: q / k / v biases without o_proj's
          "helium": (_family("Helium", attention_bias=True, head_dim=8), {}, dict(qkv_bias=True, bias=False)),
          "ernie4_5": (_family("Ernie4_5", use_bias=True), {}, dict(bias=True, tie_embeddings=True)),
          "glm": (_family("Glm", head_dim=8), {}, dict(rotary_dim=4, qkv_bias=True, bias=False)),
          "glm4": (_family("Glm4", head_dim=8), {}, dict(rotary_dim=4, sandwich_norm=True, input_norm=True)),
          "seed_oss": (_family("SeedOss"), {}, dict(qkv_bias=True, bias=False)),
          # Nemotron: LayerNorm1P (1 + weight, with bias), an ungated relu2 MLP, rotary on half of each head;
          # Arcee: Llama with the ungated relu2 MLP; Ministral: Mistral with its windows per layer_types
          "nemotron": (_family("Nemotron", head_dim=8, norm_eps=1e-3), {},
                       dict(activation="relu2", mlp="gelu", rotary_dim=4, norm="layernorm", norm_bias=True,
                            norm_eps=1e-3)),
          "arcee": (_family("Arcee", mlp_bias=True, attention_bias=True), {}, dict(activation="relu2", bias=True)),
          "ministral": (_family("Ministral", 4, sliding_window=5, layer_types=FOUR, head_dim=8), {},
                        dict(sliding_window=5, layer_types=FOUR)),
          # HunYuan: per-head q / k norms after the rotary positions; "dynamic" rope with a fixed alpha (a wider base)
          "hunyuan": (_family("HunYuanDenseV1", head_dim=8, rope_parameters=dict(
              rope_type="dynamic", alpha=50.0, factor=1.0, rope_theta=1e4)), {},
                      dict(qk_norm=True, qk_norm_after_rope=True, rope_theta=1e4 * 50.0 ** (8 / 6), rope_scaling=None)),
          # rope scalings (original context 16; the 12-token prompts plus 10 new tokens cross it): YaRN (Qwen2.5,
          # Qwen3; with DeepSeek's mscale), LongRoPE (Phi-3.5, Phi-4-mini: per-frequency short and long factors, the
          # long ones for a call reaching past 16, partial rotary)
          "qwen2-yarn": (_family("Qwen2", rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                                                original_max_position_embeddings=16)), {},
                         dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
          "llama-yarn-mscale": (_family("Llama", head_dim=16, max_position_embeddings=512, rope_parameters=dict(
              rope_type="yarn", factor=8.0, rope_theta=1e4, original_max_position_embeddings=64, mscale=1.0,
              mscale_all_dim=0.5, beta_slow=1.0, truncate=False)), {}, {}),
          "phi3-longrope": (_family("Phi3", max_position_embeddings=64, original_max_position_embeddings=16,
                                    rope_parameters=dict(rope_type="longrope", rope_theta=1e4,
                                                         original_max_position_embeddings=16, partial_rotary_factor=0.5,
                                                         short_factor=[1.0, 1.5], long_factor=[2.0, 8.0])), {},
                            dict(rotary_dim=4)),
          # Llama's LongRoPE: transformers' Llama keeps the short factors' cache when generate crosses the original
          # context (its Phi-3 re-runs the sequence with the long ones there): refill_cache false
          "llama-longrope": (_family("Llama", max_position_embeddings=64, rope_parameters=dict(
              rope_type="longrope", rope_theta=1e4, **LLAMA_LONGROPE)), {},
                             dict(rope_scaling=dict(rope_type="longrope", factor=4.0, **LLAMA_LONGROPE,
                                                    refill_cache=False))),
          # an untied head in the Gemma families (one importer; it tied them, dropping lm_head.weight: argmax agreed 0%)
          "gemma-untied": (_family("Gemma", head_dim=8), dict(tie_word_embeddings=False), dict(tie_embeddings=False)),
          # transformers 5's Gemma 3 keeps attn_logit_softcapping in its config but never applies it
          "gemma3-softcap-unused": (lambda **kw: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{
              **dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.3,
                     attn_logit_softcapping=1.0), **kw})), {}, dict(attn_softcap=0.0)),
          # Llama's model in transformers 5 rotates the whole head whatever partial_rotary_factor says
          "llama-partial-rotary-unused": (_family("Llama", head_dim=8, partial_rotary_factor=0.5), {},
                                          dict(rotary_dim=None))}


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


def test_window_default_where_config_lacks_it(tmp_path):
    """A config.json without sliding_window gets its config class's default (4096), as transformers reads it: an
    EXAONE 4 folder then has windowed layers and global layers without positions."""
    make, kw, _ = MODELS["exaone4"]
    _saved(tmp_path, make, kw)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["sliding_window"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = GPT.from_hf(tmp_path, max_seq_len=8192)
    assert (ours.config.sliding_window, ours.config.nope_layers) == (4096, [3])


def test_longrope_past_the_original_context(tmp_path, caplog):
    """LongRoPE's long factors: logits of a 24-token prompt (past the original 16 positions: every position takes
    the long factors, as transformers chooses per call) within transformers' fp32 error; a beam search that crosses
    the original context says it keeps the short factors' cache (greedy search re-runs the sequence: MODELS)."""
    make, kw, _ = MODELS["phi3-longrope"]
    hf = _saved(tmp_path, make, kw)
    ours = GPT.from_hf(tmp_path)
    assert ours.config.rope_scaling["factor"] == 4.0  # max_position_embeddings / original, as transformers infers
    assert ours.config.rope_scaling["refill_cache"] is True  # (Phi-3's generate re-runs the sequence)
    ids = padded_batch(VOCAB, 24, 0, left=True, pad_id=0, low=1)[0]
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
        c = type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()(ids).logits
    assert_bounded("longrope", a, c.double(), b, torch.float32)
    with caplog.at_level("WARNING", logger="fastattn"):
        ours.generate(ids[:, :12], 8, temperature=0, num_beams=2)
    assert "past LongRoPE's original context (16)" in caplog.text


def test_longrope_refills_unless_told_not_to():
    """A LongRoPE config without refill_cache (saved before it existed) re-runs the sequence when generate crosses
    the original context, as refill_cache true does; refill_cache false keeps the short factors' cache."""
    scaling = {**LONGROPE, "short_factor": [1.0, 1.0, 1.0, 1.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}
    ids = padded_batch(VOCAB, 12, 0, left=True, pad_id=0, low=1)[0]
    out = {}
    for refill in (None, True, False):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, max_seq_len=64, pos="rotary",
                        rope_scaling={**scaling, **({} if refill is None else {"refill_cache": refill})})
        model = GPT(cfg).eval()
        with torch.no_grad():  # weights that move the greedy tokens
            for w in (p for p in model.parameters() if p.dim() == 2):
                w.normal_(0, 0.3)
        out[refill] = model.generate(ids, 10, temperature=0, eos_token_id=None)
    assert torch.equal(out[None], out[True]) and not torch.equal(out[True], out[False])


@pytest.mark.parametrize("arch", ["starcoder", "granite", "olmo2", "cohere2", "smollm3", "exaone4", "starcoder2",
                                  "glm4", "nemotron", "hunyuan"])
def test_backends_train_alike(tmp_path, arch):
    make, kw, _ = MODELS[arch]
    _saved(tmp_path, make, kw)
    ids, mask = padded_batch(VOCAB, 12, 4, left=True, pad_id=0, low=1)
    backends_train_alike(lambda backend: GPT.from_hf(tmp_path, backend=backend, dropout=0.0),
                         dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))


@pytest.mark.parametrize("make, kw, key", [(_bigcode, dict(scale_attn_weights=False), "scale_attn_weights"),
                                           (_bigcode, dict(activation_function="silu"), "activation_function"),
                                           (_family("Olmo"), dict(clip_qkv=8.0), "clip_qkv"),
                                           (_family("Cohere"), dict(use_qk_norm=True), "use_qk_norm"),
                                           (_family("Cohere"), dict(attention_bias=True), "attention_bias"),
                                           (_family("SeedOss"), dict(attention_out_bias=True), "attention_out_bias"),
                                           (_family("Starcoder2"), dict(hidden_act="silu"), "hidden_act")])
def test_refused(tmp_path, make, kw, key):
    make(**kw).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=key):
        GPT.from_hf(tmp_path)


LONGROPE = dict(rope_type="longrope", factor=4.0, original_max_position_embeddings=16, short_factor=[1, 1, 1],
                long_factor=[2, 2, 2, 2])


@pytest.mark.parametrize("kw, field", [(dict(input_norm=False), "input_norm"),  # needs sandwich_norm
                                       (dict(input_norm=0, sandwich_norm=True), "input_norm"),
                                       (dict(qk_norm_full=True), "qk_norm_full"),  # needs qk_norm
                                       (dict(qk_norm_after_rope=True), "qk_norm_after_rope"),
                                       (dict(pos="rotary", nope_layers=[1]), "nope_layers"),  # n_layer 1
                                       (dict(pos="learned", nope_layers=[0]), "nope_layers"),
                                       (dict(pos="rotary", rope_scaling=LONGROPE), "rope_scaling"),  # 3 of 4
                                       (dict(pos="rotary", rope_scaling={**LONGROPE, "short_factor": [1, 0, 1, 1]}),
                                        "rope_scaling"),
                                       (dict(pos="rotary", rope_scaling={**LONGROPE, "short_factor": [1, 1, 1, 1],
                                                                         "refill_cache": 1}), "rope_scaling"),
                                       (dict(pos="rotary", rope_scaling=dict(rope_type="yarn", factor=4)),
                                        "rope_scaling")])  # no original_max_position_embeddings
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, **kw)
