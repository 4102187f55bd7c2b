"""Checkpoint import: GPT.from_hf (GPT-2, OPT, Llama with GQA, Qwen2, Qwen3), BERT.from_hf and
BERTForSequenceClassification.from_hf on small randomly initialised HF models saved to tmp_path (safetensors, and
pytorch_model.bin), logits against transformers' own model on the same weights (fp32; error bounded by transformers'
own fp32 error against its float64 run); greedy generation against transformers' generate; bad checkpoints raise
errors naming the key."""
import json

import pytest
import torch

import fastattn
from conftest import assert_bounded
from fastattn.models import BERT, GPT, BERTForSequenceClassification, CheckpointError
transformers = pytest.importorskip("transformers")

VOCAB = 97


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def _llama(tie=False, rope=None):
    """rope: "llama3" (Llama 3.1 / 3.2's scaling, its blend band inside these 8-dim heads) or "linear"."""
    scaling = {"llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=16),
               "linear": dict(rope_type="linear", factor=2.0)}.get(rope)
    extra = dict(rope_parameters={"rope_theta": 500.0, **scaling}) if scaling else dict(rope_theta=500.0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, **extra))


def _qwen(version):
    """Qwen2: q / k / v biases only; Qwen3: per-head q / k RMSNorms and a head_dim (16) that is not d / heads (8)."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if version == 2:
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=16))
    with torch.no_grad():  # q / k norm weights start at ones: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def _bert(cls_name="BertForPreTraining", **kw):
    return getattr(transformers, cls_name)(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw))


def _ids(B=2, L=12, seed=0):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def _bounded(name, ours, hf, hf64, get=lambda o: o.logits):
    with torch.no_grad():
        assert_bounded(name, get(ours).detach(), get(hf64).double(), get(hf).detach(), torch.float32)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-tied", "llama3-rope", "linear-rope", "qwen2", "qwen3"])
def test_gpt_from_hf_matches_transformers(tmp_path, arch):
    torch.manual_seed(0)
    hf = {"gpt2": _gpt2, "qwen2": lambda: _qwen(2), "qwen3": lambda: _qwen(3),
          "llama3-rope": lambda: _llama(rope="llama3"), "linear-rope": lambda: _llama(rope="linear")}.get(
        arch, lambda: _llama(tie=arch == "llama-tied"))().eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(tmp_path).eval()
    assert ours.tok_emb.padding_idx == hf.get_input_embeddings().padding_idx == (None if arch == "gpt2" else 0)
    assert ours.config.n_kv_head == (4 if arch == "gpt2" else 2)
    assert (ours.config.head_dim, ours.config.qk_norm) == ((16, True) if arch == "qwen3" else (8, False))
    if arch == "qwen2":
        assert ours.blocks[0].attn.wqkv.bias is not None and ours.blocks[0].attn.wo.bias is None
    hf64 = type(hf).from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    ids = _ids()
    if arch.endswith("-rope"):
        assert ours.config.rope_scaling["rope_type"] == arch.split("-")[0]
        ids = _ids(L=40)  # past original_max_position_embeddings
    with torch.no_grad():
        _bounded(arch, ours(ids), hf(ids), hf64(ids))
        mine = ours.generate(ids[:, :5], 8, temperature=0)
        theirs = hf.generate(ids[:, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(mine, theirs)


def test_pad_row_gets_no_gradient_as_in_transformers(tmp_path):
    """Llama's embedding has padding_idx = pad_token_id: a training step on a padded batch leaves the pad row's
    gradient zero in both models, the other rows' equal (the tied head's gradient still reaches every row)."""
    torch.manual_seed(0)
    hf = _llama(tie=True).train()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(tmp_path).train()
    ids = _ids(L=10)
    ids[:, :3] = 0  # left padding with pad_token_id 0
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    hf(ids, attention_mask=mask, labels=labels).loss.backward()
    a, b = ours.tok_emb.weight.grad, hf.get_input_embeddings().weight.grad
    assert a[0].abs().sum() > 0 and b[0].abs().sum() > 0  # (the tied head's gradient)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    ours.zero_grad()
    ours.tok_emb.padding_idx = None  # without it, the pad row's lookups add their gradient
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    assert not torch.allclose(ours.tok_emb.weight.grad[0], a[0])
    assert torch.equal(ours.tok_emb.weight.grad[1:], a[1:])


def _opt(**kw):
    return transformers.OPTForCausalLM(transformers.OPTConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, pad_token_id=1, bos_token_id=2,
        eos_token_id=2, init_std=0.3), **kw}))  # weights large enough to move the greedy tokens


def test_opt_from_hf_matches_transformers(tmp_path):
    """OPT: learned positions from table row 2 (pos_offset), counted past left padding as transformers counts them;
    logits and greedy tokens of a left-padded batch."""
    torch.manual_seed(0)
    hf = _opt().eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(tmp_path)
    assert (ours.config.pos_offset, ours.config.activation) == (2, "relu")
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 1, 0
    keep = mask.bool()
    with torch.no_grad():
        a, b, c = (m(ids, attention_mask=mask).logits for m in (ours, hf, hf64))
        assert_bounded("opt", a[keep], c[keep].double(), b[keep], torch.float32)
        mine = ours.generate(ids, 8, temperature=0, attention_mask=mask, eos_token_id=2, min_new_tokens=8)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=1)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("kw, key", [(dict(do_layer_norm_before=False), "do_layer_norm_before"),
                                     (dict(word_embed_proj_dim=16), "word_embed_proj_dim"),
                                     (dict(enable_bias=False), "enable_bias")])
def test_opt_variants_refused(tmp_path, kw, key):
    """OPT-350m (post-norm, embeddings projected from 512 dims) and bias-free OPTs: refused, naming the key."""
    _opt(**kw).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=f"{key}="):
        GPT.from_hf(tmp_path)


def test_min_new_tokens_as_transformers(tmp_path):
    """min_new_tokens keeps every eos id from being chosen before that many new tokens, as HF's generate: greedy
    continuations equal transformers' with the same eos ids, with and without it (and with a bad value refused)."""
    torch.manual_seed(0)
    hf = _gpt2().eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(tmp_path)
    ids = _ids()[:, :5]
    with torch.no_grad():
        greedy = ours.generate(ids, 8, temperature=0)
        eos = [greedy[0, 6].item(), greedy[1, 5].item()]  # row 0's second new token, row 1's first
        for n in (0, 3, 8):
            mine = ours.generate(ids, 8, temperature=0, eos_token_id=eos, min_new_tokens=n)
            theirs = hf.generate(ids, max_new_tokens=8, min_new_tokens=n, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos[0])
            assert torch.equal(mine, theirs), n
            assert not torch.isin(mine[:, 5:5 + n], torch.tensor(eos)).any()
    with pytest.raises(ValueError, match="min_new_tokens"):
        ours.generate(ids, 2, min_new_tokens=-1)


def test_dtype_and_device_on_load(tmp_path):
    """from_hf / from_pretrained(dtype=, device=) as transformers' from_pretrained(dtype=): float64 import equals
    transformers' float64 model to float64 rounding; bfloat16 casts every float tensor (a quantized model keeps its
    int8 weights and float32 scales); a non-float dtype or a bad device is a ValueError naming it. (GPT-2: HF's
    Llama computes its rotary tables in float32 even in a float64 model.)"""
    torch.manual_seed(0)
    hf = _gpt2().eval()
    hf.save_pretrained(tmp_path / "hf")
    hf64 = type(hf).from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    ours = GPT.from_hf(tmp_path / "hf", dtype=torch.float64, device="cpu")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf64(ids).logits, rtol=1e-10, atol=1e-10)
    bert = _bert()
    bert.save_pretrained(tmp_path / "bert")
    assert {p.dtype for p in BERT.from_hf(tmp_path / "bert", dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    fastattn.quantize(ours.float(), mode="w8a16")
    ours.save_pretrained(tmp_path / "q")
    q = GPT.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    lin = q.blocks[0].mlp.w_in
    assert isinstance(lin, fastattn.nn.Int8Linear)
    assert lin.weight.dtype == torch.int8 and lin.weight_scale.dtype == torch.float32
    assert q.tok_emb.weight.dtype == torch.bfloat16 and q.norm_f.weight.dtype == torch.bfloat16
    assert q.generate(ids[:, :4], 3, temperature=0).shape == (2, 7)
    for kw, word in ((dict(dtype=torch.int8), "dtype"), (dict(dtype="bf16"), "dtype"), (dict(device="nope"), "device")):
        with pytest.raises(ValueError, match=word):
            GPT.from_hf(tmp_path / "hf", **kw)
        with pytest.raises(ValueError, match=word):
            GPT.from_pretrained(tmp_path / "q", **kw)


def test_qwen_backends_and_decode_step(tmp_path):
    """A Qwen3-style GPT (q / k norms, head_dim != d / heads) and a Qwen2-style one (q / k / v biases): the "torch"
    backend gives the same logits, and the bound decode step the same greedy tokens as the modules; a Qwen2 whose
    sliding window is on imports it, on every layer or from max_window_layers on (logits and generation equal to
    transformers')."""
    from fastattn.models import GPTConfig
    ids = _ids()
    for kw in (dict(qk_norm=True, head_dim=16), dict(qkv_bias=True, bias=False)):
        cfg = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=64,
                   norm="rmsnorm", mlp="swiglu", pos="rotary", **kw)
        torch.manual_seed(0)
        ours = GPT(GPTConfig(**cfg)).eval()
        ref = GPT(GPTConfig(**cfg, backend="torch")).eval()
        ref.load_state_dict(ours.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
            bound = ours.generate(ids[:, :5], 6, temperature=0)
            modules = ref.generate(ids[:, :5], 6, temperature=0)
        assert torch.equal(bound, modules), kw
    for layers in (0, 1):  # every layer windowed; layer 0 full and layer 1 windowed (max_window_layers)
        torch.manual_seed(0)
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=6,
            max_window_layers=layers, bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
        hf.save_pretrained(tmp_path / str(layers))
        ours = GPT.from_hf(tmp_path / str(layers))
        assert (ours.config.sliding_window, ours.config.layer_types) == \
            (6, None if layers == 0 else ["full_attention", "sliding_attention"])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
            want = hf.generate(ids[:, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(ours.generate(ids[:, :5], 8, temperature=0), want)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_fused_projections_and_window(tmp_path, partial):
    """Phi-3 stores q / k / v in one qkv_proj and [gate | up] in one gate_up_proj (our layout) and has a sliding
    window: logits past the window and greedy tokens equal transformers'; with a partial rotary factor (Phi-4-mini's
    0.75) too, and a factor giving an odd number of rotary channels refused."""
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
              sliding_window=8)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**kw, partial_rotary_factor=partial)).eval()
    hf.save_pretrained(tmp_path)
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours = GPT.from_hf(tmp_path)
    assert (ours.config.sliding_window, ours.config.rotary_dim) == (8, None if partial == 1 else 4)
    ids = _ids(L=40)
    with torch.no_grad():
        _bounded("phi3", ours(ids), hf(ids), hf64(ids))
        want = hf.generate(ids[:, :10], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:, :10], 12, temperature=0), want)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**kw, partial_rotary_factor=0.375)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="partial_rotary_factor 0.375 gives 3 rotary channels"):
        GPT.from_hf(tmp_path)


@pytest.mark.parametrize("version", [1, 2, 3, "vault"])
def test_gemma(tmp_path, version):
    """Gemma (1 + weight norms, sqrt(d) embedding scale, GeGLU, head_dim 16 != d / heads), Gemma 2 (also sandwich
    norms, score and logit softcaps, query_pre_attn_scalar, a sliding window of 6 on every other layer) and Gemma 3
    (q / k norms, local layers with their own rotary base, a linearly scaled global rope), VaultGemma (Gemma 2
    without the output norms): logits of 20
    tokens within transformers' own fp32 error and 10 greedy tokens after 6 equal to its generate (its hybrid cache),
    through the bound decode step, the modules' decode_one and the "torch" backend."""
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
    if version == 1:
        hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(**kw))
    elif version == 3:  # layers 0 and 2 local (window 6, rotary base 10^4), layer 1 global (base 10^6, linear x4)
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **{**kw, "num_hidden_layers": 3}, sliding_window=6, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}))
    else:  # (VaultGemma: Gemma 2 without the norms on the sublayers' outputs)
        name = "VaultGemma" if version == "vault" else "Gemma2"
        hf = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(
            **kw, sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            query_pre_attn_scalar=24))
    with torch.no_grad():  # norm weights start at 0 (a scale of 1): make them matter; larger scores for the caps
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
            elif "q_proj" in name:
                p.mul_(8)
    hf.eval().save_pretrained(tmp_path)
    # eager: transformers before 5.2x ran Gemma 2 on "sdpa" by default, which drops the score softcap
    hf.set_attn_implementation("eager")
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    ours = GPT.from_hf(tmp_path)
    assert ours.config.sandwich_norm == (version in (2, 3)) and ours.config.head_dim == 16
    assert ours.config.qk_norm == (version == 3) and (ours.config.rope_local_theta == 1e4) == (version == 3)
    if version in (2, "vault"):  # a window of 6 on layer 0, none on layer 1
        assert (ours.config.sliding_window, ours.config.layer_types) == (6, ["sliding_attention", "full_attention"])
    ids = _ids(L=20)
    with torch.no_grad():
        _bounded(f"gemma{version}", ours(ids), hf(ids), hf64(ids))
        want = hf.generate(ids[:, :6], max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:, :6], 10, temperature=0), want)  # bound step
        ours.bound_decode_one = lambda: ours.decode_one
        assert torch.equal(ours.generate(ids[:, :6], 10, temperature=0), want)  # modules
        assert torch.equal(GPT.from_hf(tmp_path, backend="torch").generate(ids[:, :6], 10, temperature=0), want)
    if version == 3:  # the layout of the published config.json files: one rope_scaling, the local base apart
        cfg = json.loads((tmp_path / "config.json").read_text())
        del cfg["rope_parameters"]
        cfg.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=1e4)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert GPT.from_hf(tmp_path).config == ours.config


def test_mistral_sliding_window(tmp_path):
    """A Mistral window shorter than the sequence: logits past the window equal transformers' (window 8, 40
    tokens); greedy generation of a left-padded batch equals its generate (its sliding cache) through the bound decode
    step, the modules' decode_one and the "torch" backend. A window covering max_seq_len cuts nothing: none kept."""
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**kw, sliding_window=8)).eval()
    hf.save_pretrained(tmp_path)
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours = GPT.from_hf(tmp_path)
    assert ours.config.sliding_window == 8 and GPT.from_hf(tmp_path, max_seq_len=8).config.sliding_window is None
    ids = _ids(L=40)
    with torch.no_grad():
        _bounded("mistral window", ours(ids), hf(ids), hf64(ids))
        prompt, mask = ids[:, :10].clone(), torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0
        want = hf.generate(prompt, attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False,
                           pad_token_id=0)
        assert torch.equal(ours.generate(prompt, 14, temperature=0, attention_mask=mask), want)  # bound step
        ours.bound_decode_one = lambda: ours.decode_one
        assert torch.equal(ours.generate(prompt, 14, temperature=0, attention_mask=mask), want)  # modules
        ref = GPT.from_hf(tmp_path, backend="torch")
        assert torch.equal(ref.generate(prompt, 14, temperature=0, attention_mask=mask), want)


def test_gpt_from_hf_pytorch_bin(tmp_path):
    torch.manual_seed(0)
    hf = _llama().eval()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")  # the legacy format
    (tmp_path / "model.safetensors").unlink()
    ours = GPT.from_hf(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_bert_from_hf_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = _bert().eval()
    hf.save_pretrained(tmp_path)
    hf64 = transformers.BertForPreTraining.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    ours = BERT.from_hf(tmp_path).eval()
    ids, tt = _ids(), torch.zeros(2, 12, dtype=torch.long)
    tt[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    kw = dict(attention_mask=mask, token_type_ids=tt)
    with torch.no_grad():
        a, b, c = ours(ids, **kw), hf(ids, **kw), hf64(ids, **kw)
    keep = mask.bool()  # padded positions' outputs are not compared (no real token reads them)
    assert_bounded("mlm", a.logits[keep], c.prediction_logits[keep].double(), b.prediction_logits[keep],
                   torch.float32)
    assert_bounded("nsp", a.nsp_logits, c.seq_relationship_logits.double(), b.seq_relationship_logits,
                   torch.float32)


@pytest.mark.parametrize("problem_type, num_labels, labels", [
    (None, 3, torch.tensor([0, 2])), (None, 1, torch.tensor([0.5, -1.0])),
    (None, 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])),  # float labels: multi-label, as HF infers
    ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])),
    ("regression", 3, torch.tensor([[0.5, 1.0, -1.0], [0.0, 2.0, 1.0]]))])
def test_bert_sequence_classification_from_hf(tmp_path, problem_type, num_labels, labels):
    """Logits and loss equal transformers' BertForSequenceClassification, its problem_type (or its inference of
    one from num_labels and the labels' dtype) picking the loss."""
    torch.manual_seed(0)
    hf = _bert("BertForSequenceClassification", num_labels=num_labels, problem_type=problem_type).eval()
    hf.save_pretrained(tmp_path)
    ours = BERTForSequenceClassification.from_hf(tmp_path).eval()
    assert (ours.config.num_labels, ours.config.problem_type) == (num_labels, problem_type)
    ids = _ids()
    with torch.no_grad():
        a, b = ours(ids, labels=labels), hf(ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)


def test_bert_classifier_from_pretraining_checkpoint(tmp_path, caplog):
    _bert().eval().save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="fastattn"):
        clf = BERTForSequenceClassification.from_hf(tmp_path, num_labels=5)
    assert "classifier.weight" in caplog.text
    assert clf(_ids()).logits.shape == (2, 5)


# ---- bad checkpoints ------------------------------------------------------------------------------------------
def _edit_weights(path, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_named(tmp_path):
    _gpt2().eval().save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*missing"):
        GPT.from_hf(tmp_path)


def test_wrong_shape_named(tmp_path):
    _llama().eval().save_pretrained(tmp_path)

    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # GQA: (2 * 8, 32) expected
    _edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(32, 32\).*\(16, 32\)"):
        GPT.from_hf(tmp_path)


def test_bert_decoder_refused(tmp_path):
    """A BertLMHeadModel (is_decoder: causal attention) imported as the bidirectional encoder gave other logits,
    silently."""
    _bert("BertLMHeadModel", is_decoder=True).eval().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is_decoder"):
        BERT.from_hf(tmp_path)


def test_bert_missing_mlm_head_named(tmp_path):
    _bert("BertModel").eval().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cls.predictions"):
        BERT.from_hf(tmp_path)


def test_unsupported_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_hf(tmp_path)
    _gpt2().eval().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match="'t5'"):
        GPT.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu_fast"}))
    with pytest.raises(CheckpointError, match="gelu_fast"):
        GPT.from_hf(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "bert", "bart"])
def test_malformed_folders_raise_checkpoint_errors(tmp_path, family):
    """A config.json lacking a key the family needs, not JSON, or not an object, and truncated weights: a
    CheckpointError naming the file or key (they were a bare KeyError, a JSONDecodeError, a SafetensorError)."""
    from fastattn.models import Seq2Seq
    make, load, key = {"gpt2": (_gpt2, GPT.from_hf, "n_embd"), "bert": (_bert, BERT.from_hf, "hidden_size"),
                       "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
                           vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, max_position_embeddings=32)), Seq2Seq.from_hf, "d_model")}[family]
    make().save_pretrained(tmp_path)
    cfg_file, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({k: v for k, v in good.items() if k != key}))
    with pytest.raises(CheckpointError, match=f"config.json: no '{key}'"):
        load(tmp_path)
    for text, needle in (("{not json", "not readable JSON"), ("[1, 2]", "expected a JSON object, got list")):
        cfg_file.write_text(text)
        with pytest.raises(CheckpointError, match=needle):
            load(tmp_path)
    cfg_file.write_text(json.dumps(good))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: not readable"):
        load(tmp_path)
