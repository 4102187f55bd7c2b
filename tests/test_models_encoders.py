"""fastattn.models.BERT / BERTForSequenceClassification and Seq2Seq on tiny configs: fastattn and torch backends over
training steps, padding that does not change the real tokens' outputs, Seq2Seq KV-cache decoding against the full
forward token by token (fp32, bounded by the full forward's own error against float64), batched generation with
padded sources against each source alone, save / from_pretrained, freezing the backbone."""
import pytest
import torch

from conftest import assert_bounded
from fastattn.models import BERT, BERTConfig, BERTForSequenceClassification, Seq2Seq, Seq2SeqConfig

VOCAB = 53
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=48)
S2S = {
    "bart": dict(),
    "prenorm-rotary-swiglu-gqa": dict(norm_first=True, pos="rotary", mlp="swiglu", norm="rmsnorm", n_kv_head=2,
                                      embed_norm=False, n_decoder_layer=3, bias=False),
    "postnorm-sinusoidal-mqa": dict(norm_first=False, pos="sinusoidal", n_kv_head=1, tie_embeddings=False),
    "t5-relative": dict(norm_first=True, pos="none", norm="rmsnorm", mlp="geglu", activation="gelu_tanh",
                        embed_norm=False, bias=False, attn_scale=1.0, relative_buckets=8, relative_max_distance=12),
}


def _twin(cls, m, **kw):
    other = cls(type(m.config).from_dict({**m.config.to_dict(), **kw})).eval()
    other.load_state_dict(m.state_dict())
    return other


def _train_steps(models, batch, steps=3):
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in models]
    for _ in range(steps):
        losses = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def _ids(B, L, seed, low=0):
    return torch.randint(low, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


# ---- BERT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(norm_first=True, n_kv_head=2)])
def test_bert_backends_match_over_training_steps(kw):
    torch.manual_seed(0)
    fa = BERT(BERTConfig(**SMALL, **kw)).train()
    th = _twin(BERT, fa, backend="torch").train()
    ids = _ids(3, 10, 1)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=(torch.arange(10) >= 5).long().expand(3, 10),
                 labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    _train_steps([fa, th], batch)


def test_bert_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    m = BERT(BERTConfig(**SMALL)).eval()
    ids = _ids(1, 7, 2)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(m(padded, mask).logits[:, :7], m(ids).logits, rtol=1e-5, atol=1e-5)


def test_bert_classifier_and_frozen_backbone(tmp_path):
    torch.manual_seed(0)
    clf = BERTForSequenceClassification(BERTConfig(**SMALL, num_labels=3))
    for p in clf.backbone_parameters():
        p.requires_grad_(False)
    out = clf(_ids(2, 8, 3), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is None for p in clf.encoder.parameters())
    assert clf.classifier.weight.grad is not None
    clf.save_pretrained(tmp_path)
    back = BERTForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(back(_ids(2, 8, 3)).logits, clf.eval()(_ids(2, 8, 3)).logits)
    reg = BERTForSequenceClassification(BERTConfig(**SMALL, num_labels=1))
    assert reg(_ids(2, 8, 3), labels=torch.tensor([0.5, -1.0])).loss.ndim == 0


def test_bert_config_errors_name_the_field():
    for kw, field in ((dict(pooling="max"), "pooling"), (dict(pooler_norm=1), "pooler_norm"),
                      (dict(first_input_norm=False), "first_input_norm"),  # needs norm_first
                      (dict(sliding_window=0), "sliding_window"),
                      (dict(rel_pos_buckets=8, relative_buckets=8), "relative_buckets"),  # one scheme at a time
                      (dict(rel_pos_buckets=4, rel_pos_max=16, n_kv_head=1), "n_kv_head"),  # (was a shape error)
                      (dict(shared_layers=1), "shared_layers")):
        with pytest.raises(ValueError, match=f"BERTConfig.{field}"):
            BERTConfig(**SMALL, **kw)


@pytest.mark.parametrize("cls, kw, field", [
    (BERTConfig, dict(num_labels=0), "num_labels"),
    (BERTConfig, dict(type_vocab_size=-1), "type_vocab_size"),  # 0 is DistilBERT's: no token types
    (BERTConfig, dict(pad_token_id=VOCAB), "pad_token_id"),
    (Seq2SeqConfig, dict(n_decoder_layer=-1), "n_decoder_layer"),  # was a decoder of no layers, silently
    (Seq2SeqConfig, dict(pad_token_id=-1), "pad_token_id"),
    (Seq2SeqConfig, dict(decoder_start_token_id=VOCAB), "decoder_start_token_id"),
])
def test_encoder_configs_name_the_bad_field(cls, kw, field):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
        cls(**SMALL, **kw)


# ---- Seq2Seq --------------------------------------------------------------------------------------------------
def _s2s(variant, seed=0):
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(**SMALL, **S2S[variant])).eval()


@pytest.mark.parametrize("variant", list(S2S))
def test_seq2seq_backends_match_over_training_steps(variant):
    fa = _s2s(variant).train()
    th = _twin(Seq2Seq, fa, backend="torch").train()
    src, tgt = _ids(3, 9, 4, low=3), _ids(3, 7, 5, low=3)
    mask = torch.ones_like(src)
    mask[2, 5:] = 0
    tgt[1, 5:] = -100
    _train_steps([fa, th], dict(input_ids=src, attention_mask=mask, labels=tgt))


@pytest.mark.parametrize("variant", list(S2S))
def test_seq2seq_kv_cache_decode_equals_full_forward(variant):
    m = _s2s(variant)
    m64 = _twin(Seq2Seq, m).double()
    src, tgt = _ids(2, 9, 6, low=3), _ids(2, 10, 7, low=3)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0
    m.setup_caches(2, tgt.shape[1])
    steps = [m.prefill(src, mask, tgt[:, :1])]
    for t in range(1, tgt.shape[1]):
        steps.append(m.decode_one(tgt[:, t:t + 1], m.cache_index[t:t + 1]))
    with torch.no_grad():
        for t, logits in enumerate(steps):
            full = m(src, mask, decoder_input_ids=tgt[:, :t + 1]).logits[:, -1]
            ref = m64(src, mask, decoder_input_ids=tgt[:, :t + 1]).logits[:, -1]
            assert_bounded(f"step {t}", logits.detach(), ref, full, torch.float32)


@pytest.mark.parametrize("variant", ["bart", "prenorm-rotary-swiglu-gqa"])
def test_seq2seq_batched_generation_equals_alone(variant):
    m = _twin(Seq2Seq, _s2s(variant)).double()
    srcs = [_ids(1, n, 8 + n, low=3)[0] for n in (4, 9, 6)]
    S = max(len(s) for s in srcs)
    ids = torch.full((3, S), m.config.pad_token_id)
    mask = torch.zeros(3, S, dtype=torch.long)
    for i, s in enumerate(srcs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    batched = m.generate(ids, 7, temperature=0, attention_mask=mask, eos_token_id=None)  # (every row 7 tokens)
    assert batched.shape == (3, 8) and (batched[:, 0] == m.config.decoder_start_token_id).all()
    for i, s in enumerate(srcs):
        assert torch.equal(batched[i], m.generate(s[None], 7, temperature=0, eos_token_id=None)[0]), f"source {i}"
    assert m.memory_kv is None  # the cross-attention K/V are dropped after generation


def test_seq2seq_sampling_eos_streamer_and_save(tmp_path):
    m = _s2s("bart")
    src = _ids(2, 6, 9, low=3)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = m.generate(src, 6, top_p=0.9, generator=g())
    assert torch.equal(a, m.generate(src, 6, top_p=0.9, generator=g()))
    greedy = m.generate(src, 6, temperature=0, eos_token_id=None)
    eos = greedy[0, 2].item()
    seen = []
    out = m.generate(src, 6, temperature=0, eos_token_id=eos, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 1:])
    assert (out[0, 2:] == eos).all()
    m.save_pretrained(tmp_path)
    back = Seq2Seq.from_pretrained(tmp_path)
    assert back.config == m.config and torch.equal(back.generate(src, 6, temperature=0, eos_token_id=None), greedy)
    assert m.config.n_decoder_layer == 2 and Seq2SeqConfig.from_dict(m.config.to_dict()) == m.config


def test_seq2seq_generate_after_inference_mode_and_bad_source():
    m = _s2s("prenorm-rotary-swiglu-gqa")
    src = _ids(2, 6, 9, low=3)
    with torch.inference_mode():
        a = m.generate(src, 4, temperature=0)
    assert torch.equal(m.generate(src, 4, temperature=0), a)  # the inference-mode caches are made anew
    with pytest.raises(ValueError, match="input_ids"):
        m.generate(src[0], 4)
    with pytest.raises(ValueError, match="cuda_graph: needs a model and input_ids on a CUDA device, got cpu"):
        m.generate(src, 4, cuda_graph=True)  # (gpu_models_check.gpt_generate_cuda_graph runs it on a GPU)


def test_seq2seq_needs_decoder_inputs_or_labels():
    with pytest.raises(ValueError, match="decoder_input_ids"):
        _s2s("bart")(_ids(1, 4, 0))


@pytest.mark.parametrize("cls", [BERT, Seq2Seq])
def test_embed_scale_scales_the_token_embeddings(cls):
    """embed_scale (mBART's sqrt(d_model)) multiplies the token embeddings: the same as doubled embedding weights
    (the LM head untied). It was a config field BERT and Seq2Seq ignored."""
    cfg = dict(SMALL, tie_embeddings=False)
    m = cls(cls.config_class(**cfg)).eval()
    scaled = _twin(cls, m, embed_scale=2.0)
    with torch.no_grad():
        m.state_dict()[[k for k in m.state_dict() if k.endswith("tok_emb.weight")][0]].mul_(2.0)
    ids = _ids(2, 6, 0)
    kw = {"decoder_input_ids": _ids(2, 4, 1)} if cls is Seq2Seq else {}
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids, **kw).logits, m(ids, **kw).logits)


@pytest.mark.parametrize("cls", ["GPT", "BERT", "Seq2Seq"])
def test_token_ids_outside_the_vocabulary_and_empty_rows_name_input_ids(cls):
    """An id outside the embedding table (F.embedding's bare IndexError on the CPU) and a (B, 0) batch (a reshape
    error inside attention): ValueError naming input_ids, for every model."""
    from fastattn.models import GPT, GPTConfig
    make = {"GPT": lambda: GPT(GPTConfig(**SMALL)), "BERT": lambda: BERT(BERTConfig(**SMALL)),
            "Seq2Seq": lambda: Seq2Seq(Seq2SeqConfig(**SMALL))}[cls]
    m = make().eval()
    for bad in (VOCAB, -1):
        ids = torch.tensor([[1, 2, bad, 3]])
        with pytest.raises(ValueError,
                           match=rf"^input_ids: token ids must be in \[0, vocab_size={VOCAB}\), got \[{bad}\]"):
            m(ids, decoder_input_ids=ids[:, :2].clamp(0)) if cls == "Seq2Seq" else m(ids)
    empty, ids = torch.zeros(2, 0, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^input_ids: expected at least one token a row, got shape \(2, 0\)"):
        m(empty, decoder_input_ids=ids) if cls == "Seq2Seq" else m(empty)
    if cls == "Seq2Seq":
        with pytest.raises(ValueError, match=r"^decoder_input_ids: expected at least one token a row"):
            m(ids, decoder_input_ids=empty)
        with pytest.raises(ValueError, match=rf"^decoder_input_ids: token ids must be in \[0, vocab_size={VOCAB}\)"):
            m(ids, decoder_input_ids=torch.tensor([[1, VOCAB], [2, 3]]))


@pytest.mark.parametrize("cls", ["GPT", "BERT", "Seq2Seq"])
def test_gradient_checkpointing_same_gradients_less_saved(cls):
    """gradient_checkpointing_enable (transformers' name): in training every block runs under torch.utils.checkpoint,
    recomputed in the backward with the same dropout masks: the same loss and gradients as without, and far fewer
    bytes kept for the backward. disable() turns it off; eval and no_grad never checkpoint."""
    from fastattn.models import GPT, GPTConfig
    make = {"GPT": lambda: GPT(GPTConfig(**SMALL, dropout=0.2)), "BERT": lambda: BERT(BERTConfig(**SMALL, dropout=0.2)),
            "Seq2Seq": lambda: Seq2Seq(Seq2SeqConfig(**SMALL, dropout=0.2))}[cls]
    torch.manual_seed(0)
    m = make().train()
    ids = torch.randint(0, VOCAB, (2, 24))
    batch = dict(input_ids=ids, labels=ids)
    if cls == "Seq2Seq":
        batch["labels"] = ids[:, :10]

    def step():
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(**batch).loss
        m.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None], sum(saved)

    loss, grads, kept = step()
    assert not m.is_gradient_checkpointing
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    loss_c, grads_c, kept_c = step()
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert len(grads_c) == len(grads)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert kept_c < 0.6 * kept, (kept_c, kept)
    m.gradient_checkpointing_disable()
    assert not m.is_gradient_checkpointing and step()[2] == kept
    with pytest.raises(ValueError, match="use_reentrant=True cannot pass the blocks' keyword arguments"):
        m.gradient_checkpointing_enable({"use_reentrant": True})
