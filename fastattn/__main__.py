"""Command line: ``fastattn train | generate | eval | quantize | prune`` (fastattn.cli) and ``info | check | bench |
demo`` (here); also ``python -m fastattn ...``."""
import json
import sys

import torch

import fastattn
from fastattn.backends import available_backends
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
    """Every op on every available backend against the float64 reference, forward and backward (fastattn.checks)."""
    from fastattn.backends import triton_interpreted
    from fastattn.checks import run
    dev = _device()
    backends = [b for b in available_backends() if not (b == "triton" and dev == "cpu" and not triton_interpreted())]
    rows, failed = run(backends, lambda name: "cpu" if name == "cpu" else dev)
    print(table(rows, ["op", "backend", "dtype", "max err", "bound", ""]))
    checked = sum(r[-1] != "not supported" for r in rows)
    print(f"{checked - failed} passed, {failed} failed ({len(rows) - checked} not supported by that backend)")
    return 1 if failed else 0


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
