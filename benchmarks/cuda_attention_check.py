"""GPU check of the CUDA C++ flash attention kernels (fastattn._C.attention_fwd_cuda / attention_bwd_cuda).

Builds nothing: run it after `pip install --no-build-isolation -e .` on a GPU machine.

1. Correctness: for a grid of cases (head dims 32/64/128, fp16/bf16, L != S both ways, causal top-left and
   bottom-right, bool masks incl. stride-0 broadcasts and fully masked rows, GQA / MQA, strided and unaligned inputs)
   out, lse, dq, dk, dv are compared with fastattn.reference.attention_ref in float64: each error must be at most
   2 x torch's own error in the same dtype + EPS[dtype] x magnitude (tests/test_attention.py's bound); rows with no
   key must give out = dq = 0 and lse = +inf; the backward must be deterministic; refused features must raise.
2. Timing (bf16, B * L = 16k tokens): forward and backward of the cuda backend vs torch's flash SDPA backend and
   fastattn's Triton backend (FASTATTN_AUTOTUNE=0 unless set: Triton runs its first config, no tuning).

Prints a compact table; exits 1 on any correctness failure, 2 when the kernels are missing. < 60 s on an H100.
usage: python benchmarks/cuda_attention_check.py [--no-bench] [--quick]
(FASTATTN_CHECK_EXT=/path/ext.so: take the ops from a standalone build of the binding instead of fastattn._C)
"""
import argparse
import math
import os
import sys
import time
import traceback

os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402
from fastattn import _ext  # noqa: E402
from fastattn.reference import attention_ref  # noqa: E402

EPS = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEV = "cuda"
T0 = time.time()


def c_ops():
    path = os.environ.get("FASTATTN_CHECK_EXT")
    if path:  # a standalone build of the attention binding (torch.utils.cpp_extension.load) instead of fastattn._C
        import importlib.machinery
        import importlib.util
        name = os.path.basename(path).split(".")[0]
        spec = importlib.util.spec_from_loader(name, importlib.machinery.ExtensionFileLoader(name, path))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _ext._C, _ext._C_ERROR = mod, None  # the dispatcher (fastattn.attention) reads _ext._C at call time
    C = _ext._C
    if C is None or not hasattr(C, "attention_fwd_cuda") or not hasattr(C, "attention_bwd_cuda"):
        why = _ext._C_ERROR if C is None else "fastattn._C has no attention_fwd_cuda / attention_bwd_cuda"
        print(f"SKIP: the CUDA attention kernels are not built ({why})")
        sys.exit(2)
    return C


def flat(scale, causal, diag):
    # scale, causal, diag_offset, window_left, window_right, softcap, dropout_p, seed, offset
    return (float(scale), bool(causal), int(diag), -1, -1, 0.0, 0.0, 0, 0)


def bhld(B, h, n, D, dtype, layout, gen):
    """(B, h, n, D) on the GPU: 'contig', 'bshd' (a transposed view), 'padded' (row pitch D + 8),
    'unaligned' (data pointer 8 bytes off 16-byte alignment: the binding copies it)."""
    if layout == "bshd":
        return torch.randn(B, n, h, D, generator=gen, device=DEV, dtype=torch.float32).to(dtype).transpose(1, 2)
    if layout == "padded":
        return torch.randn(B, h, n, D + 8, generator=gen, device=DEV, dtype=torch.float32).to(dtype)[..., :D]
    x = torch.randn(B, h, n, D, generator=gen, device=DEV, dtype=torch.float32).to(dtype)
    if layout == "unaligned":
        buf = torch.empty(x.numel() + 4, device=DEV, dtype=dtype)
        y = buf[4:].view(B, h, n, D)
        y.copy_(x)
        return y
    return x


def make_mask(kind, B, H, L, S, gen):
    if kind is None:
        return None
    if kind == "full":
        m = torch.rand(B, H, L, S, generator=gen, device=DEV) > 0.3
        m[:, :, L // 2] = False  # a row with no key
        return m
    if kind == "bcast":  # (L, S) broadcast: strides (0, 0, S, 1)
        m = torch.rand(L, S, generator=gen, device=DEV) > 0.4
        m[0] = False
        return m.expand(B, H, L, S)
    if kind == "kpm":  # key padding (B, 1, 1, S) broadcast: strides (S, 0, 0, 1)
        m = torch.rand(B, S, generator=gen, device=DEV) > 0.3
        m[0] = False  # batch 0 sees no key at all
        return m[:, None, None, :].expand(B, H, L, S)
    if kind == "colmajor":  # stride(-1) = L
        return (torch.rand(B, H, S, L, generator=gen, device=DEV) > 0.5).transpose(-1, -2)
    raise ValueError(kind)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_case(C, dtype, B, H, Hk, L, S, D, causal, mask_kind=None, layout="contig", scale=None, seed=0):
    """None when the case passes, else a message."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = bhld(B, H, L, D, dtype, layout, gen), bhld(B, Hk, S, D, dtype, layout, gen), bhld(B, Hk, S, D, dtype,
                                                                                                  layout, gen)
    dout = torch.randn(B, H, L, D, generator=gen, device=DEV, dtype=torch.float32).to(dtype)
    mask = make_mask(mask_kind, B, H, L, S, gen)
    scale = D ** -0.5 if scale is None else scale
    diag = 0 if causal == "top_left" else S - L
    args = flat(scale, causal is not None, diag)

    out, lse = C.attention_fwd_cuda(q, k, v, mask, None, *args)
    dq, dk, dv = C.attention_bwd_cuda(dout, q, k, v, out, lse, mask, None, *args)
    dq2, dk2, dv2 = C.attention_bwd_cuda(dout, q, k, v, out, lse, mask, None, *args)

    def grads(qq, kk, vv, upcast):
        leaves = [t.detach().clone().requires_grad_() for t in (qq, kk, vv)]
        o, l = attention_ref(*leaves, mask, causal=causal, scale=scale, upcast=upcast, return_lse=True)
        o.backward(dout.to(o.dtype))
        return [o, l] + [t.grad for t in leaves]

    exact = grads(q.double(), k.double(), v.double(), True)
    base = grads(q, k, v, False)
    mag = max([1.0] + [e.abs().max().item() for i, e in enumerate(exact) if i != 1 and e.numel()])
    msgs = []
    ratio = 0.0
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), [base[0]] + base[2:],
                             [exact[0]] + exact[2:]):
        if a.dtype != dtype or a.shape != e.shape:
            msgs.append(f"{name}: {a.dtype} {tuple(a.shape)}")
            continue
        if not torch.isfinite(a).all():
            msgs.append(f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite")
            continue
        err, terr = max_err(a, e), max_err(t, e)
        bound = 2 * terr + EPS[dtype] * mag
        ratio = max(ratio, err / bound)
        if err > bound:
            msgs.append(f"{name}: err {err:.3g} > {bound:.3g} (torch {terr:.3g})")
    empty = exact[1] == float("-inf")
    if lse.dtype != torch.float32 or lse.shape != (B, H, L):
        msgs.append(f"lse: {lse.dtype} {tuple(lse.shape)}")
    else:
        if not bool((lse[empty] == float("inf")).all()):
            msgs.append("lse: rows with no key are not +inf")
        if (~empty).any():
            le = max_err(lse[~empty], exact[1][~empty])
            if not math.isfinite(le) or le > 2e-3 * max(1.0, exact[1][~empty].abs().max().item()):
                msgs.append(f"lse: err {le:.3g}")
    if empty.any():
        if not bool((out[empty] == 0).all()):
            msgs.append("out: rows with no key are not 0")
        if not bool((dq[empty] == 0).all()):
            msgs.append("dq: rows with no key are not 0")
    if not (torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)):
        msgs.append("backward is not deterministic")
    return ("; ".join(msgs) if msgs else None), ratio


def correctness_cases(quick):
    cs = []
    dts = (torch.float16, torch.bfloat16)
    seqs = [(1, 1), (17, 17), (64, 64), (97, 129), (129, 97), (200, 17), (17, 200), (1, 300), (300, 1), (515, 1000)]
    if quick:
        seqs = [(17, 17), (97, 129), (129, 97), (515, 1000)]
    n = 0
    for D in (32, 64, 128):
        for L, S in seqs:
            for causal in (None, "top_left", "bottom_right"):
                n += 1
                cs.append(dict(dtype=dts[n % 2], B=1, H=2, Hk=2, L=L, S=S, D=D, causal=causal, seed=n))
    for D in (32, 64, 128):
        for mk in ("full", "bcast", "kpm", "colmajor"):
            for causal in (None, "top_left", "bottom_right"):
                n += 1
                cs.append(dict(dtype=dts[n % 2], B=2, H=2, Hk=2, L=45, S=67, D=D, causal=causal, mask_kind=mk, seed=n))
    for D in (32, 64, 128):
        for H, Hk in ((8, 2), (8, 1), (3, 3)):
            for causal in (None, "bottom_right"):
                n += 1
                cs.append(dict(dtype=dts[n % 2], B=2, H=H, Hk=Hk, L=29 if H == 8 else 130, S=61 if H == 8 else 75,
                               D=D, causal=causal, layout=("bshd", "padded", "contig", "unaligned")[n % 4], seed=n))
    for D in (64, 128):  # bigger: many blocks, the cp.async pipeline, GQA with a mask
        n += 1
        cs.append(dict(dtype=torch.bfloat16, B=2, H=8, Hk=2, L=1000, S=1100, D=D, causal="bottom_right",
                       mask_kind="kpm", layout="bshd", seed=n))
        n += 1
        cs.append(dict(dtype=torch.float16, B=1, H=4, Hk=4, L=2048, S=2048, D=D, causal="top_left", seed=n))
    n += 1
    cs.append(dict(dtype=torch.float16, B=1, H=2, Hk=1, L=33, S=70, D=64, causal=None, scale=0.3, seed=n))
    n += 1
    cs.append(dict(dtype=torch.bfloat16, B=1, H=1, Hk=1, L=33, S=70, D=32, causal="top_left", scale=-0.2, seed=n))
    return cs


def check_nan_tails(C):
    """q, k, v, dout, mask as views at the start of NaN-filled buffers: any read past their ends poisons results."""
    def tail(shape, dtype=torch.float16):
        nel = math.prod(shape)
        if dtype == torch.bool:
            buf = torch.ones(nel + 8192, dtype=torch.bool, device=DEV)
            buf[:nel] = torch.rand(nel, device=DEV) > 0.3
        else:
            buf = torch.full((nel + 8192,), float("nan"), dtype=dtype, device=DEV)
            buf[:nel] = torch.randn(nel, device=DEV).to(dtype)
        return buf[:nel].view(shape)

    q, k, v, dout = tail((1, 2, 37, 64)), tail((1, 2, 53, 64)), tail((1, 2, 53, 64)), tail((1, 2, 37, 64))
    mask = tail((1, 2, 37, 53), torch.bool)
    msgs = []
    for causal in (False, True):
        args = flat(0.125, causal, 53 - 37)
        out, lse = C.attention_fwd_cuda(q, k, v, mask, None, *args)
        grads = C.attention_bwd_cuda(dout, q, k, v, out, lse, mask, None, *args)
        for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
            if not torch.isfinite(t).all():
                msgs.append(f"{name} (causal={causal}): NaN read from past the end of an input")
    return msgs


def check_refusals(C):
    """Unsupported inputs must raise (RuntimeError from TORCH_CHECK), never run."""
    g = torch.Generator(device=DEV).manual_seed(0)

    def t(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)

    q, k, v = t(1, 2, 16, 64), t(1, 2, 24, 64), t(1, 2, 24, 64)
    ok = flat(0.125, False, 0)
    bad = {
        "alibi": lambda: C.attention_fwd_cuda(q, k, v, None, torch.ones(1, 2, device=DEV), *ok),
        "window": lambda: C.attention_fwd_cuda(q, k, v, None, None, 0.125, False, 0, 4, -1, 0.0, 0.0, 0, 0),
        "softcap": lambda: C.attention_fwd_cuda(q, k, v, None, None, 0.125, False, 0, -1, -1, 5.0, 0.0, 0, 0),
        "dropout": lambda: C.attention_fwd_cuda(q, k, v, None, None, 0.125, False, 0, -1, -1, 0.0, 0.1, 1, 0),
        "float mask": lambda: C.attention_fwd_cuda(q, k, v, torch.zeros(1, 2, 16, 24, device=DEV), None, *ok),
        "mask shape": lambda: C.attention_fwd_cuda(q, k, v, torch.ones(1, 2, 16, 23, dtype=torch.bool, device=DEV),
                                                   None, *ok),
        "head dim 96": lambda: C.attention_fwd_cuda(t(1, 2, 16, 96), t(1, 2, 24, 96), t(1, 2, 24, 96), None, None,
                                                    *ok),
        "Ev != E": lambda: C.attention_fwd_cuda(q, k, t(1, 2, 24, 32), None, None, *ok),
        "float32": lambda: C.attention_fwd_cuda(q.float(), k.float(), v.float(), None, None, *ok),
        "dtype mix": lambda: C.attention_fwd_cuda(q, k.bfloat16(), v, None, None, *ok),
        "H % Hk": lambda: C.attention_fwd_cuda(t(1, 3, 16, 64), k, v, None, None, *ok),
        "stride(-1)": lambda: C.attention_fwd_cuda(t(1, 2, 64, 16).transpose(-1, -2), k, v, None, None, *ok),
        "cpu": lambda: C.attention_fwd_cuda(q.cpu(), k.cpu(), v.cpu(), None, None, *ok),
    }
    msgs = []
    for name, fn in bad.items():
        try:
            fn()
            torch.cuda.synchronize()
            msgs.append(f"{name}: accepted")
        except RuntimeError:
            pass
        except Exception as e:  # noqa: BLE001
            msgs.append(f"{name}: raised {type(e).__name__} (expected RuntimeError)")
    return msgs


def check_public_api():
    """fastattn.attention on the cuda backend (dispatch + autograd) vs the float64 reference."""
    g = torch.Generator(device=DEV).manual_seed(1)
    B, H, Hk, L, S, D = 2, 4, 2, 77, 130, 64
    q, k, v = (torch.randn(B, h, n, D, generator=g, device=DEV).half() for h, n in ((H, L), (Hk, S), (Hk, S)))
    kpm = torch.rand(B, S, generator=g, device=DEV) > 0.2
    dout = torch.randn(B, H, L, D, generator=g, device=DEV).half()
    msgs = []
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastattn.backend("cuda"):
        out = fastattn.attention(*leaves, causal="bottom_right", key_padding_mask=kpm, enable_gqa=True)
        out.backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_leaves, kpm[:, None, None, :], causal="bottom_right")
    ref.backward(dout.double())
    for name, a, e in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                          [ref] + [t.grad for t in ref_leaves]):
        err = max_err(a, e)
        if not err <= 2e-2 * max(1.0, e.abs().max().item()):
            msgs.append(f"fastattn.attention {name}: err {err:.3g}")
    return msgs


# ---------------------------------------------------------------------------------------------------- timing
def bench(deadline):
    from fastattn.testing import median_ms
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    dtype = torch.bfloat16
    # most informative first: the rest is skipped once the time budget is spent
    configs = [(128, 4096, False), (128, 4096, True), (64, 4096, False), (64, 4096, True), (128, 16384, True),
               (64, 1024, False)]
    for D, L, causal in configs:
        H, B = 2048 // D, 16384 // L
        if time.time() > deadline:
            rows.append((D, L, causal, None))
            continue
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, L, D, generator=g, device=DEV).to(dtype) for _ in range(4))
        fwd_flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        res = {}

        def ours(backend):
            def fwd():
                with fastattn.backend(backend):
                    return fastattn.attention(q, k, v, causal="top_left" if causal else None)
            return fwd

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        for name, fwd in (("cuda", ours("cuda")), ("triton", ours("triton")), ("torch-flash", sdpa)):
            try:
                with torch.no_grad():
                    tf = median_ms(fwd, DEV)
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]

                def run_fwd_grad():
                    if name == "torch-flash":
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(*leaves, is_causal=causal)
                    with fastattn.backend(name):
                        return fastattn.attention(*leaves, causal="top_left" if causal else None)

                o = run_fwd_grad()
                tb = median_ms(lambda: torch.autograd.grad(o, leaves, dout, retain_graph=True), DEV)
                res[name] = (tf, tb)
            except Exception as e:  # noqa: BLE001
                res[name] = repr(e)[:80]
        rows.append((D, L, causal, (res, fwd_flops)))
        del q, k, v, dout
        torch.cuda.empty_cache()
    return rows


def print_bench(rows):
    names = ("cuda", "triton", "torch-flash")
    print("\ntiming (bf16, B*L = 16384, H*D = 2048; ms and TFLOP/s; bwd = backward only, 2.5x fwd flops)")
    print(f"{'D':>4} {'L':>5} {'causal':>6} {'dir':>3} | " + " | ".join(f"{n:>20}" for n in names) +
          " | cuda vs flash")
    for D, L, causal, r in rows:
        if r is None:
            print(f"{D:>4} {L:>5} {str(causal):>6}  (skipped: time budget)")
            continue
        res, ff = r
        for di, (dname, mult) in enumerate((("fwd", 1.0), ("bwd", 2.5))):
            cells = []
            for n in names:
                x = res.get(n)
                if isinstance(x, tuple):
                    ms = x[di]
                    cells.append(f"{ms:8.3f} ms {ff * mult / ms / 1e9:6.0f} TF")
                else:
                    cells.append(f"{'ERR ' + str(x)[:16]:>20}")
            rel = ""
            if isinstance(res.get("cuda"), tuple) and isinstance(res.get("torch-flash"), tuple):
                rel = f"{res['torch-flash'][di] / res['cuda'][di]:.2f}x"
            print(f"{D:>4} {L:>5} {str(causal):>6} {dname:>3} | " + " | ".join(cells) + f" | {rel}")
        for n in names:
            if isinstance(res.get(n), str):
                print(f"      {n}: {res[n]}")


def refusals_in_child():
    """check_refusals in a child process, so that a crash in an error path is reported instead of ending this run
    (on the GPU image, torch 2.11, a binding built there segfaulted when a TORCH_CHECK with a composed message
    failed; cause not established)."""
    import subprocess
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--refusals-only"], capture_output=True,
                           text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return ["child timed out"]
    lines = [ln[len("REFUSAL "):] for ln in r.stdout.splitlines() if ln.startswith("REFUSAL ")]
    if r.returncode not in (0, 1):
        tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
        return [f"child exited with {r.returncode} (negative: killed by that signal): " + " | ".join(tail)] + lines
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--refusals-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no GPU")
        sys.exit(2)
    C = c_ops()
    if args.refusals_only:
        msgs = check_refusals(C)
        for m in msgs:
            print(f"REFUSAL {m}")
        sys.exit(1 if msgs else 0)
    print(f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), torch "
          f"{torch.__version__}, fastattn._C cuda_archs {getattr(C, 'cuda_archs', '?')}")
    failures = []
    worst = 0.0
    cases = correctness_cases(args.quick)
    t1 = time.time()
    for c in cases:
        desc = " ".join(f"{k}={v}" for k, v in c.items() if k != "seed").replace("torch.", "")
        try:
            msg, ratio = check_case(C, **c)
        except Exception as e:  # noqa: BLE001
            msg, ratio = f"raised {type(e).__name__}: {str(e)[:300]}", 0.0
            traceback.print_exc()
        worst = max(worst, ratio)
        if msg:
            failures.append(f"{desc}: {msg}")
            print(f"FAIL {desc}: {msg}", flush=True)
    torch.cuda.synchronize()
    print(f"correctness: {len(cases)} cases, {len(failures)} failed, worst err / bound {worst:.3f} "
          f"({time.time() - t1:.1f}s)")

    def report(name, fn):
        try:
            msgs = fn()
        except Exception as e:  # noqa: BLE001
            msgs = [f"raised {type(e).__name__}: {str(e)[:300]}"]
        print(f"{name}: {'ok' if not msgs else 'FAIL'}", flush=True)
        for m in msgs:
            print(f"FAIL {name}: {m}")
        failures.extend(f"{name}: {m}" for m in msgs)

    report("NaN-tail inputs", lambda: check_nan_tails(C))
    report("fastattn.attention(backend='cuda')", check_public_api)
    if not args.no_bench:
        try:
            print_bench(bench(deadline=T0 + 45))
        except Exception as e:  # noqa: BLE001
            print(f"timing failed: {type(e).__name__}: {str(e)[:300]}")
    report("refusals (child process)", refusals_in_child)
    print(f"\n{'PASS' if not failures else 'FAIL'}: {len(failures)} correctness failure(s); {time.time() - T0:.1f}s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
