"""pytest-benchmark: fastattn.nn's drop-in modules against torch.nn's, same weights, same run. MultiheadAttention
forward (eval, need_weights=False, under inference_mode: torch's native fast path) and forward+backward (train);
TransformerEncoderLayer / TransformerDecoderLayer training step (forward+backward, dropout 0.1) and inference (eval,
inference_mode: for the encoder layer torch's fused torch._transformer_encoder_layer_fwd, checked to be taken); a
2-layer TransformerEncoder in inference on a padded batch (row lengths uniform in [L/4, L], left-aligned
src_key_padding_mask: torch's nested-tensor path, which computes the real tokens only, checked to be taken; ours
runs them as packed sequences).
d_model 512, 8 heads, FFN 2048, batch_first, ReLU; CPU fp32 at L=512 x batch 8 and L=2048 x batch 2 (GPU bf16 at
4x the batch). Each group holds torch and fastattn; benchmarks/plot.py prints and plots the ratios. On a shared,
noisy CPU, ``python benchmarks/bench_modules.py`` times the same cases with torch and fastattn steps alternated."""
import statistics
import sys
import time

import pytest
import torch

import fastattn.nn as fnn
from fastattn.testing import steady_cpu_allocator, sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
D_MODEL, NHEAD, FFN = 512, 8, 2048
SHAPES = [(512, 32), (2048, 8)] if GPU else [(512, 8), (2048, 2)]  # (L, batch)
SHAPE_IDS = [f"L{L}-B{B}" for L, B in SHAPES]
ROUNDS = 20 if GPU else 5
IMPLS = ["torch", "fastattn"]
# The CPU goals (fastattn / torch, same run), by case id
GOALS = {"mha-fwd L512-B8": 1.5, "mha-fwd+bwd-dropout0.0 L512-B8": 1.3, "mha-fwd+bwd-dropout0.1 L512-B8": 1.3,
         "encoder-post-norm-train L512-B8": 1.5, "encoder-post-norm-train L2048-B2": 2.0,
         "encoder-inference L512-B8": 1.3}


def _module(impl, cls, *args, **kw):
    """torch.nn.<cls> or fastattn.nn.<cls>, the same parameters for both (seeded construction, as both draw alike)."""
    torch.manual_seed(0)
    return getattr(torch.nn if impl == "torch" else fnn, cls)(*args, **kw).to(DEVICE, DTYPE)


def _torch_fast_path_taken(fn, op) -> bool:
    """Whether calling fn runs torch's native op (the fused fast path), seen by the autograd profiler."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any(e.name == op for e in prof.function_events)


def _attention_flops(L, B):
    return 2 * L * B * D_MODEL * 4 * D_MODEL + 4 * B * L * L * D_MODEL  # QKV + out projections, QK^T and PV


def _layer_flops(L, B, decoder=False, train=False):
    """Matmul FLOPs of one layer's forward (projections, attention, FFN); a training step is 3x."""
    fwd = _attention_flops(L, B) * (2 if decoder else 1) + 2 * L * B * D_MODEL * FFN * 2
    return fwd * (3 if train else 1)


# ---- the cases: (impl, L, B) -> (step, flops); shared by the pytest benchmarks and the interleaved run ------------
def mha_forward(impl, L, B):
    mha = _module(impl, "MultiheadAttention", D_MODEL, NHEAD, dropout=0.1, batch_first=True).eval()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE)

    def step():
        with torch.inference_mode():
            mha(x, x, x, need_weights=False)
        sync(DEVICE)

    if impl == "torch":
        assert _torch_fast_path_taken(step, "aten::_native_multi_head_attention"), "torch's MHA fast path not taken"
    return step, _attention_flops(L, B)


def mha_train(impl, L, B, dropout):
    mha = _module(impl, "MultiheadAttention", D_MODEL, NHEAD, dropout=dropout, batch_first=True).train()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        out, _ = mha(x, x, x, need_weights=False)
        out.backward(dy)
        sync(DEVICE)

    return step, 3 * _attention_flops(L, B)


def layer_train(impl, L, B, kind, norm_first):
    cls = "TransformerEncoderLayer" if kind == "encoder" else "TransformerDecoderLayer"
    layer = _module(impl, cls, D_MODEL, NHEAD, FFN, 0.1, batch_first=True, norm_first=norm_first).train()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE, requires_grad=True)
    args = (x,) if kind == "encoder" else (x, torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE))
    dy = torch.randn_like(x)

    def step():
        layer(*args).backward(dy)
        sync(DEVICE)

    return step, _layer_flops(L, B, kind == "decoder", train=True)


def layer_inference(impl, L, B, kind):
    cls = "TransformerEncoderLayer" if kind == "encoder" else "TransformerDecoderLayer"
    layer = _module(impl, cls, D_MODEL, NHEAD, FFN, 0.1, batch_first=True).eval()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE)
    args = (x,) if kind == "encoder" else (x, torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE))

    def step():
        with torch.inference_mode():
            layer(*args)
        sync(DEVICE)

    if impl == "torch" and kind == "encoder":
        assert _torch_fast_path_taken(step, "aten::_transformer_encoder_layer_fwd"), "torch's fast path not taken"
    return step, _layer_flops(L, B, kind == "decoder")


def encoder_padded_inference(impl, L, B):
    layer = _module(impl, "TransformerEncoderLayer", D_MODEL, NHEAD, FFN, 0.1, batch_first=True)
    torch.manual_seed(0)
    enc = (torch.nn if impl == "torch" else fnn).TransformerEncoder(layer, 2).to(DEVICE, DTYPE).eval()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE)
    lens = torch.randint(L // 4, L + 1, (B,), generator=torch.Generator().manual_seed(0))
    pad = (torch.arange(L)[None, :] >= lens[:, None]).to(DEVICE)

    def step():
        with torch.inference_mode():
            enc(x, src_key_padding_mask=pad)
        sync(DEVICE)

    if impl == "torch":
        assert _torch_fast_path_taken(step, "aten::_nested_tensor_from_mask"), "torch's nested-tensor path not taken"
    real = int(lens.sum())  # the real tokens' matmul FLOPs: projections, FFN, and attention within each row
    per_layer = 2 * real * D_MODEL * 4 * D_MODEL + 2 * real * D_MODEL * FFN * 2 + 4 * int((lens ** 2).sum()) * D_MODEL
    return step, 2 * per_layer


CASES = {  # id -> (make(impl, L, B), op, direction, group title)
    "mha-fwd": (mha_forward, "mha", "fwd", "MultiheadAttention fwd eval"),
    **{f"mha-fwd+bwd-dropout{p}": (lambda impl, L, B, p=p: mha_train(impl, L, B, p), f"mha-dropout{p}", "fwd+bwd",
                                   f"MultiheadAttention fwd+bwd train dropout={p}") for p in (0.0, 0.1)},
    **{f"{kind}-{norm}-train": (lambda impl, L, B, kind=kind, norm=norm: layer_train(impl, L, B, kind,
                                                                                       norm == "pre-norm"),
                                f"{kind}-layer-{norm}", "train-step",
                                f"Transformer{kind.capitalize()}Layer {norm} train step dropout=0.1")
       for kind, norm in (("encoder", "post-norm"), ("encoder", "pre-norm"), ("decoder", "post-norm"))},
    **{f"{kind}-inference": (lambda impl, L, B, kind=kind: layer_inference(impl, L, B, kind), f"{kind}-layer",
                             "inference", f"Transformer{kind.capitalize()}Layer inference") for kind in
       ("encoder", "decoder")},
    "encoder-padded-inference": (encoder_padded_inference, "encoder-2-layers-padded", "inference",
                                 "TransformerEncoder (2 layers) inference, padded rows"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L, B", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_module(benchmark, case, impl, L, B):
    make, op, direction, title = CASES[case]
    step, flops = make(impl, L, B)
    step()  # warm: allocator, first-call dispatch
    benchmark.group = f"{title} L={L} B={B}"
    benchmark.extra_info.update(op=op, direction=direction, width=L, batch=B, impl=impl, device=DEVICE,
                                dtype=str(DTYPE)[6:])
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = flops / benchmark.stats.stats.median / 1e12


def interleaved(cases, rounds=7):
    """Each case's torch and fastattn steps alternated round by round (both see the same machine load); prints
    the medians and their ratio, and the goal where the issue sets one."""
    print(f"{DEVICE} {str(DTYPE)[6:]}, {torch.get_num_threads()} threads, steady allocator "
          f"{steady_cpu_allocator() if not GPU else False}, {rounds} alternated rounds")
    for case in cases:
        for (L, B), sid in zip(SHAPES, SHAPE_IDS):
            steps = [CASES[case][0](impl, L, B)[0] for impl in IMPLS]
            for s in steps:
                s()
            times = [[], []]
            for _ in range(rounds):
                for s, acc in zip(steps, times):
                    t0 = time.perf_counter()
                    s()
                    acc.append(time.perf_counter() - t0)
            a, o = (statistics.median(t) for t in times)
            goal = GOALS.get(f"{case} {sid}")
            print(f"{case:30s} {sid:10s} torch {a * 1e3:8.1f} ms  fastattn {o * 1e3:8.1f} ms  {a / o:5.2f}x"
                  + (f"  (goal {goal}x)" if goal else ""), flush=True)


if __name__ == "__main__":
    interleaved(sys.argv[1:] or list(CASES))
