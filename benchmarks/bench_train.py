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


# ---- supervised fine-tuning on examples of different lengths: padded batches against packed rows ----------------
SFT_EXAMPLES = 256 if GPU else 64
_sft_medians = {}


def _sft_batches(packed: bool):
    """The same SFT_EXAMPLES examples (lengths uniform in [SEQ / 8, SEQ], every token a target) as BATCH-example
    batches padded to their longest (attention_mask), or as rows of SEQ tokens holding several examples back to
    back (position_ids restarting, as ``fastattn train --pack`` builds them), BATCH rows a batch. Returns the
    batches (model keyword arguments) and the number of real tokens."""
    g = torch.Generator().manual_seed(2)
    lens = torch.randint(SEQ // 8, SEQ + 1, (SFT_EXAMPLES,), generator=g).tolist()
    examples = [torch.randint(0, CONFIG["vocab_size"], (n + 1,), generator=g) for n in lens]
    rows = []
    if not packed:
        for e in examples:
            rows.append((e[:-1], torch.arange(len(e) - 1), e[1:]))
    else:
        ids, pos, tgt = [], [], []
        for e in examples + [None]:
            if e is None or len(ids) + len(e) - 1 > SEQ:
                fill = SEQ - len(ids)
                rows.append((torch.tensor(ids + [0] * fill), torch.tensor(pos + list(range(fill))),
                             torch.tensor(tgt + [-100] * fill)))
                ids, pos, tgt = [], [], []
            if e is not None:
                ids, pos, tgt = ids + e[:-1].tolist(), pos + list(range(len(e) - 1)), tgt + e[1:].tolist()
    batches = []
    for i in range(0, len(rows), BATCH):
        chunk = rows[i:i + BATCH]
        width = max(len(r[0]) for r in chunk)
        pad = (lambda t, v: torch.nn.functional.pad(t, (0, width - len(t)), value=v))  # noqa: E731
        ids = torch.stack([pad(r[0], 0) for r in chunk]).to(DEVICE)
        tgt = torch.stack([pad(r[2], -100) for r in chunk]).to(DEVICE)
        if packed:
            extra = dict(position_ids=torch.stack([r[1] for r in chunk]).to(DEVICE))
        else:
            extra = dict(attention_mask=torch.stack([pad(torch.ones(len(r[0]), dtype=torch.long), 0)
                                                     for r in chunk]).to(DEVICE))
        batches.append(dict(input_ids=ids, shift_labels=tgt, **extra))
    return batches, sum(lens)


@pytest.mark.parametrize("impl", ["torch-padded", "fastattn-padded", "fastattn-packed"])
def test_sft_epoch(benchmark, impl):
    """One pass over SFT_EXAMPLES examples of different lengths (a training step per batch): padded one example a
    row (torch's layers, and fastattn's), or packed (fastattn.attention_varlen: no compute on padding). Records
    real tokens/s and speedup_vs_torch-padded."""
    backend, layout = impl.split("-")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, backend=backend)).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches, tokens = _sft_batches(layout == "packed")

    def epoch():
        for b in batches:
            with torch.autocast(DEVICE, dtype=AMP, enabled=AMP is not None):
                loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(DEVICE)

    epoch()
    benchmark.group = f"sft epoch gpt {CONFIG['d_model']}x{CONFIG['n_layer']} {SFT_EXAMPLES} examples <= {SEQ}"
    benchmark.extra_info.update(op=f"gpt-{CONFIG['d_model']}x{CONFIG['n_layer']}-sft", direction="epoch",
                                width=SEQ, batch=BATCH, impl=impl, device=DEVICE, steps=len(batches),
                                dtype="bf16-autocast" if AMP else "float32")
    benchmark.pedantic(epoch, rounds=max(3, ROUNDS // 2), iterations=1)
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens/s"] = tokens / median
    _sft_medians[impl] = median
    if impl != "torch-padded" and "torch-padded" in _sft_medians:
        benchmark.extra_info["speedup_vs_torch-padded"] = _sft_medians["torch-padded"] / median
