"""fastattn.testing.steady_cpu_allocator, which every CPU benchmark runs under: freed memory is reused, large
blocks included, so the benchmarks time kernels and not page faults (as under jemalloc / tcmalloc)."""
import os
import subprocess
import sys

import pytest

# 48 MB blocks: above glibc's largest mmap threshold (32 MiB), which is all the setting fixed before session 25;
# blocks above it were mapped fresh and zero-filled page by page on every call (12,288 faults a fill, every one of
# the fills: 10 of 10, measured again in session 28). On the heap glibc still grows by a fresh block now and then (a
# small allocation splitting a freed one): 0-2 of 10 fills in 27 runs in session 25, but 0-7 of 10 in session 28 on
# the same host, with fastattn not even imported (the mallopt calls alone, one thread or two). The bound tells the
# setting working from not: fewer than 9 of 10 fresh.
FILLS, FRESH = 10, 12288
_PROBE = f"""
import resource, torch
from fastattn.testing import steady_cpu_allocator
if not steady_cpu_allocator():
    print("unsupported")
    raise SystemExit
for _ in range(3):
    torch.empty(12 << 20).fill_(1.0)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({FILLS}):
    torch.empty(12 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def test_steady_allocator_reuses_blocks_above_the_mmap_threshold():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FASTATTN_BENCH_DEFAULT_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = out.stdout.split()[-1]
    if result == "unsupported":
        pytest.skip("not glibc: steady_cpu_allocator has nothing to set")
    assert int(result) < (FILLS - 1) * FRESH, f"{result} faults for {FILLS} 48 MB fills (all fresh: {FILLS * FRESH})"
