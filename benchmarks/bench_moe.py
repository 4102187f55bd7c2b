"""pytest-benchmark: a mixture-of-experts GPT (models/moe.py) against transformers' Mixtral on the same weights.

A small Mixtral-shaped model (d 768, 6 layers, 12 heads / 4 key-value heads, 8 experts of 1536 units, 2 per token,
vocab 32000; random weights) is saved once by transformers and loaded by both (``GPT.from_hf``). Greedy generation of
NEW tokens after a PROMPT-token prompt, and the prefill of 4 such prompts, transformers and ours alternated in each
round (conftest.interleaved). transformers runs its default experts implementation (grouped matmuls); ours runs each
expert once on the rows routed to it. CPU float32, GPU bfloat16; environment FASTATTN_BENCH_PROMPT (128),
FASTATTN_BENCH_NEW (64), FASTATTN_BENCH_ROUNDS (3 on CPU). Skipped without transformers.
"""
import pytest
import torch

from conftest import DEVICE, DTYPE, GPU, GUARD, env_int, interleaved, synced

transformers = pytest.importorskip("transformers")
import fastattn.hf  # noqa: E402
from fastattn.models import GPT  # noqa: E402

fastattn.hf.register()  # before any model class loads (see fastattn.hf._installed_kernels_package)

PROMPT, NEW, ROUNDS = env_int("PROMPT", 128), env_int("NEW", 64), env_int("ROUNDS", 10 if GPU else 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=32000, hidden_size=768, intermediate_size=1536, num_hidden_layers=6,
                                     num_attention_heads=12, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("mixtral")
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    hf = transformers.MixtralForCausalLM.from_pretrained(path).to(DEVICE, DTYPE).eval()
    return hf, GPT.from_hf(path).to(DEVICE, DTYPE)


def _ids(batch=1):
    return torch.randint(0, 32000, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_generation_interleaved(benchmark, models):
    hf, ours = models
    ids = _ids()
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW,
                                                               do_sample=False, pad_token_id=0)),
            "fastattn": synced(DEVICE, lambda: ours.generate(ids, NEW, temperature=0, min_new_tokens=NEW))}
    interleaved(benchmark, runs, "fastattn", NEW, f"mixtral-small generate {str(DTYPE)[6:]} {PROMPT}+{NEW} greedy",
                ROUNDS, device=DEVICE, dtype=str(DTYPE)[6:], prompt=PROMPT, new=NEW, threads=torch.get_num_threads())


def test_prefill_interleaved(benchmark, models):
    hf, ours = models
    ids = _ids(4)
    runs = {"transformers": synced(DEVICE, lambda: hf(ids)), "fastattn": synced(DEVICE, lambda: ours(ids))}
    interleaved(benchmark, runs, "fastattn", 4 * PROMPT, f"mixtral-small prefill {str(DTYPE)[6:]} 4x{PROMPT}",
                ROUNDS, device=DEVICE, dtype=str(DTYPE)[6:], prompt=PROMPT, threads=torch.get_num_threads())


@GUARD
def test_same_greedy_tokens(benchmark, models):
    hf, ours = models
    ids = _ids()[:, :32]
    with torch.inference_mode():
        want = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, 8, temperature=0, min_new_tokens=8), want)
