"""Summarize a GPU suite run: OUTDIR/{gpu.txt, tests.xml, bench.json} -> OUTDIR/summary.md + summary.json, with
the copy bandwidth measured here as the memory ceiling.  usage: python benchmarks/gpu_summary.py OUTDIR COMMIT"""
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET

import torch

sys.path.insert(0, os.path.dirname(__file__))
from plot import speedups  # noqa: E402


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


def main(out, commit):
    gpu = open(os.path.join(out, "gpu.txt")).read().strip().splitlines()[-1]
    bw = copy_bandwidth_gbs()
    tests = test_counts(os.path.join(out, "tests.xml"))
    bench = os.path.join(out, "bench.json")
    data = speedups(bench) if os.path.exists(bench) else {}
    rows = []
    for (op, direction, dtype, device), impls in sorted(data.items()):
        for impl, pts in sorted(impls.items()):
            if impl == "torch":
                continue
            for width, sp, gbs in pts:
                rows.append(dict(op=op, direction=direction, dtype=dtype, impl=impl, width=width,
                                 speedup_vs_torch=round(sp, 3), gbs=round(gbs, 1), pct_copy_bw=round(100 * gbs / bw, 1)))
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
    lines += ["", "| op | direction | dtype | impl | width | speedup vs torch | GB/s | % copy BW |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['direction']} | {r['dtype']} | {r['impl']} | {r['width']} | {r['speedup_vs_torch']:.2f}x "
              f"| {r['gbs']:.0f} | {r['pct_copy_bw']:.0f}% |" for r in rows]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "unknown")
