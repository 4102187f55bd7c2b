"""pytest-benchmark: one training step (forward, loss, backward, AdamW step) of fastattn.models.GPT on fastattn's
layers against the same model on torch's (backend="torch": torch modules and F.scaled_dot_product_attention), eager
and under torch.compile, same weights, same run: issue 13's training-throughput rows.

GPU: a GPT-2-small-sized model (124M: d 768, 12 layers, 12 heads, vocab 50257), batch 8 x 1024 tokens, bf16 autocast
over float32 weights (as ``fastattn train --precision bf16``). Goal: fastattn >= 1.3x the tokens/s of
"torch" and >= 1.1x "torch-compile". CPU: the CLI's default GPT (d 256, 4 layers, 4 heads, vocab 4096), batch 16 x
128, float32, without the compiled rows (minutes of inductor compilation on two cores; FASTATTN_BENCH_COMPILE=1 adds
them). Rows run in order: torch, torch-compile, fastattn, fastattn-compile; each fastattn row records
speedup_vs_torch and speedup_vs_torch-compile (ratios of medians in this run) and every row its tokens/s. The loss
is the model's own, as ``fastattn train`` computes it: F.cross_entropy on the logits for "torch", the fused
fastattn.linear_cross_entropy (no logits in memory) for "fastattn". AdamW is fused on both devices, as ``fastattn
train`` builds it (on the CPU the for-loop AdamW took 7.6 ms a step of this model, the fused one 2.6).
"""
import os

import pytest
import torch

from fastattn.models import GPT, GPTConfig
from fastattn.testing import sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if GPU:
    CONFIG = dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, max_seq_len=1024)
    BATCH, SEQ, ROUNDS = 8, 1024, 10
else:
    CONFIG = dict(vocab_size=4096, d_model=256, n_layer=4, n_head=4, max_seq_len=128)
    BATCH, SEQ, ROUNDS = 16, 128, 5
AMP = torch.bfloat16 if GPU else None
COMPILE = GPU or os.environ.get("FASTATTN_BENCH_COMPILE") == "1"
IMPLS = ["torch", "torch-compile", "fastattn", "fastattn-compile"]
_medians = {}  # impl -> median s, for the ratios


def _step_fn(impl):
    torch.manual_seed(0)  # the same weights for every row
    model = GPT(GPTConfig(**CONFIG, backend=impl.split("-")[0])).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    run = torch.compile(model) if impl.endswith("compile") else model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g).to(DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=AMP, enabled=AMP is not None):
            loss = run(ids[:, :-1], shift_labels=ids[:, 1:]).loss  # as the CLI trains
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(DEVICE)
    return step


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, impl):
    if impl.endswith("compile") and not COMPILE:
        pytest.skip("compiled rows on the CPU: FASTATTN_BENCH_COMPILE=1")
    step = _step_fn(impl)
    for _ in range(3 if impl.endswith("compile") else 1):  # compilation (forward, backward) outside the timing
        step()
    benchmark.group = f"train step gpt {CONFIG['d_model']}x{CONFIG['n_layer']} b{BATCH}x{SEQ}"
    benchmark.extra_info.update(op=f"gpt-{CONFIG['d_model']}x{CONFIG['n_layer']}-train", direction="train-step",
                                width=SEQ, batch=BATCH, impl=impl, device=DEVICE,
                                dtype="bf16-autocast" if AMP else "float32")
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: one plain run
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens/s"] = BATCH * SEQ / median
    _medians[impl] = median
    if impl.startswith("fastattn"):
        for base in ("torch", "torch-compile"):
            if base in _medians:
                benchmark.extra_info[f"speedup_vs_{base}"] = _medians[base] / median
