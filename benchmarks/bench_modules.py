"""pytest-benchmark: fastattn.nn's drop-in modules against torch.nn's, same weights, same run. MultiheadAttention
forward (eval, need_weights=False, under inference_mode: torch's native fast path) and forward+backward (train);
TransformerEncoderLayer / TransformerDecoderLayer training step (forward+backward, dropout 0.1) and inference (eval,
inference_mode: for the encoder layer torch's fused torch._transformer_encoder_layer_fwd, checked to be taken).
d_model 512, 8 heads, FFN 2048, batch_first, ReLU; CPU fp32 at L=512 x batch 8 and L=2048 x batch 2 (GPU bf16 at
4x the batch). Each group holds torch and fastattn; benchmarks/plot.py prints and plots the ratios."""
import pytest
import torch

import fastattn.nn as fnn
from fastattn.testing import sync

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
D_MODEL, NHEAD, FFN = 512, 8, 2048
SHAPES = [(512, 32), (2048, 8)] if GPU else [(512, 8), (2048, 2)]  # (L, batch)
ROUNDS = 20 if GPU else 5
IMPLS = ["torch", "fastattn"]


def _module(impl, cls, *args, **kw):
    """torch.nn.<cls> or fastattn.nn.<cls>, the same parameters for both (seeded construction, as both draw alike)."""
    torch.manual_seed(0)
    return getattr(torch.nn if impl == "torch" else fnn, cls)(*args, **kw).to(DEVICE, DTYPE)


def _torch_fast_path_taken(fn, op) -> bool:
    """Whether calling fn runs torch's native op (the fused fast path), seen by the autograd profiler."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any(e.name == op for e in prof.function_events)


def _run(benchmark, step, group, info, flops):
    step()  # warm: allocator, first-call dispatch
    sync(DEVICE)
    benchmark.group = group
    benchmark.extra_info.update(info, device=DEVICE, dtype=str(DTYPE)[6:])
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = flops / benchmark.stats.stats.median / 1e12


def _layer_flops(L, B, decoder=False, train=False):
    """Matmul FLOPs of one layer's forward (projections, attention, FFN); a training step is 3x."""
    T = L * B
    attn = 2 * T * D_MODEL * 4 * D_MODEL + 4 * B * L * L * D_MODEL  # QKV + out projections, QK^T and PV
    fwd = attn * (2 if decoder else 1) + 2 * T * D_MODEL * FFN * 2
    return fwd * (3 if train else 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L, B", SHAPES, ids=[f"L{L}-B{B}" for L, B in SHAPES])
def test_mha_forward(benchmark, impl, L, B):
    mha = _module(impl, "MultiheadAttention", D_MODEL, NHEAD, dropout=0.1, batch_first=True).eval()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE)

    def step():
        with torch.inference_mode():
            mha(x, x, x, need_weights=False)
        sync(DEVICE)

    if impl == "torch":
        assert _torch_fast_path_taken(step, "aten::_native_multi_head_attention"), "torch's MHA fast path not taken"
    _run(benchmark, step, f"MultiheadAttention fwd eval L={L} B={B}",
         dict(op="mha", direction="fwd", width=L, batch=B, impl=impl), _layer_flops(L, B) - 4 * L * B * D_MODEL * FFN)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("L, B", SHAPES, ids=[f"L{L}-B{B}" for L, B in SHAPES])
def test_mha_train(benchmark, impl, dropout, L, B):
    mha = _module(impl, "MultiheadAttention", D_MODEL, NHEAD, dropout=dropout, batch_first=True).train()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        out, _ = mha(x, x, x, need_weights=False)
        out.backward(dy)
        sync(DEVICE)

    _run(benchmark, step, f"MultiheadAttention fwd+bwd train dropout={dropout} L={L} B={B}",
         dict(op=f"mha-dropout{dropout}", direction="fwd+bwd", width=L, batch=B, impl=impl),
         3 * (_layer_flops(L, B) - 4 * L * B * D_MODEL * FFN))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("L, B", SHAPES, ids=[f"L{L}-B{B}" for L, B in SHAPES])
def test_layer_train_step(benchmark, impl, kind, norm_first, L, B):
    if kind == "decoder" and norm_first:
        pytest.skip("one norm placement for the decoder layer keeps the CPU run short")
    cls = "TransformerEncoderLayer" if kind == "encoder" else "TransformerDecoderLayer"
    layer = _module(impl, cls, D_MODEL, NHEAD, FFN, 0.1, batch_first=True, norm_first=norm_first).train()
    x = torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE, requires_grad=True)
    args = (x,) if kind == "encoder" else (x, torch.randn(B, L, D_MODEL, device=DEVICE, dtype=DTYPE))
    dy = torch.randn_like(x)

    def step():
        layer(*args).backward(dy)
        sync(DEVICE)

    _run(benchmark, step, f"{cls} train step dropout=0.1 {'pre' if norm_first else 'post'}-norm L={L} B={B}",
         dict(op=f"{kind}-layer-{'pre' if norm_first else 'post'}-norm", direction="train-step", width=L, batch=B,
              impl=impl), _layer_flops(L, B, kind == "decoder", train=True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("L, B", SHAPES, ids=[f"L{L}-B{B}" for L, B in SHAPES])
def test_layer_inference(benchmark, impl, kind, L, B):
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
    _run(benchmark, step, f"{cls} inference L={L} B={B}",
         dict(op=f"{kind}-layer", direction="inference", width=L, batch=B, impl=impl),
         _layer_flops(L, B, kind == "decoder"))
