"""Timing of the CUDA INT8 GEMM kernels (fastattn._C.int8_mm_cuda), each forced in turn, against torch bf16
matmul, torch._int_mm and the Triton backend: what tunes the auto choice in csrc/cuda/int8_gemm.cu plan_for (small-M
up to M = 32, then 128x256 / 128x128 / 64x64 tiles by grid size). Correctness: tests/test_cuda_int8.py.

    python benchmarks/cuda_int8_check.py                # < 60 s on an H100
    python benchmarks/cuda_int8_check.py --tune         # also autotune the Triton baseline (slower)
    python benchmarks/cuda_int8_check.py --standalone   # JIT-build csrc/cuda/int8_* alone (torch cpp_extension, for
                                                        # this GPU's arch) instead of using fastattn._C; also the
                                                        # fallback when fastattn._C has no int8_mm_cuda

int8_mm at 4096^3, 8192^3 and M = 1 / 16 / 64 / 256 x 4096 x 4096 (CUDA events, median); TOPS = 2MNK / time.
"""
import argparse
import os
import sys
import time

if "--tune" not in sys.argv:
    os.environ.setdefault("FASTATTN_AUTOTUNE", "0")  # Triton baseline: first config only (tuning takes minutes)

import torch  # noqa: E402

import fastattn  # noqa: E402
import fastattn.backends  # noqa: E402
from fastattn import _ext  # noqa: E402

KERNELS = ["small_m", "tile64x64", "tile128x128", "tile128x128w8", "tile128x256"]


def set_kernel(name):
    if name in (None, "auto"):
        os.environ.pop("FASTATTN_CUDA_INT8_KERNEL", None)
    else:
        os.environ["FASTATTN_CUDA_INT8_KERNEL"] = name


def bench(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def timings():
    print(f"\ndevice: {torch.cuda.get_device_name()}  (TOPS = 2MNK / median time; GB/s = bytes moved / time)")
    print(f"{'shape':>20} {'impl':>24} {'time us':>10} {'TOPS':>8} {'GB/s':>8} {'vs bf16':>8} {'vs _int_mm':>10}")
    for (M, N, K) in [(4096, 4096, 4096), (8192, 8192, 8192), (1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096),
                      (256, 4096, 4096)]:
        time_shape(M, N, K)
        torch.cuda.empty_cache()


def time_shape(M, N, K):
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(M, device="cuda"), torch.rand(N, device="cuda")
    af, bf = a.to(torch.bfloat16), b.to(torch.bfloat16)
    reps = 20 if M * N * K >= 8192 ** 3 else 50
    res = {}

    def run(name, fn):
        try:
            res[name] = bench(fn, reps)
        except Exception as e:  # noqa: BLE001
            print(f"{str((M, N, K)):>20} {name:>24} skipped: {str(e).splitlines()[0][:80]}")

    def triton():
        with fastattn.backend("triton"):
            return fastattn.int8_matmul(a, b, sa, sb, out_dtype=torch.bfloat16)

    def cuda():
        return _ext._C.int8_mm_cuda(a, b, sa, sb, None, torch.bfloat16)

    run("torch bf16 matmul", lambda: af @ bf.T)
    run("torch._int_mm", lambda: torch._int_mm(a, b.T))
    run("triton (fastattn)", triton)
    run("cuda auto", cuda)
    for kname in (KERNELS[1:] if M >= 1024 else ["small_m", "tile64x64", "tile128x128"]):
        set_kernel(kname)
        try:
            run(f"cuda {kname}", cuda)
        finally:
            set_kernel(None)
    ops = 2.0 * M * N * K
    nbytes = M * K + N * K + 2 * M * N
    for name, t in res.items():
        vs_bf16 = res.get("torch bf16 matmul", float("nan")) / t
        vs_int = res.get("torch._int_mm", float("nan")) / t
        print(f"{str((M, N, K)):>20} {name:>24} {t * 1e6:10.1f} {ops / t / 1e12:8.1f} {nbytes / t / 1e9:8.0f} "
              f"{vs_bf16:8.2f} {vs_int:10.2f}", flush=True)


class _Proxy:
    """fastattn._C with the int8 CUDA ops taken from the standalone build (the dispatcher reads _ext._C)."""

    def __init__(self, base, ops):
        self._base, self._ops = base, ops

    def __getattr__(self, name):
        if name in ("int8_mm_cuda", "quantize_rows_cuda"):
            return getattr(self._ops, name)
        if name == "with_cuda":
            return True
        if self._base is None:
            raise AttributeError(name)
        return getattr(self._base, name)


def build_standalone():
    """Compile csrc/cuda/int8_{api.cpp,gemm.cu,quant.cu} into a throwaway extension (same flags as setup.py)."""
    import tempfile
    from torch.utils.cpp_extension import load
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    d = tempfile.mkdtemp(prefix="fastattn_int8_")
    mod = os.path.join(d, "int8_module.cpp")
    with open(mod, "w") as f:
        f.write('#include <torch/extension.h>\n#include "registry.h"\nnamespace fastattn { void register_cuda_int8('
                'pybind11::module_& m); }\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { '
                'fastattn::register_cuda_int8(m); }\n')
    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    t0 = time.time()
    ext = load(name="fastattn_int8_standalone", build_directory=d, verbose=False,
               sources=[mod] + [os.path.join(csrc, "cuda", f) for f in ("int8_api.cpp", "int8_gemm.cu",
                                                                        "int8_quant.cu")],
               extra_include_paths=[csrc], extra_cflags=["-O3", "-DFASTATTN_WITH_CUDA"],
               extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                                  "-DFASTATTN_WITH_CUDA", arch])
    print(f"standalone build of csrc/cuda/int8_*: {time.time() - t0:.1f} s", flush=True)
    _ext._C = _Proxy(_ext._C, ext)
    fastattn.backends.unavailable_reason.cache_clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="autotune the Triton baseline")
    ap.add_argument("--standalone", action="store_true", help="JIT-build csrc/cuda/int8_* instead of fastattn._C")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    t0 = time.time()
    if args.standalone or _ext._C is None or not hasattr(_ext._C, "int8_mm_cuda") \
            or not hasattr(_ext._C, "quantize_rows_cuda"):
        if not args.standalone:
            print("fastattn._C has no int8_mm_cuda / quantize_rows_cuda (register_cuda_int8 not wired into "
                  "registry.h, or an old build): building csrc/cuda/int8_* standalone", flush=True)
        build_standalone()
    timings()
    print(f"total {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
