"""Host time per call of fastattn's eager entry points against torch's, at shapes so small that the kernels take
microseconds: what a call costs in Python, dispatch and launches (GPU run 4: fastattn.attention 192 us against torch
SDPA's 16, add_layer_norm 84 against 20). Calls are queued back to back and the device synchronised once a round,
so on a GPU the time is the host's unless the kernels are the slower side; torch and fastattn alternate round by round
and each keeps its minimum (conftest.best_per_call).

    python benchmarks/host_overhead.py [OUT.json]      # bf16 on a GPU, float32 on the CPU (one thread)

On a GPU it then times the CUDA C++ and Triton attention kernels, each forced, at sizes around the one up to which
auto mode prefers CUDA C++ (fastattn.ops.attention.params.SMALL_FLOP): the data to set it by.
"""
import json
import sys

import torch
import torch.nn.functional as F

from conftest import DEVICE as DEV, DTYPE as DT, GPU, best_per_call
import fastattn
import fastattn.nn as fnn


def pairs():
    """(name, torch's call, fastattn's call) at host-bound sizes."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEV, DT)
    q, x, w = rand(1, 8, 16, 64), rand(16, 1024), rand(1024)
    q1, cache = rand(1, 8, 1, 64), rand(1, 8, 4096, 64)
    yield "attention (1, 8, 16, 64)", lambda: F.scaled_dot_product_attention(q, q, q), \
        lambda: fastattn.attention(q, q, q)
    yield "add + LayerNorm (16, 1024)", lambda: F.layer_norm(x + x, (1024,), w, w), \
        lambda: fastattn.add_layer_norm(x, x, w, w)
    yield "decode, cache 4096", lambda: F.scaled_dot_product_attention(q1, cache, cache), \
        lambda: fastattn.attention(q1, cache, cache)
    h, mem = rand(1, 16, 256), rand(1, 24, 256)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(16, device=DEV, dtype=DT)
    for cls, args, extra in (("MultiheadAttention", (h, h, h), {"need_weights": False}),
                             ("TransformerEncoderLayer", (h,), {}),
                             ("TransformerDecoderLayer", (h, mem), {"tgt_mask": causal, "tgt_is_causal": True})):
        kw = dict(batch_first=True, device=DEV, dtype=DT)
        layer_kw = {} if cls == "MultiheadAttention" else dict(dim_feedforward=1024, dropout=0.0)
        theirs = getattr(torch.nn, cls)(256, 4, **layer_kw, **kw)
        ours = getattr(fnn, cls)(256, 4, **layer_kw, **kw)
        ours.load_state_dict(theirs.state_dict())
        theirs.eval(), ours.eval()
        name = f"{cls} (1, 16, 256){' causal' if cls == 'TransformerDecoderLayer' else ''} eval"
        yield name, (lambda m=theirs: m(*args, **extra)), (lambda m=ours: m(*args, **extra))
    # a training step's forward and backward (dropout 0.1 in the attention and on both residual branches)
    theirs = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True, device=DEV, dtype=DT)
    ours = fnn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True, device=DEV, dtype=DT)
    ours.load_state_dict(theirs.state_dict())
    x = h.clone().requires_grad_()

    def step(m):
        with torch.enable_grad():  # best_per_call times under no_grad
            m(x).sum().backward()
    yield "TransformerEncoderLayer (1, 16, 256) train step", lambda: step(theirs), lambda: step(ours)


def backend_rows():
    """GPU: forced CUDA C++ against forced Triton attention (bf16, 8 x 16 heads x L x L x 64), calls back to back,
    around params.SMALL_FLOP (the size up to which auto mode takes CUDA C++ first): forward, and forward + backward.
    Yields (name, {backend: call})."""
    from fastattn.ops.attention.params import SMALL_FLOP
    for L in (256, 512, 1024):
        q = torch.randn(8, 16, L, 64, device=DEV, dtype=DT, requires_grad=True)
        flop = 4 * 8 * 16 * L * L * 64

        def call(backend, train):
            def run():
                with fastattn.backend(backend), torch.enable_grad():
                    out = fastattn.attention(q, q, q)
                    if train:
                        out.backward(out)
            return run
        for train in (False, True):
            name = f"attention (8, 16, {L}, 64) {'fwd+bwd' if train else 'fwd'}, {flop / SMALL_FLOP:g}x SMALL_FLOP"
            yield name, {b: call(b, train) for b in ("cuda", "triton")}


def main(argv):
    if not GPU:
        torch.set_num_threads(1)
    rows = []
    print(f"host time per call, {DEV} {str(DT)[6:]} (torch {torch.__version__}): us")
    for name, theirs, ours in pairs():
        with torch.inference_mode(mode="train step" not in name):
            best = best_per_call({"torch": theirs, "fastattn": ours}, rounds=5, calls=60, device=DEV)
        t, o = best["torch"] * 1e6, best["fastattn"] * 1e6
        rows.append({"op": name, "torch_us": t, "fastattn_us": o})
        print(f"  {name:50s} torch {t:8.1f}  fastattn {o:8.1f}  ({o / t:.2f}x torch's time)")
    if GPU and {"cuda", "triton"} <= set(fastattn.available_backends()):
        print("attention backends, calls back to back: us a call")
        for name, calls in backend_rows():
            best = best_per_call(calls, rounds=5, calls=30, device=DEV)
            c, t = best["cuda"] * 1e6, best["triton"] * 1e6
            rows.append({"op": name, "cuda_us": c, "triton_us": t})
            print(f"  {name:58s} CUDA C++ {c:8.1f}  Triton {t:8.1f}")
    if len(argv) > 1:
        with open(argv[1], "w") as f:
            json.dump({"device": DEV, "dtype": str(DT), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.exit(print(__doc__))
    sys.exit(main(sys.argv))
