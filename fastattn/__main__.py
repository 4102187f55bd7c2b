"""Command line: ``fastattn train | generate | eval | quantize | prune`` (fastattn.cli) and ``info | check | bench |
demo`` (here); also ``python -m fastattn ...``."""
import json
import sys

import torch

import fastattn
from fastattn.backends import available_backends
from fastattn.reference import add_norm_ref
from fastattn.testing import add_norm_bytes, gbps, median_ms, table


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _backends_for(device: str):
    """Backends worth timing on device: auto-mode candidates (Triton only on a GPU, not in the interpreter)."""
    return [b for b in available_backends() if b != "reference" and (b != "triton" or device == "cuda")
            and (b != "cuda" or device == "cuda") and (b != "cpu" or device == "cpu")]


def cmd_info(args) -> int:
    print(json.dumps(fastattn.build_info(), indent=2))
    return 0


def cmd_check(args) -> int:
    """Every available backend against the float64 reference, forward and backward, on a few shapes."""
    from fastattn.backends import triton_interpreted
    rows, failed = [], 0
    dev = _device()
    for name in available_backends():
        if name == "triton" and dev == "cpu" and not triton_interpreted():
            continue
        d = "cpu" if name == "cpu" else dev
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for is_rms in (False, True):
                err, bound = _check_one(name, d, dtype, is_rms)
                ok = err <= bound
                failed += not ok
                rows.append([name, str(dtype).replace("torch.", ""), "rms" if is_rms else "layer",
                             f"{err:.2e}", f"{bound:.2e}", "ok" if ok else "FAIL"])
    print(table(rows, ["backend", "dtype", "norm", "max err", "bound", ""]))
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _check_one(backend, device, dtype, is_rms, shape=(64, 1000)):
    """Largest error over y, dx, dresidual, dweight (and bound 2 x torch's error + 1 ulp-ish), vs float64."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(*s, generator=g, dtype=torch.float64) for s in (shape, shape, shape[-1:], shape[-1:], shape)]
    x, r, w, b, dy = [t.to(device) for t in ts]
    b = None if is_rms else b

    def grads(fn, dt):
        leaves = [None if t is None else t.to(dt).requires_grad_() for t in (x, r, w, b)]
        y = fn(*leaves)
        y.backward(dy.to(dt))
        return [y] + [t.grad for t in leaves if t is not None]

    def ours(x, r, w, b):
        with fastattn.backend(backend):
            return fastattn.add_rms_norm(x, r, w) if is_rms else fastattn.add_layer_norm(x, r, w, b)

    eps = 1e-6 if is_rms else 1e-5
    def ref(x, r, w, b, up):
        return add_norm_ref(x, r, w, b, eps, is_rms=is_rms, upcast=up)

    got, base, exact = grads(ours, dtype), grads(lambda *a: ref(*a, False), dtype), grads(lambda *a: ref(*a, True),
                                                                                          torch.float64)
    worst_err, worst_bound = 0.0, 1.0
    ulp = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for a, t, e in zip(got, base, exact):
        err = (a.double() - e).abs().max().item()
        bound = 2 * (t.double() - e).abs().max().item() + ulp * max(1.0, e.abs().max().item())
        if err / bound > worst_err / worst_bound:
            worst_err, worst_bound = err, bound
    return worst_err, worst_bound


def bench_add_norm(shapes, dtypes, device, backward=False):
    """Rows of [backend, shape, dtype, ms, GB/s, speedup vs torch (x + r, then F.layer_norm)]."""
    rows = []
    for (M, N) in shapes:
        for dtype in dtypes:
            x, r = (torch.randn(M, N, device=device, dtype=dtype) for _ in range(2))
            w, b = (torch.randn(N, device=device, dtype=dtype) for _ in range(2))
            dy = torch.randn(M, N, device=device, dtype=dtype)
            nbytes = add_norm_bytes(M, N, dtype, residual=True, store_s=backward, backward=backward)
            if backward:
                for t in (x, r, w, b):
                    t.requires_grad_()

            def step(f):
                def run():
                    y = f()
                    if backward:
                        torch.autograd.grad(y, (x, r, w, b), dy)
                return run

            def torch_fn():
                return torch.nn.functional.layer_norm(x + r, (N,), w, b)

            with torch.set_grad_enabled(backward):
                t_ms = median_ms(step(torch_fn), device)
                rows.append(["torch", f"{M}x{N}", str(dtype)[6:], f"{t_ms:.3f}", f"{gbps(nbytes, t_ms):.0f}", "1.00"])
                for name in _backends_for(device):
                    def ours(name=name):
                        with fastattn.backend(name):
                            return fastattn.add_layer_norm(x, r, w, b)
                    ms = median_ms(step(ours), device)
                    rows.append([name, f"{M}x{N}", str(dtype)[6:], f"{ms:.3f}", f"{gbps(nbytes, ms):.0f}",
                                 f"{t_ms / ms:.2f}"])
    return rows


def cmd_bench(args) -> int:
    dev = _device()
    if dev == "cuda":
        shapes, dtypes = [(8192, 1024), (8192, 4096), (4096, 8192)], [torch.float16, torch.bfloat16]
    else:
        shapes, dtypes = [(4096, 1024), (1024, 4096)], [torch.float32]
    headers = ["backend", "shape", "dtype", "ms", "GB/s", "vs torch"]
    print(f"add + LayerNorm forward ({dev}; torch = x + r then F.layer_norm; median ms)")
    print(table(bench_add_norm(shapes, dtypes, dev), headers))
    print(f"\nadd + LayerNorm forward+backward ({dev})")
    print(table(bench_add_norm(shapes, dtypes, dev, backward=True), headers))
    return 0


def cmd_demo(args) -> int:
    info = fastattn.build_info()
    print(f"fastattn {info['fastattn']} | torch {info['torch']} | backends: {', '.join(available_backends())}")
    print("\n== correctness: every backend vs the float64 reference ==")
    rc = cmd_check(args)
    print("\n== speed ==")
    rc = rc or cmd_bench(args)
    if rc or args.train_seconds <= 0:
        return rc
    return demo_train(args.train_seconds)


def demo_train(seconds) -> int:
    """Train the default GPT on the embedded corpus for `seconds`, then generate from the saved model."""
    import time

    from fastattn.cli import main as cli_main
    run = f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"\n== training: the default GPT on the embedded corpus (Jane Austen), up to {seconds:g} s or 1500 steps "
          f"-> {run} ==", flush=True)
    rc = cli_main(["train", "--out", run, "--max-time", str(seconds), "--d-model", "128", "--n-layer", "4",
                   "--n-head", "4", "--seq-len", "64", "--batch-size", "16", "--steps", "1500", "--warmup", "10",
                   "--lr", "3e-3", "--eval-every", "50", "--eval-batches", "4", "--ckpt-every", "200",
                   "--log-every", "10"])
    if rc:
        return rc
    print("\n== generating from the saved model ==", flush=True)
    # the corpus ends every paragraph with EOS: at least 40 tokens, or a short paragraph may be the whole sample
    return cli_main(["generate", run, "-p", "It is a truth universally acknowledged", "-n", "60",
                     "--min-new-tokens", "40", "--temperature", "0.8", "--top-k", "40"])


def _demo_args(p):
    p.add_argument("--train-seconds", type=float, default=120.0,
                   help="then train the default GPT for this long and generate from it; 0: skip (default: 120)")


def main(argv=None) -> int:
    """The ``fastattn`` console script: train / generate / eval / quantize / prune (fastattn.cli) and the kernel
    commands of this file."""
    from fastattn.cli import main as cli_main
    return cli_main(argv, legacy=[("info", cmd_info, "what was built and which backends run here"),
                                  ("check", cmd_check, "check every backend against the reference"),
                                  ("bench", cmd_bench, "time the kernels against torch"),
                                  ("demo", cmd_demo, "info + check + bench, then train a small GPT and generate",
                                   _demo_args)])


if __name__ == "__main__":
    sys.exit(main())
