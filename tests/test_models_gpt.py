"""fastattn.models.GPT on tiny configs (CPU backends): configs and their errors, the fastattn and torch backends
against each other over training steps, KV-cache decoding against the full forward token by token (fp32, bounded
by the full forward's own fp32 error against float64), batched generation with left padding against each prompt
alone, sampling (seeded, top-k, top-p), eos and streaming, save / from_pretrained, the backbone / head split."""
import contextlib
import dataclasses
import io
import json

import pytest
import torch

from conftest import assert_bounded
from fastattn.models import GPT, GPTConfig, ModelConfig

VOCAB = 61
VARIANTS = {
    "gpt2": dict(),
    "llama": dict(pos="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    "mqa-postnorm-sinusoidal": dict(n_kv_head=1, norm_first=False, pos="sinusoidal", activation="relu"),
    "bloom-alibi-gqa": dict(pos="alibi", embed_norm=True, activation="gelu_tanh", n_kv_head=2),
}


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=64)
    return GPTConfig(**{**base, **kw})


def model(variant="gpt2", seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**{**VARIANTS[variant], **kw})).eval()


def twin(m: GPT, **kw) -> GPT:
    """The same weights under other config fields (e.g. backend="torch")."""
    other = GPT(GPTConfig.from_dict({**m.config.to_dict(), **kw})).eval()
    other.load_state_dict(m.state_dict())
    return other


# ---- configs --------------------------------------------------------------------------------------------------
def test_config_json_round_trip(tmp_path):
    cfg = tiny(**VARIANTS["llama"])
    cfg.save(tmp_path / "c.json")
    assert GPTConfig.load(tmp_path / "c.json") == cfg
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["model_type"] == "gpt" and cfg.n_kv_head == 2 and tiny().n_kv_head == 4


@pytest.mark.parametrize("kw, words", [
    (dict(d_model=30, n_head=4), ["n_head", "d_model=30"]),
    (dict(n_kv_head=3), ["n_kv_head", "3"]),
    (dict(mlp="reglu"), ["mlp", "reglu"]),
    (dict(activation="swish"), ["activation", "swish"]),
    (dict(norm="batchnorm"), ["norm", "batchnorm"]),
    (dict(pos="xpos"), ["pos", "xpos"]),
    (dict(embed_norm=1), ["embed_norm", "1"]),
    (dict(pos="alibi", alibi_slopes=[0.5, 0.25]), ["alibi_slopes", "4 numbers"]),
    (dict(alibi_slopes=[0.5] * 4), ["alibi_slopes", "pos 'alibi'"]),
    (dict(backend="jax"), ["backend", "jax"]),
    (dict(dropout=1.0), ["dropout"]),
    (dict(n_head=0), ["n_head"]),
    (dict(dropout="0.1"), ["dropout", "'0.1'"]),
    (dict(norm_eps=-1e-5), ["norm_eps"]),
    (dict(pos="rotary", rope_theta=0.0), ["rope_theta"]),
    (dict(head_dim=0), ["head_dim"]),
    (dict(qk_norm="yes"), ["qk_norm", "'yes'"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_scaling", "yarn"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["rope_scaling", "low_freq_factor"]),
    (dict(sliding_window=0), ["sliding_window"]),
    (dict(attn_softcap=-1.0), ["attn_softcap"]),
    (dict(attn_scale=0.0), ["attn_scale"]),
    (dict(embed_scale=0), ["embed_scale"]),
    (dict(sandwich_norm=True, norm_first=False), ["sandwich_norm", "pre-norm"]),
])
def test_bad_config(kw, words):
    with pytest.raises(ValueError) as e:
        tiny(**kw)
    for w in words:
        assert w in str(e.value)


def test_sliding_window_and_alibi_are_for_gpt_only():
    from fastattn.models import BERTConfig, Seq2SeqConfig
    with pytest.raises(ValueError, match="sliding_window: a window is supported by GPT .causal. and BERT"):
        Seq2SeqConfig(vocab_size=50, d_model=32, n_layer=1, n_head=2, sliding_window=4)
    for cls in (BERTConfig, Seq2SeqConfig):
        with pytest.raises(ValueError, match="pos: 'alibi' is supported by GPT"):
            cls(vocab_size=50, d_model=32, n_layer=1, n_head=2, pos="alibi")


def test_alibi_slopes_are_blooms():
    """Press et al.'s slopes: 2^(-8i/n) for n a power of two; else the lower power's and every other of the next."""
    from fastattn.models.positions import alibi_slopes
    assert alibi_slopes(4).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


def test_unknown_key_named():
    with pytest.raises(ValueError, match="'n_heads'"):
        GPTConfig.from_dict({**tiny().to_dict(), "n_heads": 4})
    with pytest.raises(ValueError, match="model_type"):
        GPTConfig.from_dict({**tiny().to_dict(), "model_type": "bert"})


def test_config_fields_are_the_documented_ones():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "max_seq_len", "dropout", "norm",
            "norm_first", "mlp", "pos", "tie_embeddings", "bias", "backend"} <= names


# ---- forward, backends, training ------------------------------------------------------------------------------
def test_torch_backend_softcap_keeps_float64():
    """backend="torch" with attn_softcap computes a float64 model's scores in float64 (it cast them to float32: 3e-9
    off the fastattn backend, which matches the float64 reference)."""
    fa = model("gpt2", attn_softcap=50.0).double()
    th = twin(fa, backend="torch").double()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(th(ids).logits, fa(ids).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backends_match_over_training_steps(variant):
    """fastattn and torch backends: same state_dict, same losses and parameters over a few SGD steps (padding
    included; SGD rather than Adam, which blows up rounding noise in near-zero gradients, e.g. the key bias's)."""
    fa = model(variant).train()
    th = twin(fa, backend="torch").train()
    assert fa.state_dict().keys() == th.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (fa, th)]
    for _ in range(3):
        losses = []
        for m, opt in zip((fa, th), opts):
            opt.zero_grad()
            loss = m(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (n, p), q in zip(fa.named_parameters(), th.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("variant", ["gpt2", "bloom-alibi-gqa"])
def test_fused_projection_gradient_in_one_tensor(monkeypatch, variant):
    """In training, self-attention on the fused projection's heads goes through attention_packed (the projection's
    gradient as one tensor, not a stack of three), and every parameter's gradient equals, bit for bit, that of
    attention on the same views."""
    import fastattn.models.layers as layers
    m = model(variant).train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))

    def grads():
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    calls, real = [], layers.attention_packed
    monkeypatch.setattr(layers, "attention_packed", lambda packed, split, **kw: calls.append(1) or
                        real(packed, split, **kw))
    packed = grads()
    assert len(calls) == m.config.n_layer
    monkeypatch.setattr(layers, "attention_packed", lambda packed, split, **kw: layers.attention(*split(packed), **kw))
    for (name, _), a, b in zip(m.named_parameters(), packed, grads()):
        assert torch.equal(a, b), name


def test_loss_is_shifted_next_token_ce():
    m = model()
    ids = torch.randint(0, VOCAB, (2, 9))
    out = m(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert out.logits.shape == (2, 9, VOCAB)
    torch.testing.assert_close(out.loss, ref)


def test_dropout_trains_and_eval_is_deterministic():
    m = model(dropout=0.2).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    a, b = m(ids).logits, m(ids).logits
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m(ids).logits, m(ids).logits)


# ---- KV cache and generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decode_equals_full_forward(variant):
    """prefill + decode_one, token by token, against the full forward on the whole sequence: error (fp32) at most
    twice the full forward's own fp32 error against the model in float64, plus a rounding step."""
    m = model(variant)
    m64 = twin(m).double()
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, VOCAB, (2, 20), generator=g)
    P = 7
    m.setup_caches(2, seq.shape[1])
    keep = torch.ones(2, P, dtype=torch.bool)
    steps = [m.prefill(seq[:, :P], keep)]
    for t in range(P, seq.shape[1]):
        steps.append(m.decode_one(seq[:, t:t + 1], m.cache_index[t:t + 1]))
    with torch.no_grad():
        for i, logits in enumerate(steps):
            n = P + i
            full = m(seq[:, :n]).logits[:, -1]
            ref = m64(seq[:, :n]).logits[:, -1]
            assert_bounded(f"step {i}", logits.detach(), ref, full, torch.float32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_generation_with_left_padding_equals_alone(variant):
    m = twin(model(variant)).double()  # float64: no argmax flips between two orders of summation
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 8, 5)]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    batched = m.generate(ids, 6, temperature=0, attention_mask=mask)
    assert batched.shape == (3, L + 6)
    for i, p in enumerate(prompts):
        alone = m.generate(p[None], 6, temperature=0)
        assert torch.equal(batched[i, L:], alone[0, len(p):]), f"prompt {i}"


def test_generate_right_padding_refused():
    m = model()
    ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left"):
        m.generate(ids, 2, attention_mask=mask)


def test_sampling_seeded_reproducible_and_filters():
    m = model()
    ids = torch.randint(0, VOCAB, (2, 4))
    a = m.generate(ids, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    b = m.generate(ids, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # top_k=1 and a tiny top_p are greedy
    greedy = m.generate(ids, 8, temperature=0)
    assert torch.equal(m.generate(ids, 8, top_k=1, generator=torch.Generator().manual_seed(1)), greedy)
    assert torch.equal(m.generate(ids, 8, top_p=1e-6, generator=torch.Generator().manual_seed(1)), greedy)
    # sampled tokens stay in the top-k set of their step
    m.setup_caches(2, 12)
    logits = m.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    top = logits.topk(5, -1).indices
    assert all(a[i, 4].item() in top[i].tolist() for i in range(2))


def test_eos_stops_and_pads_and_streamer():
    m = model()
    ids = torch.randint(0, VOCAB, (2, 4))
    greedy = m.generate(ids, 8, temperature=0)
    eos = greedy[0, 6].item()  # sequence 0 emits it at its third new token
    seen = []
    out = m.generate(ids, 8, temperature=0, eos_token_id=eos, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])
    first = [(row[4:] == eos).nonzero()[0].item() if (row[4:] == eos).any() else None for row in out]
    for i, f in enumerate(first):
        if f is not None:
            assert (out[i, 4 + f:] == eos).all()
    assert out.shape[1] == 12 or all(f is not None for f in first)


def test_transformers_streamers():
    """A streamer object of transformers' (put / end) gets what HF's generate gives it: the prompt, each token, end();
    a TextStreamer prints the continuation. Anything neither callable nor put / end is a ValueError."""
    from transformers import TextStreamer

    class Letters:  # the one tokenizer method TextStreamer calls
        def decode(self, ids, **kw):
            return "".join(chr(97 + i % 26) for i in ids)

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, t):
            self.calls.append(t.clone())

        def end(self):
            self.calls.append("end")

    m = model()
    ids = torch.randint(0, VOCAB, (1, 4))
    rec = Recorder()
    out = m.generate(ids, 5, temperature=0, streamer=rec)
    assert torch.equal(rec.calls[0], ids) and rec.calls[-1] == "end" and len(rec.calls) == 7
    assert torch.equal(torch.stack(rec.calls[1:-1], 1), out[:, 4:])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        m.generate(ids, 5, temperature=0, streamer=TextStreamer(Letters(), skip_prompt=True))
    assert printed.getvalue() == Letters().decode(out[0, 4:].tolist()) + "\n"
    with pytest.raises(ValueError, match="streamer: expected a callable or an object with put / end"):
        m.generate(ids, 2, streamer=object())


def test_generate_argument_errors():
    m = model()
    ids = torch.randint(0, VOCAB, (1, 4))
    for kw in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            m.generate(ids, 2, **kw)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(ids, 100)
    assert torch.equal(m.generate(ids, 0), ids)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="cuda_graph: needs a model and input_ids on a CUDA device, got cpu"):
        m.generate(ids, 2, cuda_graph=True)  # (gpu_models_check.gpt_generate_cuda_graph runs it on a GPU)


def test_generate_input_errors_and_eos_list():
    """A 1-D or empty prompt and a float top_k: ValueError naming the argument (they were an unpacking error, an
    IndexError and topk's TypeError); eos_token_id as a list (HF's generation_config) stops at any of its ids."""
    m = model()
    ids = torch.randint(0, VOCAB, (2, 4))
    for args, kw, word in (((ids[0], 2), {}, "input_ids"), ((ids[:, :0], 2), {}, "input_ids"),
                           ((ids, 2), dict(top_k=2.0), "top_k"), ((ids, 2), dict(eos_token_id="x"), "eos_token_id"),
                           ((ids, 2), dict(eos_token_id=[3, VOCAB]), r"eos_token_id: \[%d\] not token ids" % VOCAB),
                           ((ids, 2), dict(eos_token_id=-1, num_beams=2, temperature=0), "eos_token_id"),
                           ((ids, 2), dict(eos_token_id=VOCAB, prompt_lookup_num_tokens=2), "eos_token_id")):
        with pytest.raises(ValueError, match=word):  # (an eos id past the vocabulary was an IndexError)
            m.generate(*args, **kw)
    greedy = m.generate(ids, 8, temperature=0)
    a, b = greedy[0, 5].item(), greedy[1, 6].item()  # row 0's second new token, row 1's third
    out = m.generate(ids, 8, temperature=0, eos_token_id=[a, b])
    for i in range(2):
        hit = torch.isin(greedy[i, 4:], torch.tensor([a, b])).nonzero()[0].item()
        assert torch.equal(out[i, :5 + hit], greedy[i, :5 + hit])
        assert (out[i, 5 + hit:] == a).all()
    assert out.shape[1] == 4 + 1 + max(torch.isin(greedy[i, 4:], torch.tensor([a, b])).nonzero()[0].item()
                                       for i in range(2))


def test_generate_after_inference_mode():
    """Caches made under torch.inference_mode are made anew for a generate outside it (writing them raised
    'Inplace update to inference tensor outside InferenceMode')."""
    m = model("llama")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.inference_mode():
        a = m.generate(ids, 4, temperature=0)
    assert torch.equal(m.generate(ids, 4, temperature=0), a)


# ---- saving, parameters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_save_from_pretrained_round_trip(tmp_path, variant):
    m = model(variant)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    back = GPT.from_pretrained(tmp_path)
    assert back.config == m.config
    ids = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(back(ids).logits, m(ids).logits)
    assert (back.lm_head.weight is back.tok_emb.weight) == m.config.tie_embeddings
    assert back.lm_head.weight.is_contiguous()  # row-major: what the decode step's GEMV reads
    th = GPT.from_pretrained(tmp_path, backend="torch")
    assert th.config.backend == "torch"



def test_from_pretrained_bad_weights_name_the_key(tmp_path):
    """A weights file missing a tensor, with a wrong shape or with an unknown name: CheckpointError naming it."""
    from safetensors.torch import load_file, save_file
    from fastattn.models import CheckpointError
    model("gpt2").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)
    for state, match in [({k: v for k, v in good.items() if k != "blocks.1.mlp.w_out.weight"},
                          r"missing weights: blocks\.1\.mlp\.w_out\.weight"),
                         ({**good, "blocks.0.norm1.weight": torch.ones(3)}, r"blocks\.0\.norm1\.weight has shape"),
                         ({**good, "extra.weight": torch.ones(2)}, r"does not have: extra\.weight")]:
        save_file(state, file)
        with pytest.raises(CheckpointError, match=match):
            GPT.from_pretrained(tmp_path)
    file.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        GPT.from_pretrained(tmp_path)

def test_parameter_split():
    for variant in ("gpt2", "llama"):
        m = model(variant)
        backbone, head = m.backbone_parameters(), m.head_parameters()
        assert m.num_parameters() == sum(p.numel() for p in backbone) + sum(p.numel() for p in head)
        assert (len(head) == 0) == m.config.tie_embeddings
        for p in backbone:
            p.requires_grad_(False)
        assert m.num_parameters(trainable_only=True) == sum(p.numel() for p in head)


def test_decode_step_traces_under_torch_compile():
    """decode_one has static shapes and no graph break: dynamo traces it whole (backend "eager": no compiler needed
    here), and the traced step gives the eager step's logits, token after token, with no recompilation."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    eager = model("llama")
    traced = twin(eager)
    ids = torch.randint(0, VOCAB, (2, 5))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, :2] = False
    for m in (eager, traced):
        m.setup_caches(2, 12)
    tok = eager.prefill(ids, keep).argmax(-1, keepdim=True)
    traced.prefill(ids, keep)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(traced.decode_one, backend=counter, fullgraph=True)
    with torch.no_grad():
        for t in range(5, 11):
            pos = eager.cache_index[t:t + 1]
            a, b = eager.decode_one(tok, pos), step(tok, traced.cache_index[t:t + 1])
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            tok = a.argmax(-1, keepdim=True)
    assert counter.frame_count == 1


def test_loaded_models_come_back_in_eval_mode(tmp_path):
    """As transformers' from_pretrained: a loaded model is in eval mode (generate's bound decode step and no
    dropout), for our own format and for an HF import."""
    from transformers import GPT2Config, GPT2LMHeadModel
    m = model(dropout=0.1)
    m.save_pretrained(tmp_path / "ours")
    assert not GPT.from_pretrained(tmp_path / "ours").training
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32)).save_pretrained(
        tmp_path / "hf")
    assert not GPT.from_hf(tmp_path / "hf").training


def test_generate_from_several_threads_takes_turns():
    """generate keeps its KV caches on the model: threads generating with one model at once wrote over each other's
    caches (wrong tokens, no error). Now they take turns: each gets its sequential output; a generate re-entered from
    its own streamer raises instead of overwriting the caches in use."""
    import threading

    from fastattn.models import Seq2Seq, Seq2SeqConfig
    gpt = model()
    torch.manual_seed(1)
    s2s = Seq2Seq(Seq2SeqConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, max_seq_len=64)).eval()
    prompts = [torch.randint(0, VOCAB, (2, 3 + i)) for i in range(4)]
    calls = [(gpt, p, dict(temperature=0)) for p in prompts] + [(s2s, p, dict(temperature=0)) for p in prompts] + \
        [(gpt, p, dict(temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(i)))
         for i, p in enumerate(prompts)]
    alone = [m.generate(p, 12, **kw) for m, p, kw in calls]
    for _, _, kw in calls:  # a fresh generator per run
        if "generator" in kw:
            kw["generator"].manual_seed(kw["generator"].initial_seed())
    got = [None] * len(calls)

    def run(i):
        m, p, kw = calls[i]
        got[i] = m.generate(p, 12, **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, got):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="already generating in this thread"):
        gpt.generate(prompts[0], 3, temperature=0, streamer=lambda tokens: gpt.generate(prompts[1], 2))
    assert torch.equal(gpt.generate(prompts[0], 12, temperature=0), alone[0])  # the model is free again


@pytest.mark.parametrize("kw", [{}, dict(n_kv_head=1)], ids=["mha", "gqa"])
def test_an_empty_batch_as_the_torch_backend(kw):
    """A batch of 0 rows: (0, L, V) logits and a loss, as the torch backend gives (the packed Q/K/V heads' view
    took its head count as -1, which 0 elements leave undecided)."""
    ids = torch.zeros(0, 5, dtype=torch.long)
    for backend in ("fastattn", "torch"):
        model = GPT(tiny(backend=backend, **kw))
        assert model(ids).logits.shape == (0, 5, model.config.vocab_size)
        assert model(ids, labels=ids).loss.isnan()  # (a mean over no token, as torch's cross_entropy)
