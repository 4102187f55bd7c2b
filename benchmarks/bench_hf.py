"""pytest-benchmark: HF transformers models with attn_implementation="fastattn" against "sdpa" (torch's attention),
same weights, same run. BERT-base sized encoder forward (CPU: fp32, batch 8 x 128; GPU: bf16, batch 32 x 512),
unpadded and with right padding (a quarter of each row but the first); "fastattn+convert" also swaps the
LayerNorms (fastattn.convert). On GPU also a Llama-style 1B config's prefill (GQA, causal; bf16, 2 x 2048). A small
Llama's training step on one row of packed sequences (padding-free training): "sdpa" on transformers' full mask
against "fastattn" on attention_varlen.
Random weights from configs: no hub. Skipped without transformers."""
import copy

import pytest
import torch

import fastattn
import fastattn.hf
from fastattn.testing import sync

transformers = pytest.importorskip("transformers")
fastattn.hf.register()  # before any model class loads (see fastattn.hf._installed_kernels_package)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH, SEQLEN = (32, 512) if GPU else (8, 128)
ROUNDS = 10 if GPU else 5
IMPLS = ["torch-sdpa", "fastattn", "fastattn+convert"]


def _model(cls, cfg):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = cls(cfg).to(DTYPE).eval()
    converted = copy.deepcopy(model)
    fastattn.convert(converted)
    return model, converted


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, max_position_embeddings=512)
    return _model(transformers.BertModel, cfg)


@pytest.fixture(scope="module")
def llama_1b():
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                                   vocab_size=32000)
    return _model(transformers.LlamaModel, cfg)


def run(benchmark, models, impl, ids, mask, group, info):
    plain, converted = models
    model = converted if impl == "fastattn+convert" else plain
    model.set_attn_implementation("sdpa" if impl == "torch-sdpa" else "fastattn")

    def step():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        sync(DEVICE)

    benchmark.group = group
    benchmark.extra_info.update(info, impl=impl, device=DEVICE, dtype=str(DTYPE)[6:])
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain run of each step)
        benchmark.extra_info["tokens/s"] = ids.numel() / benchmark.stats.stats.median


def _inputs(vocab, B, L, padded):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, L), generator=g).to(DEVICE)
    mask = torch.ones(B, L, dtype=torch.long, device=DEVICE)
    if padded:
        mask[1:, L - L // 4:] = 0
    return ids, mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_bert_base_forward(benchmark, bert, impl, padded):
    ids, mask = _inputs(bert[0].config.vocab_size, BATCH, SEQLEN, padded)
    run(benchmark, bert, impl, ids, mask, f"hf bert-base fwd {'padded' if padded else 'full'} {BATCH}x{SEQLEN}",
        dict(op=f"hf-bert-base-{'padded' if padded else 'full'}", direction="fwd", width=SEQLEN, batch=BATCH))


@pytest.mark.skipif(not GPU, reason="a 1B model's prefill takes minutes on the CPU")
@pytest.mark.parametrize("impl", IMPLS)
def test_llama_1b_prefill(benchmark, llama_1b, impl):
    B, L = 2, 2048
    ids, mask = _inputs(llama_1b[0].config.vocab_size, B, L, False)
    run(benchmark, llama_1b, impl, ids, mask, f"hf llama-1b prefill {B}x{L}",
        dict(op="hf-llama-1b-prefill", direction="fwd", width=L, batch=B))


@pytest.fixture(scope="module")
def llama_small():
    cfg = (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4) if GPU else
           dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2))
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, vocab_size=32000,
                                                                      max_position_embeddings=8192)).to(DTYPE)


@pytest.mark.parametrize("impl", ["torch-sdpa", "fastattn"])
def test_llama_packed_training_step(benchmark, llama_small, impl):
    """Padding-free training (DataCollatorWithFlattening's batches: one row of sequences, position_ids restarting):
    a forward + backward of a small Llama. "sdpa" gets transformers' full (1, 1, L, L) mask of the packed pattern;
    "fastattn" runs attention_varlen on the sequences. Sequence lengths uniform in [L/16, L/4]."""
    L = 4096 if GPU else 1024
    g = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < L:
        lens.append(min(int(torch.randint(L // 16, L // 4 + 1, (1,), generator=g)), L - sum(lens)))
    ids = torch.randint(0, 32000, (1, L), generator=g).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(DEVICE)
    model = llama_small.train()
    model.set_attn_implementation("sdpa" if impl == "torch-sdpa" else "fastattn")
    # the packed pattern is what runs: the second sequence's logits are its own alone (without use_cache=False
    # transformers builds a cache and attends over the whole row: plain causal attention on both sides, 2.4 off)
    second = slice(lens[0], lens[0] + lens[1])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, second]
        alone = model(input_ids=ids[:, second], use_cache=False).logits[0]
    tol = 3e-2 if GPU else 1e-3
    torch.testing.assert_close(packed, alone, rtol=tol, atol=tol)

    def step():
        model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        sync(DEVICE)

    step()
    benchmark.group = f"hf llama packed training step 1x{L} ({len(lens)} sequences)"
    benchmark.extra_info.update(op="hf-llama-packed-train", direction="fwd+bwd", width=L, batch=1, impl=impl,
                                device=DEVICE, dtype=str(DTYPE)[6:], sequences=len(lens))
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["tokens/s"] = L / benchmark.stats.stats.median
