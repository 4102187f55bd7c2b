"""fastattn.hugepages: CPU weights and KV caches in 2 MiB-aligned, MADV_HUGEPAGE mappings where THP is on madvise."""
import copy
import pickle

import pytest
import torch
from torch import nn

from fastattn import hugepages
from fastattn.models import GPT, GPTConfig

needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason="transparent huge pages are not on 'madvise' here")
BIG = (1024, 1024)  # 4 MiB of float32


def _thp_eligible(t):
    """The THPeligible line of /proc/self/smaps for the mapping holding t's memory."""
    addr = t.data_ptr()
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "THPeligible:":
                return line.split()[1] == "1"
    pytest.skip("no THPeligible field in /proc/self/smaps")


@needs_thp
def test_empty_is_aligned_and_advised():
    t = hugepages.empty(BIG, torch.float32)
    assert t.shape == BIG and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    assert _thp_eligible(t)
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()


def test_small_or_disabled_is_plain(monkeypatch):
    small = hugepages.empty((4, 4), torch.float32)
    assert small.untyped_storage().resizable()
    monkeypatch.setenv("FASTATTN_HUGEPAGES", "0")
    assert not hugepages.enabled()
    assert hugepages.empty(BIG, torch.float32).untyped_storage().resizable()
    assert torch.equal(hugepages.zeros(BIG, torch.float32), torch.zeros(BIG))


@needs_thp
def test_place_keeps_identity_ties_values_and_views():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(4, 4))
    m[1].weight = m[0].weight  # tied
    base = torch.randn(2048, 1024)
    m.register_buffer("view", base[:1024])  # a view of a larger tensor: left where it is
    m.register_buffer("buf", torch.randn(BIG))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.parameters())
    assert hugepages.place(m) is m
    assert list(m.parameters()) == params  # the same Parameter objects
    assert m[1].weight is m[0].weight
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m[0].weight.data_ptr() % hugepages.HUGE_PAGE == 0 and _thp_eligible(m[0].weight)
    assert m.buf.data_ptr() % hugepages.HUGE_PAGE == 0
    assert m.view.data_ptr() == base.data_ptr()
    assert m[2].weight.untyped_storage().resizable()  # small: untouched
    ptr = m[0].weight.data_ptr()
    hugepages.place(m)  # idempotent
    assert m[0].weight.data_ptr() == ptr
    # an ordinary CPU tensor otherwise: training, copies, pickling, sharing
    m[0](torch.randn(2, 1024)).sum().backward()
    assert m[0].weight.grad is not None
    assert torch.equal(copy.deepcopy(m)[0].weight, m[0].weight)
    assert torch.equal(pickle.loads(pickle.dumps(m[0].weight.detach())), m[0].weight)
    m[0].weight.detach().share_memory_()


@needs_thp
def test_models_place_weights_and_cache(tmp_path):
    cfg = GPTConfig(vocab_size=2048, d_model=256, n_layer=1, n_head=4, max_seq_len=1024)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    m.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.tok_emb.weight.data_ptr() % hugepages.HUGE_PAGE == 0  # 2 MiB
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    ids = torch.randint(0, 2048, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits, rtol=0, atol=0)
    loaded.setup_caches(2, 1024)  # 1 x 2 x 4 x 1024 x 64 float32 = 2 MiB per tensor
    cache = loaded.blocks[0].attn.cache
    assert cache.k.data_ptr() % hugepages.HUGE_PAGE == 0 and not cache.k.any()
    out = loaded.generate(ids, 4, temperature=0)
    assert torch.equal(out, m.generate(ids, 4, temperature=0))
