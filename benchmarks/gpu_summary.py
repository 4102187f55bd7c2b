"""Summarize a GPU suite run: OUTDIR/{gpu.txt, tests.xml, bench.json} -> OUTDIR/summary.md + summary.json, with
the copy bandwidth measured here as the memory ceiling.  usage: python benchmarks/gpu_summary.py OUTDIR COMMIT"""
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET

import torch


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written (median of do_bench)."""
    from triton.testing import do_bench
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def test_counts(path):
    if not os.path.exists(path):
        return {"error": "no tests.xml"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["failed_tests"] = failed[:50]
    return counts


def bench_rows(path, bw):
    """One row per (op, direction, dtype, width, fastattn impl): per-call ms, rate, speedup vs each torch impl."""
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    groups, own = {}, {}
    for b in benches:
        e = b["extra_info"]
        # a row without op / direction / width (an older benchmark file) is keyed by its group, never dropped
        key = (e.get("op", b.get("group") or b["name"]), e.get("direction", ""), e.get("dtype", ""),
               e.get("width", ""))
        ms = b["stats"]["median"] / e.get("calls_per_round", 1) * 1e3
        if f"{e.get('ours')} median s" in e:  # an interleaved row's round runs every side: ours alone
            ms = e[f"{e['ours']} median s"] * 1e3
        groups.setdefault(key, {})[e["impl"]] = (ms, e.get("GB/s"), e.get("TFLOP/s"))
        # a ratio the benchmark measured itself (interleaved rows: both sides in one timed step)
        own[key, e["impl"]] = {k[len("speedup_"):]: v for k, v in e.items() if k.startswith("speedup_vs_")}
    rows = []
    for (op, direction, dtype, width), impls in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        torch_ms = {i: v[0] for i, v in impls.items() if _baseline(i)}
        for impl, (ms, gbs, tflops) in impls.items():
            if _baseline(impl):
                continue
            row = dict(op=op, direction=direction, dtype=dtype, width=width, impl=impl, ms=round(ms, 4))
            if gbs is not None:
                row.update(gbs=round(gbs, 1), pct_copy_bw=round(100 * gbs / bw, 1))
            if tflops is not None:
                row["tflops"] = round(tflops, 1)
            if torch_ms:
                row["vs_best_torch"] = round(min(torch_ms.values()) / ms, 3)
            row.update({f"vs_{t}": round(tms / ms, 3) for t, tms in torch_ms.items()})
            ratios = own[(op, direction, dtype, width), impl]
            for name, ratio in ratios.items():
                row.setdefault(name, round(ratio, 3))
            # torch's and transformers' sides (its generate, and its prompt lookup), not vs_fastattn (ours, plain)
            base = [r for name, r in ratios.items() if name[3:].startswith(("torch", "transformers"))]
            if base:  # against the fastest baseline measured (transformers' own prompt lookup, say)
                row.setdefault("vs_best_torch", round(min(base), 3))
            rows.append(row)
    return rows


def _baseline(impl: str) -> bool:
    """torch's implementations, and transformers' own model (bench_models.py)."""
    return impl.startswith("torch") or impl == "transformers"


def main(out, commit):
    gpu = open(os.path.join(out, "gpu.txt")).read().strip().splitlines()[-1]
    bw = copy_bandwidth_gbs()
    tests = test_counts(os.path.join(out, "tests.xml"))
    bench = os.path.join(out, "bench.json")
    rows = bench_rows(bench, bw) if os.path.exists(bench) else []
    summary = dict(date=datetime.date.today().isoformat(), gpu=gpu, commit=commit, torch=torch.__version__,
                   copy_bandwidth_gbs=round(bw, 1), tests=tests, results=rows)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# fastattn GPU suite — {summary['date']}", "",
             f"- GPU: {gpu}", f"- commit: {commit}", f"- torch: {torch.__version__}",
             f"- measured copy bandwidth (read + write): {bw:.0f} GB/s",
             f"- tests: {tests.get('tests')} run, {tests.get('failures')} failed, {tests.get('errors')} errors, "
             f"{tests.get('skipped')} skipped", ""]
    lines += [f"  - FAILED {t}" for t in tests.get("failed_tests", [])]
    lines += ["", "| op | direction | dtype | width/seqlen | impl | ms | GB/s (% copy) or TFLOP/s | vs best torch | "
              "vs each torch (or transformers) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['gbs']:.0f} ({r['pct_copy_bw']:.0f}%)" if "gbs" in r else f"{r.get('tflops', 0):.0f} TFLOP/s"
        each = ", ".join(f"{k[3:]} {v:.2f}x" for k, v in r.items() if k.startswith(("vs_torch", "vs_transformers")))
        lines.append(f"| {r['op']} | {r['direction']} | {r['dtype']} | {r['width']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{rate} | {r.get('vs_best_torch', 0):.2f}x | {each} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(print(__doc__) or (0 if len(sys.argv) > 1 else 2))
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "unknown")
