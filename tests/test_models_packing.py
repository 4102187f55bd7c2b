"""GPT on packed sequences (position_ids restarting, no attention mask: padding-free training): every sequence of a
packed row gives what it gives alone (fastattn and torch backends, fp64), gradients included; transformers'
DataCollatorWithFlattening batches train as the separate sequences would; torch.compile; bad position_ids."""
import pytest
import torch

from fastattn.models import GPT, GPTConfig
from fastattn.models.packing import packing_of

LENS = [5, 7, 1, 11]
CONFIGS = {
    "learned": dict(),
    "rotary-gqa-window": dict(pos="rotary", n_kv_head=2, sliding_window=3),
    "alibi-softcap": dict(pos="alibi", attn_softcap=5.0),
}


def model(backend="fastattn", **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=32, backend=backend, **kw)
    return GPT(cfg).double()


def packed_batch(lens=LENS, rows=1, seed=0):
    """rows rows of the sequences of lens packed back to back: ids, position_ids (B, T), and the sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in lens]
    ids = torch.cat(seqs)[None].repeat(rows, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None].repeat(rows, 1)
    return ids, pos, seqs


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
@pytest.mark.parametrize("config", CONFIGS)
def test_packed_rows_equal_sequences_alone(backend, config):
    m = model(backend, **CONFIGS[config])
    ids, pos, seqs = packed_batch(rows=2)
    with torch.no_grad():
        got = m(ids, position_ids=pos).logits
        alone = torch.cat([m(s[None]).logits for s in seqs], 1)
    torch.testing.assert_close(got, alone.expand_as(got), rtol=1e-10, atol=1e-10)


def test_packing_found_from_positions():
    ids, pos, _ = packed_batch()
    p = packing_of(pos)
    assert p.cu_seqlens.tolist() == [0, 5, 12, 13, 24] and p.max_len == 11
    assert packing_of(torch.arange(9)[None] + 3) is None  # one sequence a row (any start): no packing


def test_packed_gradients_equal_sequences_alone():
    m = model(**CONFIGS["rotary-gqa-window"])
    ids, pos, seqs = packed_batch()
    m(ids, position_ids=pos).logits.square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    sum(m(s[None]).logits.square().sum() for s in seqs).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-9, msg=n)


def test_flattening_collator_batches_train_as_separate_sequences():
    """transformers' DataCollatorWithFlattening: one row, position_ids restarting, -100 on each first label. The loss
    is the token-weighted mean of the sequences' own next-token losses."""
    transformers = pytest.importorskip("transformers")
    m = model()
    _, _, seqs = packed_batch()
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs])
    got = m(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
    losses = [(m(s[None], labels=s[None]).loss * (len(s) - 1)) for s in seqs if len(s) > 1]
    torch.testing.assert_close(got, sum(losses) / sum(len(s) - 1 for s in seqs), rtol=1e-10, atol=1e-10)


def test_compile_takes_the_block_diagonal_path():
    """Under torch.compile the offsets cannot be read: a block-diagonal mask, the same logits."""
    m = model(**CONFIGS["learned"])
    ids, pos, _ = packed_batch()
    with torch.no_grad():
        want = m(ids, position_ids=pos).logits
        torch._dynamo.reset()
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_position_ids_with_padding_are_positions_only():
    """With an attention_mask, position_ids are the positions as given (no packing), as in transformers."""
    m = model()
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        want = m(ids).logits
        got = m(ids, attention_mask=torch.ones(1, 6, dtype=torch.long), position_ids=torch.arange(6)[None]).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pos, match", [
    (torch.zeros(1, 6), "position_ids: expected an integer tensor"),
    (torch.zeros(1, 5, dtype=torch.long), "position_ids: expected an integer tensor"),
    (torch.full((1, 6), 32), r"position_ids: expected values in \[0, max_seq_len=32\)"),
    (torch.full((1, 6), -1), "position_ids: expected values in"),
])
def test_bad_position_ids(pos, match):
    with pytest.raises(ValueError, match=match):
        model()(torch.zeros(1, 6, dtype=torch.long), position_ids=pos)


# ---- Seq2Seq: packed (source, target) pairs: encoder and decoder packed, target n reading source n ---------------
def seq2seq(backend="fastattn", **kw):
    from fastattn.models import Seq2Seq, Seq2SeqConfig
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(vocab_size=60, d_model=32, n_layer=2, n_decoder_layer=2, n_head=4, max_seq_len=40,
                        backend=backend, **kw)
    return Seq2Seq(cfg).double()


def packed_pairs(model, rows=2):
    g = torch.Generator().manual_seed(1)
    src = [torch.randint(3, 60, (n,), generator=g) for n in (5, 9, 2)]
    tgt = [torch.randint(3, 60, (n,), generator=g) for n in (4, 1, 7)]
    dec = [torch.cat([torch.tensor([model.config.decoder_start_token_id]), t[:-1]]) for t in tgt]
    row = dict(input_ids=torch.cat(src), decoder_input_ids=torch.cat(dec), labels=torch.cat(tgt),
               position_ids=torch.cat([torch.arange(len(s)) for s in src]),
               decoder_position_ids=torch.cat([torch.arange(len(t)) for t in tgt]))
    return {k: v[None].repeat(rows, 1) for k, v in row.items()}, list(zip(src, dec, tgt))


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
@pytest.mark.parametrize("positions", ["learned", "t5-relative"])
def test_seq2seq_packed_pairs_equal_pairs_alone(backend, positions):
    m = seq2seq(backend, **({} if positions == "learned" else dict(relative_buckets=8, pos="none"))).eval()
    batch, pairs = packed_pairs(m)
    with torch.no_grad():
        got = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = torch.cat([m(s[None], decoder_input_ids=d[None]).logits for s, d, _ in pairs], 1)
    torch.testing.assert_close(got, alone.expand_as(got), rtol=1e-10, atol=1e-10)


def test_seq2seq_packed_gradients_and_loss():
    """The packed batch's loss is the token-weighted mean of the pairs' own; so are the gradients (cross-attention
    through attention_varlen with the sources' and targets' offsets)."""
    m = seq2seq().train()
    batch, pairs = packed_pairs(m, rows=1)
    loss = m(**batch).loss
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    total = sum(len(t) for _, _, t in pairs)
    want = sum(m(s[None], decoder_input_ids=d[None], labels=t[None]).loss * len(t) for s, d, t in pairs) / total
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-9, msg=n)


def test_seq2seq_packed_under_compile():
    m = seq2seq().eval()
    batch, _ = packed_pairs(m)
    del batch["labels"]
    with torch.no_grad():
        want = m(**batch).logits
        torch._dynamo.reset()
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_seq2seq_packed_bad_input():
    m = seq2seq().eval()
    batch, _ = packed_pairs(m, rows=1)
    with pytest.raises(ValueError, match="give both"):
        m(**{k: v for k, v in batch.items() if k != "decoder_position_ids"})
    with pytest.raises(ValueError, match="decoder_input_ids: needed with position_ids"):
        m(**{k: v for k, v in batch.items() if k != "decoder_input_ids"})
    with pytest.raises(ValueError, match="take no attention_mask"):
        m(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    two_targets = batch["decoder_position_ids"].clone()
    two_targets[0, 4] = 4  # the second target joins the first: 2 targets for 3 sources
    with pytest.raises(ValueError, match=r"as many targets as sources, got \[3\] sources and \[2\] targets"):
        m(**{**batch, "decoder_position_ids": two_targets})


def test_packed_rows_on_the_meta_device():
    """Shapes only (a model built under torch.device("meta")): packed rows take the block-diagonal path, as under
    torch.compile, since no offset can be read there."""
    with torch.device("meta"):
        m = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=32))
    ids, pos, _ = packed_batch(rows=2)
    out = m(ids.to("meta"), position_ids=pos.to("meta"), labels=ids.to("meta"))
    assert out.loss.device.type == "meta" and out.loss.shape == ()
