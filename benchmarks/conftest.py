import os
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastattn imports triton
from fastattn.testing import steady_cpu_allocator  # noqa: E402

# CPU runs time kernels, not page faults: see steady_cpu_allocator (FASTATTN_BENCH_DEFAULT_MALLOC=1 turns it off).
STEADY_MALLOC = steady_cpu_allocator() if not GPU else False
sys.path.insert(0, os.path.dirname(__file__))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["steady_cpu_allocator"] = STEADY_MALLOC
