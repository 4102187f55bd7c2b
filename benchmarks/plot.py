"""Turn a pytest-benchmark JSON (--benchmark-json) into a PNG of each implementation's speedup over torch vs
width, one panel per (op, direction, dtype), and print the same numbers as a table.

usage: python benchmarks/plot.py results.json [out.png]
"""
import json
import sys
from collections import defaultdict


def speedups(path):
    """{(op, direction, dtype, device): {impl: [(width, speedup vs torch, rate)]}} from a benchmark JSON; the rate
    is GB/s for memory-bound ops, TFLOP/s for attention (whichever extra_info holds). Attention's baseline is
    torch's best backend at that point ("torch-*" impls), or plain "torch"."""
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    median = {}
    for b in benches:
        e = b["extra_info"]
        if not all(k in e for k in ("op", "direction", "dtype", "device", "width", "impl")) \
                or not isinstance(e["width"], (int, float)):
            continue  # no width curve: the verify-step timings, "prompt+new" generation rows (summary.md has them)
        median[(e["op"], e["direction"], e["dtype"], e["device"], e["width"], e["impl"])] = (
            b["stats"]["median"], e.get("GB/s", e.get("TFLOP/s", 0.0)))
    best_torch = {}
    for (op, direction, dtype, device, width, impl), (t, _) in median.items():
        if impl.startswith("torch"):
            key = (op, direction, dtype, device, width)
            best_torch[key] = min(best_torch.get(key, float("inf")), t)
    out = defaultdict(lambda: defaultdict(list))
    for (op, direction, dtype, device, width, impl), (t, rate) in sorted(median.items(), key=lambda kv: kv[0][4]):
        base = best_torch.get((op, direction, dtype, device, width))
        if base is not None:
            out[(op, direction, dtype, device)][impl].append((width, base / t, rate))
    return out


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2 if len(argv) < 2 else 0
    data = speedups(argv[1])
    if not data:
        print(f"{argv[1]}: no benchmark with a torch baseline at several widths to plot (the model benchmarks' "
              "rows carry their own speedup_vs_* ratios in extra_info)", file=sys.stderr)
        return 1
    png = argv[2] if len(argv) > 2 else argv[1].rsplit(".", 1)[0] + ".png"
    for key, impls in data.items():
        for impl, pts in impls.items():
            print(" ".join(key), impl, " ".join(f"{w}:{s:.2f}x({g:.3g})" for w, s, g in pts))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(data)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, impls) in zip(axes.flat, sorted(data.items())):
        for impl, pts in sorted(impls.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(" ".join(key))
        ax.set_xlabel("width / seqlen")
        ax.set_ylabel("speedup vs best torch")
        ax.legend()
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
