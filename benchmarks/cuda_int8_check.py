"""GPU check of the CUDA INT8 kernels (fastattn._C.int8_mm_cuda / quantize_rows_cuda): correctness first, then speed.

    python benchmarks/cuda_int8_check.py            # < 60 s on an H100; exit 1 on any correctness failure
    python benchmarks/cuda_int8_check.py --tune     # also autotune the Triton baseline (slower)
    python benchmarks/cuda_int8_check.py --quick    # correctness only
    python benchmarks/cuda_int8_check.py --standalone   # JIT-build csrc/cuda/int8_* alone (torch cpp_extension, for
                                                        # this GPU's arch) instead of using fastattn._C; also the
                                                        # fallback when fastattn._C has no int8_mm_cuda

1. int8_mm_cuda bit-exact against fastattn.reference.int8_matmul_ref (computed on CPU: int64 sums, the same
   float32 epilogue) over odd shapes, every out dtype, scale / bias combinations, misaligned bases (the 4-byte and
   byte load paths), K = 0, and every kernel forced through FASTATTN_CUDA_INT8_KERNEL.
2. quantize_rows_cuda bit-exact against quantize_rows_ref evaluated on the CUDA tensor (what tests/test_int8.py
   compares with), and the fastattn-level entry points (fastattn.int8_matmul / quantize_per_token, backend "cuda").
3. Timings (CUDA events, median): int8_mm at 4096^3, 8192^3 and M = 1 / 16 / 64 / 256 x 4096 x 4096 against torch
   bf16 matmul, torch._int_mm and the Triton backend; each kernel forced too (to tune the auto choice in
   csrc/cuda/int8_gemm.cu plan_for: small-M up to M = 32, then 128x256 / 128x128 / 64x64 tiles by grid size).
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
from fastattn.reference import int8_matmul_ref, quantize_rows_ref  # noqa: E402

KERNELS = ["small_m", "tile64x64", "tile128x128", "tile128x128w8", "tile128x256"]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.int32: torch.int32}
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL", msg, flush=True)


def set_kernel(name):
    if name in (None, "auto"):
        os.environ.pop("FASTATTN_CUDA_INT8_KERNEL", None)
    else:
        os.environ["FASTATTN_CUDA_INT8_KERNEL"] = name


def rand_i8(shape, g, misalign=0):
    """int8 tensor on the GPU; misalign > 0 gives a contiguous view whose data starts `misalign` bytes into its
    buffer (the 4-byte / byte load paths)."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.randint(-128, 128, (n + misalign,), generator=g, dtype=torch.int8)
    return flat.cuda()[misalign:].view(*shape)


def ref_mm_gpu(a, b, sa, sb, bias, out_dtype):
    """int8_matmul_ref on the GPU for large shapes: the accumulator from an fp64 matmul is exact (integer products
    and partial sums far below 2**53), and float(acc) rounds the same integer; then the same float32 ops."""
    acc = a.double() @ b.double().T
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.to(torch.float32)
    if sa is not None:
        out = out * sa.reshape(-1, 1)
    if sb is not None:
        out = out * sb.reshape(1, -1)
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


def reference(a, b, sa, sb, bias, out_dtype):
    M, K = a.shape
    if M * b.shape[0] * max(K, 1) <= 2e7:  # the literal reference, on CPU
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return int8_matmul_ref(a.cpu(), b.cpu(), cpu(sa), cpu(sb), cpu(bias), out_dtype)
    return ref_mm_gpu(a, b, sa, sb, bias, out_dtype).cpu()


def check_mm(M, N, K, out_dtype, sa_on, sb_on, bias_on, g, kernel=None, a_mis=0, b_mis=0):
    a = rand_i8((M, K), g, a_mis)
    b = rand_i8((N, K), g, b_mis)
    if M and K:
        a[0] = -128  # |acc| up to K * 2**14
    if N and K:
        b[0] = -128
    sa = (torch.rand(M, generator=g) / 1000).cuda() if sa_on else None
    sb = (torch.rand(N, generator=g) / 100).cuda() if sb_on else None
    bias = torch.randn(N, generator=g).cuda() if bias_on else None
    set_kernel(kernel)
    try:
        out = _ext._C.int8_mm_cuda(a, b, sa, sb, bias, out_dtype)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        fail(f"int8_mm_cuda M={M} N={N} K={K} {out_dtype} kernel={kernel} raised {type(e).__name__}: {e}")
        return
    finally:
        set_kernel(None)
    ref = reference(a, b, sa, sb, bias, out_dtype)
    out = out.cpu()
    tag = (f"int8_mm_cuda M={M} N={N} K={K} {str(out_dtype)[6:]} sa={sa_on} sb={sb_on} bias={bias_on} "
           f"kernel={kernel or 'auto'} misalign=({a_mis},{b_mis})")
    if out.shape != (M, N) or out.dtype != out_dtype:
        fail(f"{tag}: got {tuple(out.shape)} {out.dtype}")
        return
    bad = out.view(BITS[out_dtype]) != ref.view(BITS[out_dtype])
    if bad.any():
        idx = bad.nonzero()[:3].tolist()
        fail(f"{tag}: {int(bad.sum())} of {bad.numel()} elements differ, e.g. at {idx}: "
             f"{[out[i][j].item() for i, j in idx]} vs ref {[ref[i][j].item() for i, j in idx]}")


def correctness_mm():
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    n0 = len(failures)
    count = 0
    # the GPU fp64 reference agrees with the literal one
    for od in (torch.int32, torch.float16, torch.bfloat16, torch.float32):
        a, b = rand_i8((200, 1000), g), rand_i8((300, 1000), g)
        sa, sb, bias = torch.rand(200).cuda() / 1000, torch.rand(300).cuda() / 100, torch.randn(300).cuda()
        if od == torch.int32:
            sa = sb = bias = None
        r1 = int8_matmul_ref(a.cpu(), b.cpu(), *(None if t is None else t.cpu() for t in (sa, sb, bias)), od)
        r2 = ref_mm_gpu(a, b, sa, sb, bias, od).cpu()
        if not torch.equal(r1.view(BITS[od]), r2.view(BITS[od])):
            fail(f"the GPU fp64 reference differs from int8_matmul_ref ({od}): fix the check, not the kernel")
    # every out dtype and scale / bias combination, odd shapes (auto kernel choice: small-M, 64x64, 128x128 ...)
    combos = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
              (False, False, False)]
    for (M, N, K) in [(1, 1, 1), (7, 13, 5), (1, 129, 100), (16, 7, 31), (33, 65, 100), (129, 65, 100),
                      (300, 129, 4099), (1, 4096, 4096), (16, 4096, 4096), (300, 300, 4096), (1, 8, 0), (40, 17, 0),
                      (2048, 2048, 1024), (1024, 4096, 512)]:
        for od in (torch.int32, torch.float16, torch.bfloat16, torch.float32):
            for sa, sb, bias in ([(False, False, False)] if od == torch.int32 else combos):
                check_mm(M, N, K, od, sa, sb, bias, g)
                count += 1
    # load paths (misaligned bases, K % 16 != 0) x kernels, forced kernels on tails
    for kernel in [None] + KERNELS:
        for (M, N, K) in [(1, 31, 4096), (20, 40, 1024), (129, 131, 320), (300, 129, 257), (257, 513, 1040),
                          (130, 260, 4160), (31, 33, 4099)]:
            for a_mis, b_mis in [(0, 0), (4, 0), (0, 1)]:
                if kernel not in (None, "small_m", "tile64x64") and (a_mis, b_mis) != (0, 0):
                    continue  # the other kernels fall back to tile64x64 off the 16-byte path
                check_mm(M, N, K, torch.int32, False, False, False, g, kernel, a_mis, b_mis)
                count += 1
        check_mm(129, 258, 96, torch.bfloat16, True, True, True, g, kernel)
        check_mm(513, 1000, 2000, torch.float16, True, True, True, g, kernel)
        count += 2
    print(f"int8_mm_cuda: {count} cases, {len(failures) - n0} failed ({time.time() - t0:.1f} s)", flush=True)


def correctness_quant():
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    n0 = len(failures)
    count = 0
    # which semantics torch's CUDA `tensor / 127.0` has (a multiply by float(1/127) in PyTorch <= 2.x at least)
    x = torch.arange(1, 20001, dtype=torch.float32) * 0.0137
    div = x / torch.tensor(127.0)  # tensor / tensor on CPU: a true division
    mul = x * torch.tensor(1.0 / 127.0, dtype=torch.float32)
    probe = x[div != mul][:1]
    if probe.numel():
        got = (probe.cuda() / 127.0).cpu()
        sem = "x * float(1/127)" if torch.equal(got, probe * torch.tensor(1.0 / 127.0)) else "x / 127"
        print(f"torch CUDA computes `tensor / 127.0` as {sem} (the kernel matches quantize_rows_ref on the CUDA "
              f"device, i.e. this)", flush=True)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for M, K in [(9, 1), (9, 7), (9, 100), (9, 4099), (9, 4096), (5, 16384), (3000, 64), (17, 1000), (1, 8)]:
            for smooth in (False, True):
                for mis in (0, 1):
                    xf = torch.randn(M, K + mis, generator=g) * 3
                    if M > 2:
                        xf[1] = 0  # zero row
                        xf[2, 0] = 0.5
                    if M > 4:
                        xf[3] *= 1e-39  # subnormal row (float32)
                        xf[4, K // 2] = 60000.0
                    if M > 6:
                        xf[5, : K - 1] = torch.tensor([(k % 255 - 127) + 0.5 for k in range(K - 1)])  # ties
                        xf[5, K - 1] = 127.0
                    x = xf.to(dt).cuda()
                    if mis:
                        x = x.flatten()[1: 1 + M * K].view(M, K)  # contiguous, 2/4-byte offset: scalar path
                    sm = (torch.rand(K, generator=g) + 0.5).cuda() if smooth else None
                    q, s = _ext._C.quantize_rows_cuda(x, sm)
                    qr, sr = quantize_rows_ref(x, sm)
                    count += 1
                    tag = f"quantize_rows_cuda {str(dt)[6:]} M={M} K={K} smooth={smooth} misalign={mis}"
                    if not torch.equal(s.view(torch.int32), sr.view(torch.int32)):
                        fail(f"{tag}: scale differs in rows {(s != sr).nonzero().flatten()[:8].tolist()}")
                    elif not torch.equal(q, qr):
                        fail(f"{tag}: {int((q != qr).sum())} elements of q differ "
                             f"(max {(q.int() - qr.int()).abs().max().item()} steps)")
                    if dt == torch.float32 and K == 4096 and not smooth and not mis:
                        qc, sc = quantize_rows_ref(x.cpu(), None)
                        print(f"  (info) vs the CPU reference: {int((s.cpu() != sc).sum())} of {M} scales differ in "
                              f"the last bit (CPU divides by 127)", flush=True)
    print(f"quantize_rows_cuda: {count} cases, {len(failures) - n0} failed ({time.time() - t0:.1f} s)", flush=True)


def frontend_and_errors():
    g = torch.Generator().manual_seed(2)
    a, b = rand_i8((37, 96), g), rand_i8((40, 96), g)
    sa, sb, bias = torch.rand(37).cuda(), torch.rand(40).cuda(), torch.randn(40).cuda()
    with fastattn.backend("cuda"):
        out = fastattn.int8_matmul(a.view(1, 37, 96), b, sa.view(1, 37), sb, bias, out_dtype=torch.bfloat16)
        q, s = fastattn.quantize_per_token(torch.randn(3, 5, 96, device="cuda", dtype=torch.float16))
    ref = int8_matmul_ref(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), bias.cpu(), torch.bfloat16)
    if not torch.equal(out.view(37, 40).cpu().view(torch.int16), ref.view(torch.int16)):
        fail("fastattn.int8_matmul(backend='cuda') differs from the reference")
    if q.shape != (3, 5, 96) or s.shape != (3, 5):
        fail(f"fastattn.quantize_per_token(backend='cuda') shapes {tuple(q.shape)} {tuple(s.shape)}")
    for call, match in [
        (lambda: _ext._C.int8_mm_cuda(a.float(), b, None, None, None, torch.float16), "a must have dtype"),
        (lambda: _ext._C.int8_mm_cuda(a, b[:, :95].contiguous(), None, None, None, torch.float16), "b must have K"),
        (lambda: _ext._C.int8_mm_cuda(a, b, sa[:5], None, None, torch.float16), "a_scale must have shape"),
        (lambda: _ext._C.int8_mm_cuda(a, b, sa, None, None, torch.int32), "int32"),
        (lambda: _ext._C.int8_mm_cuda(a, b, None, None, None, torch.float64), "out_dtype"),
        (lambda: _ext._C.int8_mm_cuda(a.cpu(), b, None, None, None, torch.float16), "CUDA tensor"),
        (lambda: _ext._C.quantize_rows_cuda(torch.randn(4, 8, device="cuda").t(), None), "contiguous"),
        (lambda: _ext._C.quantize_rows_cuda(torch.randn(4, 8, device="cuda"), torch.ones(7, device="cuda")),
         "smooth must have shape"),
    ]:
        try:
            call()
            fail(f"no error raised (expected one matching {match!r})")
        except RuntimeError as e:
            if match not in str(e):
                fail(f"error message {str(e)[:200]!r} does not contain {match!r}")
    print("frontend + argument errors: done", flush=True)


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

        run("torch bf16 matmul", lambda: af @ bf.T)
        run("torch._int_mm", lambda: torch._int_mm(a, b.T))

        def triton():
            with fastattn.backend("triton"):
                return fastattn.int8_matmul(a, b, sa, sb, out_dtype=torch.bfloat16)

        run("triton (fastattn)", triton)
        run("cuda auto", lambda: _ext._C.int8_mm_cuda(a, b, sa, sb, None, torch.bfloat16))
        for kname in (KERNELS[1:] if M >= 1024 else ["small_m", "tile64x64", "tile128x128"]):
            set_kernel(kname)
            try:
                run(f"cuda {kname}", lambda: _ext._C.int8_mm_cuda(a, b, sa, sb, None, torch.bfloat16))
            finally:
                set_kernel(None)
        ops = 2.0 * M * N * K
        nbytes = M * K + N * K + 2 * M * N
        for name, t in res.items():
            vs_bf16 = res.get("torch bf16 matmul", float("nan")) / t
            vs_int = res.get("torch._int_mm", float("nan")) / t
            print(f"{str((M, N, K)):>20} {name:>24} {t * 1e6:10.1f} {ops / t / 1e12:8.1f} {nbytes / t / 1e9:8.0f} "
                  f"{vs_bf16:8.2f} {vs_int:10.2f}", flush=True)
        del a, b, af, bf
        torch.cuda.empty_cache()


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
    ap.add_argument("--quick", action="store_true", help="correctness only")
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
    correctness_mm()
    correctness_quant()
    frontend_and_errors()
    print(f"\nCORRECTNESS: {'OK' if not failures else f'{len(failures)} FAILURES'} ({time.time() - t0:.1f} s)",
          flush=True)
    if not args.quick:
        timings()
    print(f"total {time.time() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
