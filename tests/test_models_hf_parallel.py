"""GPT.from_hf on the parallel-block families: GPT-NeoX / Pythia (query_key_value interleaved per head; attention and
MLP reading the same stream, each through its own norm; rotary positions on rotary_pct of each head) and Phi-1 / 1.5
/ 2 (one norm for both, a biased LM head, partial rotary, GQA), Falcon (7B's multi-query with one norm, 40B's
grouped q / k / v layout with two, RW's sequential blocks), StableLM (LayerNorm biases without Linear ones,
sequential or parallel), GPT-J (one norm, rotary positions in interleaved pairs), BLOOM (ALiBi, an embedding
LayerNorm) and MPT (ALiBi, no biases). Small random models (weights
large enough that every sublayer moves the greedy tokens) saved to tmp_path: logits of a left-padded batch bounded
by transformers' own fp32 error against its float64 run, greedy tokens (through the bound decode step) equal to
transformers' generate, both backends training alike; bad configs refused naming the key."""
import pytest
import torch

from conftest import backends_train_alike, matches_hf_causal_lm, padded_batch
from fastattn.models import BERTConfig, GPT, GPTConfig, CheckpointError
transformers = pytest.importorskip("transformers")

VOCAB = 71


def _neox(**kw):
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
        eos_token_id=0, initializer_range=0.3), **kw})).eval()


def _phi(**kw):
    return transformers.PhiForCausalLM(transformers.PhiConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, partial_rotary_factor=0.5, resid_pdrop=0.0,
        embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw})).eval()


def _falcon(**kw):
    return transformers.FalconForCausalLM(transformers.FalconConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        hidden_dropout=0.0, attention_dropout=0.0, alibi=False, bos_token_id=0, eos_token_id=0,
        initializer_range=0.3), **kw})).eval()


def _gptj(**kw):
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(**{**dict(
        vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw})).eval()


def _bloom(**kw):
    return transformers.BloomForCausalLM(transformers.BloomConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw})).eval()


def _mpt(**kw):
    attn = {"alibi": True, "alibi_bias_max": 8, **kw.pop("attn", {})}
    return transformers.MptForCausalLM(transformers.MptConfig(**{**dict(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, resid_pdrop=0.0, emb_pdrop=0.0,
        attn_config=attn, bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw})).eval()


def _stablelm(**kw):
    return transformers.StableLmForCausalLM(transformers.StableLmConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, partial_rotary_factor=0.5, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.3), **kw})).eval()


# name: (make, kwargs, parallel_block, rotary_dim)
MODELS = {"pythia": (_neox, {}, "two_norms", 4), "neox-sequential": (_neox, dict(use_parallel_residual=False), None, 4),
          "phi": (_phi, {}, "one_norm", 4),
          "falcon-7b": (_falcon, dict(multi_query=True, parallel_attn=True), "one_norm", None),  # MQA, no biases
          "falcon-40b": (_falcon, dict(new_decoder_architecture=True, num_kv_heads=2), "two_norms", None),  # GQA
          "falcon-rw": (_falcon, dict(multi_query=False, parallel_attn=False, bias=True), None, None),
          "stablelm": (_stablelm, dict(use_qkv_bias=True), None, 4),
          "stablelm-parallel": (_stablelm, dict(use_parallel_residual=True), "one_norm", 4),
          "gptj": (_gptj, {}, "one_norm", 4),  # interleaved rotary pairs on 4 of 8 channels
          "gptj-full-rotary": (_gptj, dict(rotary_dim=8), "one_norm", None),
          "bloom": (_bloom, {}, None, None),  # ALiBi, 4 heads
          "bloom-6-heads": (_bloom, dict(hidden_size=48, n_head=6), None, None),  # ALiBi slopes of 4 and 8 heads
          "mpt": (_mpt, {}, None, None),  # ALiBi, no biases
          "mpt-6-heads": (_mpt, dict(d_model=48, n_heads=6), None, None),
          "falcon-rw-alibi": (_falcon, dict(multi_query=False, parallel_attn=False, bias=True, alibi=True), None,
                              None)}  # ALiBi scaled by 1 / sqrt(head dim), slopes in bfloat16


def _batch():
    return padded_batch(VOCAB, 12, 4, left=True, pad_id=0, low=1)


@pytest.mark.parametrize("arch", list(MODELS))
def test_matches_transformers(tmp_path, arch, caplog):
    make, kw, parallel, rot = MODELS[arch]
    torch.manual_seed(0)
    with torch.no_grad():  # biases and norm weights start at 0 / 1 in transformers' init: make them matter
        hf = make(**kw)
        for name, p in hf.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.uniform_(-0.5, 0.5).add_(1.0 if name.endswith("norm.weight") else 0.0)
    hf.save_pretrained(tmp_path)
    alibi = arch.startswith(("bloom", "mpt")) or arch.endswith("alibi")  # ALiBi's float64 runs: NaN under padding
    ours = matches_hf_causal_lm(tmp_path, hf, VOCAB, caplog, per_row_reference=alibi)
    assert (ours.config.parallel_block, ours.config.rotary_dim) == (parallel, rot)
    assert ours.config.lm_head_bias is (arch == "phi" or arch.startswith("gptj"))


@pytest.mark.parametrize("arch", ["pythia", "phi", "falcon-40b", "gptj", "bloom", "mpt"])
def test_backends_train_alike(tmp_path, arch):
    make, kw, _, _ = MODELS[arch]
    torch.manual_seed(0)
    make(**kw).save_pretrained(tmp_path)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    backends_train_alike(lambda backend: GPT.from_hf(tmp_path, backend=backend, dropout=0.0),
                         dict(input_ids=ids, attention_mask=mask, labels=labels))


@pytest.mark.parametrize("make, kw, key", [(_neox, dict(attention_bias=False), "attention_bias"),
                                           (_phi, dict(qk_layernorm=True), "qk_layernorm"),
                                           (_bloom, dict(apply_residual_connection_post_layernorm=True),
                                            "apply_residual_connection_post_layernorm"),
                                           (_mpt, dict(attn=dict(clip_qkv=6.0)), "attn_config.clip_qkv"),
                                           (_mpt, dict(attn=dict(alibi=False)), "attn_config.alibi"),
                                           (_mpt, dict(attn=dict(alibi_bias_max=16)), "alibi_bias_max"),
                                           (_stablelm, dict(qk_layernorm=True), "qk_layernorm"),
                                           (_neox, dict(rotary_pct=0.375), "gives 3 rotary channels")])
def test_refused(tmp_path, make, kw, key):
    make(**kw).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=key):
        GPT.from_hf(tmp_path)


@pytest.mark.parametrize("cls, kw, field", [
    (GPTConfig, dict(parallel_block="two_norms", norm_first=False), "parallel_block"),
    (GPTConfig, dict(parallel_block="three"), "parallel_block"),
    (GPTConfig, dict(pos="rotary", rotary_dim=5), "rotary_dim"),
    (GPTConfig, dict(pos="learned", rotary_dim=4), "rotary_dim"),
    (BERTConfig, dict(lm_head_bias=True), "lm_head_bias")])
def test_bad_configs_name_the_field(cls, kw, field):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
        cls(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, **kw)
