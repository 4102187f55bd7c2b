"""The bound decode step (fastattn/models/decode_step.py, what generate runs) against the modules' decode_one, token
by token from the same prefill, with the same tokens fed: GPT variants (learned / rotary / sinusoidal positions, pre-
and post-norm, LayerNorm / RMSNorm, GELU / SwiGLU, MHA / GQA / MQA), caches long enough for the split-KV kernel and
too short for it, left-padded batches, INT8 models, Seq2Seq with cross-attention; the error (fp32) bounded by
decode_one's own against the float64 model. And the models it must leave to the modules."""
import logging

import pytest
import torch
from torch import nn

import fastattn
from conftest import assert_bounded
from fastattn.models import GPT, GPTConfig, Seq2Seq, Seq2SeqConfig
from fastattn.models.decode_step import DecodeStep

VOCAB = 61
GPT_VARIANTS = {
    "gpt2": dict(),
    "llama": dict(pos="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    "mqa-postnorm-sinusoidal": dict(n_kv_head=1, norm_first=False, pos="sinusoidal", activation="relu"),
}
S2S_VARIANTS = {
    "bart": dict(),
    "prenorm-rotary-swiglu-gqa": dict(norm_first=True, pos="rotary", mlp="swiglu", norm="rmsnorm", n_kv_head=2,
                                      embed_norm=False, bias=False),
    "t5-relative": dict(norm_first=True, pos="none", norm="rmsnorm", mlp="geglu", activation="gelu_tanh",
                        embed_norm=False, bias=False, attn_scale=1.0, relative_buckets=8, relative_max_distance=12),
}
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=64)


def _twin(m, **kw):
    other = type(m)(type(m.config).from_dict({**m.config.to_dict(), **kw})).eval()
    other.load_state_dict(m.state_dict())
    return other


def _gpt(variant, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **GPT_VARIANTS[variant], **kw})).eval()


def _gpt_steps(m, seq, keep, cache_len, bound):
    """Logits of prefill(seq[:, :P]) and then one decode step per later token of seq (fed, not sampled)."""
    P = keep.shape[1]
    with torch.no_grad():
        m.setup_caches(seq.shape[0], cache_len)
        out = [m.prefill(seq[:, :P], keep)]
        step = m.bound_decode_one() if bound else m.decode_one
        assert isinstance(step, DecodeStep) == bound
        for t in range(P, seq.shape[1]):
            out.append(step(seq[:, t:t + 1], m.cache_index[t:t + 1]))
    return torch.stack(out), step


@pytest.mark.parametrize("cache_len", [16, 40], ids=["flash-path", "split-kv"])
@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
def test_gpt_bound_step_equals_decode_one(variant, cache_len):
    m = _gpt(variant)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, VOCAB, (2, 14), generator=g)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, :3] = False  # the second prompt is left-padded
    bound, step = _gpt_steps(m, seq, keep, cache_len, True)
    routed = step.blocks[0].attn.kernel is not None
    assert routed == (cache_len >= 32), "the split-KV kernel runs exactly where fastattn.attention would route"
    modules, _ = _gpt_steps(m, seq, keep, cache_len, False)
    ref, _ = _gpt_steps(_twin(m).double(), seq, keep, cache_len, False)
    assert_bounded(variant, bound, ref, modules, torch.float32)
    assert torch.equal(bound.argmax(-1), modules.argmax(-1))


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_quantized_gpt_bound_step_equals_decode_one(mode):
    """Int8Linear bound: the same kernels on the same rows, so the same logits up to the float head's order of sums."""
    m = fastattn.quantize(_gpt("gpt2", tie_embeddings=False), mode=mode)
    seq = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    keep = torch.ones(1, 5, dtype=torch.bool)
    bound, _ = _gpt_steps(m, seq, keep, 40, True)
    modules, _ = _gpt_steps(m, seq, keep, 40, False)
    torch.testing.assert_close(bound, modules, rtol=1e-5, atol=1e-5)


def test_generate_runs_the_bound_step_and_matches_the_modules(monkeypatch):
    m = _gpt("llama")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    fast = m.generate(prompt, 30, temperature=0)
    monkeypatch.setattr(GPT, "bound_decode_one", lambda self: self.decode_one)
    assert torch.equal(fast, m.generate(prompt, 30, temperature=0))


@pytest.mark.parametrize("variant", list(S2S_VARIANTS))
@pytest.mark.parametrize("src_len", [9, 36], ids=["flash-path", "split-kv"])
def test_seq2seq_bound_step_equals_decode_one(variant, src_len):
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(**SMALL, **S2S_VARIANTS[variant])).eval()
    g = torch.Generator().manual_seed(4)
    src, tgt = torch.randint(3, VOCAB, (2, src_len), generator=g), torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(src)
    mask[1, src_len - 4:] = 0

    def steps(model, bound):
        with torch.no_grad():
            model.setup_caches(2, 40)
            out = [model.prefill(src, mask, tgt[:, :1])]
            step = model.bound_decode_one() if bound else model.decode_one
            assert isinstance(step, DecodeStep) == bound
            if bound:
                assert (step.blocks[0].cross.kernel is not None) == (src_len >= 32)
            for t in range(1, tgt.shape[1]):
                out.append(step(tgt[:, t:t + 1], model.cache_index[t:t + 1]))
        return torch.stack(out)

    bound, modules, ref = steps(m, True), steps(m, False), steps(_twin(m).double(), False)
    assert_bounded(variant, bound, ref, modules, torch.float32)


class _Wrapped(nn.Module):
    """A linear layer of a type the binder does not know (as a LoRA wrapper is): it runs its own forward."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.0


def test_unknown_linear_runs_its_own_forward_inside_the_bound_step():
    m = _gpt("gpt2")
    seq = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    keep = torch.ones(1, 4, dtype=torch.bool)
    modules, _ = _gpt_steps(m, seq, keep, 40, False)
    m.blocks[1].mlp.w_out = _Wrapped(m.blocks[1].mlp.w_out)
    bound, _ = _gpt_steps(m, seq, keep, 40, True)
    torch.testing.assert_close(bound, modules, rtol=1e-5, atol=1e-5)


def test_not_bound_where_the_modules_must_run(caplog):
    caplog.set_level(logging.DEBUG, logger="fastattn")
    m = _gpt("gpt2")
    m.setup_caches(1, 8)
    m.prefill(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    assert isinstance(m.bound_decode_one(), DecodeStep)
    m.train()
    assert m.bound_decode_one() == m.decode_one and "training mode" in caplog.text
    m.eval()
    handle = m.blocks[0].attn.register_forward_hook(lambda *a: None)
    assert m.bound_decode_one() == m.decode_one and "forward hook" in caplog.text
    handle.remove()
    th = _twin(m, backend="torch")
    th.setup_caches(1, 8)
    assert th.bound_decode_one() == th.decode_one and "backend 'torch'" in caplog.text
