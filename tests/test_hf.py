"""HF transformers with attn_implementation="fastattn": small randomly initialised BERT, GPT-2, Llama (GQA), Mistral
(sliding window, MQA), Gemma-2 (softcap, alternating sliding / full layers) and Phi-MoE (a sliding window known only
to its mask) saved locally, against "eager" on the
same weights (fp32 on CPU; error bounded by eager's own fp32 error against eager in float64), with left and right
padding, on the reference, cpu and triton backends; greedy generation (dynamic and static KV caches) token for
token; the masks the kernel receives are never expanded to (B, H, L, S). Skipped without transformers."""
import logging
import sys

import pytest
import torch

import fastattn
import fastattn.hf as fhf
from conftest import assert_bounded, grads_equal

transformers = pytest.importorskip("transformers")

VOCAB = 97
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _configs():
    t = transformers
    return {
        "bert": (t.BertModel, t.BertConfig(vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0, **SMALL)),
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **SMALL)),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(vocab_size=VOCAB, num_key_value_heads=1, sliding_window=4,
                                                          **SMALL)),
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config(vocab_size=VOCAB, num_key_value_heads=2, head_dim=8,
                                                       sliding_window=4, attn_logit_softcapping=1.5,
                                                       query_pre_attn_scalar=8, **SMALL)),
        # a sliding-window mask, but no sliding_window argument to the attention function: the mask must carry it
        "phimoe": (t.PhimoeForCausalLM, t.PhimoeConfig(vocab_size=VOCAB, num_key_value_heads=2, sliding_window=4,
                                                       num_local_experts=2, num_experts_per_tok=1, **SMALL)),
    }


ARCHS = ["bert", "gpt2", "llama", "mistral", "gemma2", "phimoe"]
# The float64 reference: "sdpa" (torch's attention in float64). Eager's softmax runs in float32, where its float64
# mask minimum is -inf: a fully masked row (left padding under a causal mask) turns NaN and spreads through 0 * NaN.
# Gemma-2's softcap has only eager: its left-padded row is left out of the comparison (and no right-padded query
# may lose all its keys to the sliding window).
REF64 = {"gemma2": "eager"}
DECODERS = ["gpt2", "llama", "mistral", "gemma2", "phimoe"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each architecture's random weights, saved once (no hub): arch -> path."""
    fhf.register()
    out = {}
    for arch, (cls, cfg) in _configs().items():
        torch.manual_seed(0)
        out[arch] = tmp_path_factory.mktemp(arch)
        cls(cfg).save_pretrained(out[arch])
    return out


def load(saved, arch, impl, dtype=torch.float32):
    """The saved model through transformers' Auto classes, as a user loads one."""
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    kw = dict(experts_implementation="eager") if arch == "phimoe" else {}  # its default grouped_mm: no float64
    model = auto.from_pretrained(saved[arch], attn_implementation=impl, dtype=dtype, **kw).eval()
    assert type(model) is _configs()[arch][0]
    return model


def batch(L=11):
    """Three rows: left-padded (4 pads), right-padded (3 pads: fewer than the sliding window), full."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, L), generator=g)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, -3:] = 0
    return ids, mask


def hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


class Spy:
    """Records what fastattn.hf hands the kernel: (q shape, k shape, attn_mask, causal, window)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = fhf.attention

        def spy(q, k, v, **kw):
            self.calls.append((tuple(q.shape), tuple(k.shape), kw.get("attn_mask"), kw.get("causal"),
                               tuple(kw.get("window", (-1, -1)))))
            return real(q, k, v, **kw)
        monkeypatch.setattr(fhf, "attention", spy)

    def assert_masks_not_expanded(self):
        assert self.calls
        for q_shape, _, mask, _, _ in self.calls:
            if mask is not None:  # (B, 1, 1, S) views of the padding mask: nothing per query or head in memory
                assert mask.shape[1] == 1 and (mask.shape[2] == 1 or mask.stride(2) == 0), (q_shape, mask.shape)


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"], indirect=True)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_eager(saved, arch, backend_name, monkeypatch):
    if backend_name == "triton" and arch not in ("llama", "mistral"):
        pytest.skip("Triton runs through its interpreter on CPU: the GQA and sliding-window models cover it")
    ids, mask = batch()
    ref = hidden(load(saved, arch, REF64.get(arch, "sdpa"), torch.float64), ids, mask)
    eager = hidden(load(saved, arch, "eager"), ids, mask)
    model = load(saved, arch, "fastattn")
    assert model.config._attn_implementation == "fastattn"
    spy = Spy(monkeypatch)
    with fastattn.backend(backend_name):
        out = hidden(model, ids, mask)
    spy.assert_masks_not_expanded()
    causal = {c[3] for c in spy.calls}
    assert causal == ({None} if arch == "bert" else {"bottom_right"})
    if arch in ("mistral", "gemma2", "phimoe"):
        assert (3, 0) in {c[4] for c in spy.calls}  # HF's sliding_window=4: the key itself and 3 before it
    # a left-padding query under a causal mask has no key: 0 here, eager averages the masked keys; compare real tokens
    keep = mask.bool() if arch != "bert" else torch.ones_like(mask, dtype=torch.bool)
    if REF64.get(arch) == "eager":
        keep[0] = False  # float64 eager's NaN in the left-padded row
    assert_bounded(f"{arch} {backend_name}", out[keep], ref[keep], eager[keep], torch.float32)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_backward_matches_eager(saved, arch):
    """A training step: every parameter's gradient (loss on the real tokens) bounded like the outputs."""
    ids, mask = batch()
    grads = []
    for impl, dtype in (("fastattn", torch.float32), ("eager", torch.float32), ("sdpa", torch.float64)):
        model = load(saved, arch, impl, dtype).train()
        out = model(input_ids=ids, attention_mask=mask)
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
        out[mask.bool()].square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[2].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        assert_bounded(f"{arch} d{name}", g, grads[2][name], grads[1][name], torch.float32)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_matches_eager(saved, arch, monkeypatch):
    ids, mask = batch(L=7)
    mask = torch.ones_like(mask)  # generation pads on the left
    mask[0, :3] = 0
    mask[1, :1] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = load(saved, arch, "eager").generate(ids, **kw)
    spy = Spy(monkeypatch)
    got = load(saved, arch, "fastattn").generate(ids, **kw)
    assert got.tolist() == want.tolist()
    spy.assert_masks_not_expanded()
    decode = [c for c in spy.calls if c[0][2] == 1]
    assert decode and all(c[1][2] > 1 for c in decode)  # one query against the cached keys
    if arch in ("mistral", "phimoe"):  # the sliding-window cache keeps window - 1 past keys (a key offset): 4 keys
        assert {c[1][2] for c in decode} == {4}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generate_static_cache(saved, arch, monkeypatch):
    """A static cache is longer than the keys seen: the 2-D mask stops at the last one, and the keys after it are
    dropped so that the causal diagonal stays bottom-right. generate() builds the prefill's masks itself and hands
    them back to the model: the sliding-window mask (3-D) comes back through the mask builder unchanged."""
    ids, mask = batch(L=7)
    mask = torch.ones_like(mask)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = load(saved, arch, "eager").generate(ids, **kw)
    spy = Spy(monkeypatch)
    got = load(saved, arch, "fastattn").generate(ids, cache_implementation="static", **kw)
    assert got.tolist() == want.tolist()
    prefill = [c for c in spy.calls if c[0][2] == 7]
    assert prefill and all(c[1][2] == 7 for c in prefill)  # the cache holds more, the kernel saw the 7 keys
    if arch == "mistral":
        assert {c[4] for c in prefill} == {(3, 0)}


# two rows of packed sequences (position_ids restart at each sequence; lengths 4 + 6 and 3 + 1 + 6)
PACKED_POS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_set_attn_implementation_and_packed_sequences(saved, arch, monkeypatch):
    """set_attn_implementation switches a loaded model; packed sequences (position_ids restarting, no attention
    mask: DataCollatorWithFlattening's batches) run as one fastattn.attention_varlen call per layer over the
    cumulative lengths (no (L, L) mask; Mistral's sliding window and Gemma-2's alternating windows and softcap
    too), and match eager, which masks across sequences."""
    model = load(saved, arch, "eager")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want64 = load(saved, arch, REF64.get(arch, "sdpa"), torch.float64)(input_ids=ids, position_ids=PACKED_POS,
                                                                           use_cache=False).logits
        want = model(input_ids=ids, position_ids=PACKED_POS, use_cache=False).logits
        model.set_attn_implementation("fastattn")
        spy = Spy(monkeypatch)
        varlen = []
        real = fhf.attention_varlen
        monkeypatch.setattr(fhf, "attention_varlen", lambda *a, **kw: varlen.append(a[3].tolist()) or real(*a, **kw))
        got = model(input_ids=ids, position_ids=PACKED_POS, use_cache=False).logits
    assert not spy.calls and varlen == [[0, 4, 10, 13, 14, 20]] * 2  # one call per layer, the five sequences
    assert_bounded(f"{arch} packed", got, want64, want, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "mistral", "bert"])
def test_flash_attention_kwargs_without_position_ids(saved, arch, monkeypatch):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False): one row, the sequences
    given only by cu_seq_lens_q / _k (positions run on across them, as with flash_attention_2). The sequences must
    not see each other: the same outputs as eager with the block-diagonal causal mask (Mistral's window; BERT's
    bidirectional) given as a 4-D mask."""
    lens = [4, 7, 3]
    ids = torch.randint(1, VOCAB, (1, sum(lens)), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 4, 11, 14], dtype=torch.int32)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    i = torch.arange(sum(lens))
    keep = (seq[:, None] == seq[None, :]) & ((i[None, :] <= i[:, None]) | (arch == "bert"))
    if arch == "mistral":
        keep &= i[None, :] > i[:, None] - 4  # its sliding window of 4
    def out(o):
        return o.last_hidden_state if arch == "bert" else o.logits

    cache = {} if arch == "bert" else dict(use_cache=False)
    checked = []  # the offsets are checked on the host by the first layer only
    real = fhf.attention_varlen
    monkeypatch.setattr(fhf, "attention_varlen", lambda *a, **kw: checked.append(kw["validate"]) or real(*a, **kw))
    with torch.no_grad():
        got = out(load(saved, arch, "fastattn")(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                                                max_length_k=7, **cache))
        models = [load(saved, arch, "eager", dt) for dt in (torch.float32, torch.float64)]
        want, want64 = (out(m(input_ids=ids, attention_mask=torch.zeros(1, 1, 14, 14, dtype=dt).masked_fill(
            ~keep, torch.finfo(dt).min), **cache)) for m, dt in zip(models, (torch.float32, torch.float64)))
    assert checked == [True, False]
    assert_bounded(f"{arch} flash kwargs", got, want64, want, torch.float32)


def test_packed_offsets_found_once_per_mask():
    """Every layer gets the same mask object: its offsets are read on the host once, not once a layer."""
    ids = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])
    first = fhf._offsets_of(ids, ids)
    assert first[0].tolist() == [0, 2, 5, 8, 10] and first[1] == 3
    assert fhf._offsets_of(ids, ids) is first
    other = torch.tensor([[0, 1, 1, 1, 1], [2, 2, 2, 2, 3]])  # another kind of layer's mask in between
    assert fhf._offsets_of(other, other)[0].tolist() == [0, 1, 5, 9, 10]
    assert fhf._offsets_of(ids, ids) is first
    ids[1, 3:] = 2  # changed in place: found again
    assert fhf._offsets_of(ids, ids)[0].tolist() == [0, 2, 5, 10]


def test_packed_sequences_backward_matches_eager(saved):
    """Training on packed sequences (the point of packing): every parameter's gradient bounded like the outputs."""
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    grads = []
    for impl, dtype in (("fastattn", torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        model = load(saved, "llama", impl, dtype).train()
        model(input_ids=ids, position_ids=PACKED_POS, use_cache=False).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[2].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        assert_bounded(f"packed d{name}", g, grads[2][name], grads[1][name], torch.float32)


def test_convert_hf_model(saved):
    """fastattn.convert on an HF BERT: attention routed through fastattn, its nn.LayerNorms swapped."""
    ids, mask = batch()
    ref = hidden(load(saved, "bert", "eager", torch.float64), ids, mask)
    eager = hidden(load(saved, "bert", "eager"), ids, mask)
    model = load(saved, "bert", "eager")
    keys = list(model.state_dict())
    assert fastattn.convert(model) is model
    assert model.config._attn_implementation == "fastattn"
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is fastattn.nn.LayerNorm for m in norms)
    assert list(model.state_dict()) == keys
    assert_bounded("bert converted", hidden(model, ids, mask), ref, eager, torch.float32)


def test_convert_hf_rms_norms(saved, caplog):
    """fastattn.convert on HF Llama: its LlamaRMSNorms (LlamaRMSNorm's forward, which 140-odd HF classes share as
    bytecode) become fastattn.nn.HFRMSNorm; outputs and every gradient bounded by eager's own error; the state_dict
    keys kept. Gemma-2's RMSNorm scales by 1 + weight: left alone."""
    ids, mask = batch()
    grads, outs = [], []
    for impl, dtype in (("fastattn", torch.float32), ("eager", torch.float32), ("sdpa", torch.float64)):
        model = load(saved, "llama", impl, dtype).train()
        if impl == "fastattn":
            keys = list(model.state_dict())
            with caplog.at_level(logging.INFO, logger="fastattn"):
                fastattn.convert(model, dropout=False)
            assert "5 x HF Llama-style RMSNorm -> fastattn.nn.HFRMSNorm" in caplog.text
            assert list(model.state_dict()) == keys
            assert not [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        out = hidden(model, ids, mask)  # under no_grad; then a training step
        outs.append(out)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    keep = mask.bool()
    assert_bounded("llama converted", outs[0][keep], outs[2][keep], outs[1][keep], torch.float32)
    for name, g in grads[0].items():
        assert_bounded(f"llama converted d{name}", g, grads[2][name], grads[1][name], torch.float32)
    gemma = load(saved, "gemma2", "eager")
    fastattn.convert(gemma)
    assert not any(isinstance(m, fastattn.nn.HFRMSNorm) for m in gemma.modules())


def test_hf_rms_norm_dtypes():
    """fastattn.nn.HFRMSNorm computes what LlamaRMSNorm computes: a float32 weight with bfloat16 input promotes
    the output to float32 (weight * normalized.to(bfloat16)), equal to HF's; bfloat16 throughout within one rounding
    of HF's (which rounds twice)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    x = torch.randn(4, 7, 48) * 3
    for w_dtype, x_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                             (torch.float32, torch.float32)):
        hf = LlamaRMSNorm(48, eps=1e-5).to(w_dtype)
        with torch.no_grad():
            hf.weight.uniform_(0.5, 1.5)
        ours = fastattn.nn.HFRMSNorm(48, eps=1e-5, dtype=w_dtype)
        ours.load_state_dict(hf.state_dict())
        want, got = hf(x.to(x_dtype)), ours(x.to(x_dtype))
        assert got.dtype == want.dtype
        tol = dict(rtol=2 ** -7, atol=0) if want.dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="hidden_states: last dim 47"):
        ours(torch.randn(2, 47))


def test_attention_sinks(caplog):
    """gpt-oss style sinks (an extra logit per head in the softmax) through the kernel's log-sum-exp, against
    transformers' own eager implementation; with gradients the layer falls back to its eager function, logged."""
    from transformers.models.gpt_oss import modeling_gpt_oss as oss

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

        def __init__(self, sinks):
            super().__init__()
            self.sinks = torch.nn.Parameter(sinks)
    Attn.__module__ = oss.__name__  # its model file: where the eager fallback is looked up
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 6, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    causal = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)[None, None]

    def eager(dtype):
        mod = Attn(sinks.to(dtype)).eval()
        return oss.eager_attention_forward(mod, q.to(dtype), k.to(dtype), v.to(dtype), causal.to(dtype),
                                           scaling=8 ** -0.5)[0]
    ref, want = eager(torch.float64), eager(torch.float32)
    mod = Attn(sinks.float()).eval()
    q32, k32, v32 = q.float(), k.float(), v.float()
    with torch.no_grad():
        got, w = fhf.attention_forward(mod, q32, k32, v32, None, scaling=8 ** -0.5, s_aux=mod.sinks)
    assert w is None
    assert_bounded("sinks", got, ref, want, torch.float32)
    q32.requires_grad_(True)
    fhf._said.clear()
    with caplog.at_level(logging.WARNING, logger="fastattn"):
        got, _ = fhf.attention_forward(mod, q32, k32, v32, causal.float(), scaling=8 ** -0.5, s_aux=mod.sinks)
    assert torch.equal(got, want) and got.requires_grad  # the eager function itself
    assert any("runs on its model's eager attention" in r.getMessage() for r in caplog.records)


def test_gpt_oss_training_with_padding_falls_back_to_eager():
    """A gpt-oss training step (sinks with gradients: the eager fallback) on a padded batch: the compact masks the
    builder makes (padding, sliding window) reach the eager function as the additive mask it expects; loss and
    every gradient equal to attn_implementation="eager"."""
    t = transformers
    cfg = t.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                         num_experts_per_tok=1, sliding_window=4, max_position_embeddings=64, pad_token_id=0)
    fhf.register()
    torch.manual_seed(0)
    models = [t.GptOssForCausalLM._from_config(cfg, attn_implementation=impl, experts_implementation="eager")
              for impl in ("eager", "fastattn")]
    models[1].load_state_dict(models[0].state_dict())
    ids, mask = batch()
    grads, losses = [], []
    for model in models:
        out = model.train()(input_ids=ids, attention_mask=mask).logits
        loss = out[mask.bool()].square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


def test_output_attentions_warns(saved, caplog):
    ids, mask = batch()
    model = load(saved, "llama", "fastattn")
    fhf._said.clear()
    with caplog.at_level(logging.WARNING, logger="fastattn"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert all(a is None for a in out.attentions)
    assert any("output_attentions=True is not supported" in r.getMessage() for r in caplog.records)


def test_autocast_mixed_dtypes(saved):
    """Under CPU autocast Llama's RoPE hands over float32 q and k beside a bfloat16 v: run them in autocast's dtype,
    as autocast does for torch's SDPA, instead of refusing the mixed dtypes."""
    ids, mask = batch()
    keep = mask.bool()
    with torch.no_grad():
        ref = hidden(load(saved, "llama", "sdpa", torch.float64), ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = hidden(load(saved, "llama", "sdpa"), ids, mask)
            got = hidden(load(saved, "llama", "fastattn"), ids, mask)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_bounded("llama autocast", got[keep], ref[keep], want[keep], torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_compile_fullgraph(saved, arch):
    """torch.compile(fullgraph=True) traces the mask builder: no logging call in the traced path (the full-mask
    fallback's debug line), and the sliding-window pattern read from the mask function's cells (not inspect)."""
    ids, mask = batch()
    model = load(saved, arch, "fastattn")
    with torch.no_grad():
        want = hidden(model, ids, mask)
        fhf._said.clear()  # the fallback's line is said once: it must be due in the traced call
        torch._dynamo.reset()
        try:
            got = hidden(torch.compile(model, fullgraph=True, backend="eager"), ids, mask)
        finally:
            torch._dynamo.reset()
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_compile_without_a_mask(saved, arch):
    """No attention_mask and no cache (a pre-training or scoring call): under torch.compile transformers' packing
    detection hands a mask function whose closures hold traced tensors; reading them at trace time raised inside
    dynamo (InternalTorchDynamoError, with or without fullgraph). The full mask is built there, as for sdpa."""
    ids, _ = batch()
    model = load(saved, arch, "fastattn")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        try:
            got = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids, use_cache=False).logits
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_compile_fullgraph_training(saved, arch):
    """A training step of an HF model on "fastattn" under torch.compile(fullgraph=True): the same loss and gradients
    as eager (aot_eager runs the same kernels). GPT-2 is left out: its loss function logs, which dynamo refuses
    with "sdpa" as well."""
    import copy
    ids, mask = batch()
    eager = load(saved, arch, "fastattn").train()
    comp = copy.deepcopy(eager)

    def loss(model):
        out = model(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
        return h[mask.bool()].square().mean()

    want = loss(eager)
    want.backward()
    torch._dynamo.reset()
    try:
        got = loss(torch.compile(comp, fullgraph=True, backend="aot_eager"))
        got.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads_equal(eager, comp, rtol=1e-5)


@pytest.mark.parametrize("arch", ["megatron-bert", "bloom"])
def test_models_computing_their_own_attention(arch, caplog):
    """MegatronBERT, Bloom, MPT, RoFormer, ... never call the AttentionInterface but still ask the mask interface
    under "fastattn" and add its answer to their scores: they get eager's additive mask (a compact padding mask
    added as 0 / 1 gave MegatronBERT wrong outputs and crashed Bloom), run their eager code, and a warning says
    so. Same weights, same padding: equal to "eager" exactly."""
    t = transformers
    if arch == "bloom":
        cls, cfg = t.BloomForCausalLM, t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    else:
        cls, cfg = t.MegatronBertModel, t.MegatronBertConfig(vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                                             attention_probs_dropout_prob=0.0, **SMALL)
    fhf.register()
    torch.manual_seed(0)
    eager = cls._from_config(cfg, attn_implementation="eager").eval()
    ours = cls._from_config(cfg, attn_implementation="fastattn").eval()
    ours.load_state_dict(eager.state_dict())
    ids, mask = batch()
    fhf._said.clear()
    with caplog.at_level(logging.WARNING, logger="fastattn"):
        got = hidden(ours, ids, mask)
    said = caplog.text
    assert torch.equal(got, hidden(eager, ids, mask))
    assert "computes attention in its own code" in said


def test_register_without_transformers(monkeypatch):
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match="needs HF transformers"):
        fhf.register()


def test_register_refuses_old_transformers(monkeypatch):
    """Before 5.4 transformers' mask interface passed cache_position, not q_length / q_offset: refused by name."""
    import transformers as current  # the module register() imports (a test above swaps sys.modules' entries)
    monkeypatch.setattr(current, "__version__", "5.3.0")
    with pytest.raises(ImportError, match=r"transformers >= 5\.4 .*found 5\.3\.0"):
        fhf.register()


def test_doge_gets_a_full_mask():
    """Doge builds its dynamic mask from the (B, 1, L, S) mask before attention runs: the builder gives it the full
    mask even when the caller allows a skip (transformers 5.17 did: a compact mask crashed it)."""
    fhf.register()
    cfg = transformers.DogeConfig(vocab_size=VOCAB, sliding_window=5, **SMALL)
    assert transformers.DogeModel  # its modeling module loaded, as under a model (else: eager's float mask)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    got = fhf.mask_forward(2, 7, 7, 0, 0, mask_function=transformers.masking_utils.causal_mask_function,
                           attention_mask=mask, allow_is_causal_skip=True, config=cfg)
    assert got.shape == (2, 1, 7, 7)
    assert torch.equal(got[1, 0], torch.ones(7, 7, dtype=torch.bool).tril() & mask[1])
