"""Compile every GPU candidate config of fastattn's Triton kernels for sm_90 (H100) on a machine without a GPU, and
report what ptxas gave each: registers, spill bytes (LOCAL), dynamic shared memory. A config that fails to compile,
spills, or needs more shared memory than an H100 block has shows here before any GPU time is spent on it (there the
autotuner would skip it, or slowly run it).

Run (no GPU needed; TRITON_INTERPRET must be unset): python benchmarks/triton_sm90_check.py [--fail-on-spill]
"""
import argparse
import inspect
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastattn.kernels import add_norm as AN  # noqa: E402
from fastattn.kernels import cross_entropy as CE  # noqa: E402
from fastattn.kernels import attention as A  # noqa: E402
from fastattn.kernels import decode as DEC  # noqa: E402
from fastattn.kernels import dropout as D  # noqa: E402
from fastattn.kernels import int8 as I8  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory one H100 block may take (227 KiB): above it the launch fails
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_usage(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int, options=None) -> dict:
    """ptxas's resource use of kernel for sm_90; types: argument name -> Triton type ("*bf16", "i32", ...). As at a
    real launch of the benchmarked shapes, pointers and the integers in ALIGNED are known multiples of 16 (what
    lets Triton vectorize loads and pipeline them through shared memory)."""
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = [n for n in names if sig[n].startswith("*") or (sig[n] == "i32" and n in ALIGNED)]
    src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(src, target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = next(line for line in out.splitlines() if "REG:" in line).split()
    usage = {k: int(v) for k, v in (f.split(":") for f in fields if f.split(":")[1].isdigit())}
    return {"regs": usage["REG"], "spill": usage["LOCAL"], "smem": compiled.metadata.shared}


# head dims, row widths and strides of the benchmarked shapes (sequence lengths and M are left unknown)
ALIGNED = {"E", "EV", "N", "K", "stride_am", "stride_bn", "stride_cm"} | {
    f"stride_{t}{d}" for t in ("q", "k", "v", "o", "m", "g", "dq", "dk", "dv") for d in "bhmn"}  # g: dout
ATTN_TYPES = {**{n: "*bf16" for n in ("Q", "K", "V", "DOut", "Out", "DK", "DV", "DQ")},
              **{n: "*fp32" for n in ("Lse", "Delta", "Alibi")}, "Mask": "*i8", "CuQ": "*i32", "CuK": "*i32",
              **{n: "fp32" for n in ("sm_scale", "softcap", "dropout_p")}, "seed": "i64", "rng_offset": "i64"}
ATTN_KERNELS = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}
MM_TYPES = {"A": "*i8", "B": "*i8", "C": "*bf16", "AS": "*fp32", "BS": "*fp32", "Bias": "*fp32"}


def cases():
    """(name, kernel, types, constexprs, warps, stages[, options]) for every candidate config, then every feature
    branch (masks, window, ALiBi, softcap, dropout's Philox) and the small kernels once."""
    for which, classes in A._CONFIGS.items():
        for dim, group in classes.items():
            for m, n, w, st in group:
                for causal in (False, True):
                    ce = dict(MASK_KIND=A.MASK_NONE, CAUSAL=causal, HAS_WINDOW=False, HAS_ALIBI=False,
                              SOFTCAP=False, DROPOUT=False, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", VARLEN=False,
                              BLOCK_M=m, BLOCK_N=n, BLOCK_D=dim, BLOCK_DV=dim)
                    yield (f"attention {which} d{dim} {m}x{n} w{w} s{st} causal={causal}", ATTN_KERNELS[which],
                           ATTN_TYPES, ce, w, st)
    for w8a16 in (False, True):
        for cfg in I8._mm_configs(all_configs=True, w8a16=w8a16):
            name = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            if w8a16:
                ce = dict(cfg.kwargs, HAS_BIAS=True, DOT_F32=False, EVEN_K=True)
                yield (f"w8a16 gemm {name} w{cfg.num_warps} s{cfg.num_stages}", I8._w8a16_mm_kernel,
                       dict(MM_TYPES, A="*bf16"), ce, cfg.num_warps, cfg.num_stages)
            else:
                ce = dict(cfg.kwargs, HAS_AS=True, HAS_BS=True, HAS_BIAS=True, OUT_INT32=False, EVEN_K=True)
                yield (f"int8 gemm {name} w{cfg.num_warps} s{cfg.num_stages}", I8._int8_mm_kernel, MM_TYPES, ce,
                       cfg.num_warps, cfg.num_stages)
    dec_types = dict(ATTN_TYPES, Seqlens="*i32", Keep="*i1", PartO="*fp32", PartLse="*fp32")
    for m, d in ((16, 64), (64, 128), (16, 256)):  # the split kernel's tiles in decode_fwd (BLOCK_N 64, 4 warps)
        for direct in (True, False):
            ce = dict(NSPLIT=1 if direct else 8, HAS_LENS=True, HAS_KEEP=True, CAUSAL=True, SOFTCAP=False,
                      DIRECT=direct, DOT_F32=False, PRECISION="tf32", BLOCK_M=m, BLOCK_N=64, BLOCK_D=d, BLOCK_DV=d)
            yield (f"decode attention split d{d} {m}x64 direct={direct}", DEC._decode_split_kernel, dec_types, ce, 4, 2)
    yield ("decode attention combine", DEC._decode_combine_kernel, dec_types, dict(NSPLIT=8, BLOCK_S=8, BLOCK_DV=128),
           4, 1)
    for n, k, w, once in I8._SMALL_M_TILES:
        for int8_a in (True, False):
            ce = dict(HAS_AS=int8_a, HAS_BS=True, HAS_BIAS=True, OUT_INT32=False, INT8_A=int8_a, BLOCK_N=n,
                      BLOCK_K=k, REDUCE_ONCE=once)
            yield (f"decode {'w8a8' if int8_a else 'w8a16'} {n}x{k} w{w} reduce_once={once}", I8._small_m_kernel,
                   MM_TYPES if int8_a else dict(MM_TYPES, A="*bf16"), ce, w, 3)
    for which, classes in A._CONFIGS.items():  # every feature on, in each kernel's first config per head dim
        for dim, group in classes.items():
            m, n, w, st = group[0]
            for kind, mask in ((A.MASK_BOOL, "*i8"), (A.MASK_FLOAT, "*fp32"), (A.MASK_NONE, "varlen")):
                ce = dict(MASK_KIND=kind, CAUSAL=True, HAS_WINDOW=True, HAS_ALIBI=True, SOFTCAP=True, DROPOUT=2,
                          DOT_DTYPE=tl.bfloat16, PRECISION="tf32", VARLEN=kind == A.MASK_NONE, BLOCK_M=m, BLOCK_N=n,
                          BLOCK_D=dim, BLOCK_DV=dim)
                what = "packed sequences (varlen)" if kind == A.MASK_NONE else f"mask {mask[1:]}"
                yield (f"attention {which} d{dim} {m}x{n} every feature, {what}", ATTN_KERNELS[which],
                       dict(ATTN_TYPES, Mask=mask if kind != A.MASK_NONE else "*i8"), ce, w, st)
    for varlen in (False, True):
        yield (f"attention bwd preprocess varlen={varlen}", A._attn_bwd_preprocess,
               {"Out": "*bf16", "DOut": "*bf16", "Delta": "*fp32", "CuQ": "*i32"},
               dict(VARLEN=varlen, BLOCK_M=64, BLOCK_DV=128), 4, 1)
    for mode in (1, 2):  # Philox per key, per four keys (dropout's offsets: any, multiples of 4)
        yield (f"attention dropout mask, mode {mode}", A._dropout_mask_kernel, dict(ATTN_TYPES, Keep="*i8"),
               dict(DROPOUT=mode, BLOCK_M=32, BLOCK_N=32), 4, 1)
        for dtype in ("bf16", "fp32"):
            yield (f"dropout {dtype}, grouped={mode == 2}", D._dropout_kernel,
                   {"X": f"*{dtype}", "Out": f"*{dtype}", "n": "i64", "p": "fp32", "scale": "fp32", "seed": "i64",
                    "offset": "i64"}, dict(GROUPED=mode == 2, BLOCK=D.BLOCK), 4, 1)
    for dtype in ("bf16", "fp32"):
        for grad in (False, True):
            yield (f"cross-entropy rows {dtype} write_grad={grad}", CE._cross_entropy_kernel,
                   {"X": f"*{dtype}", "T": "*i64", "Loss": "*fp32"}, dict(WRITE_GRAD=grad, BLOCK=4096), 8, 1)
    norm_types = {**{n: "*bf16" for n in ("X", "R", "W", "B", "Y", "S", "DY", "DS", "DX")},
                  **{n: "*fp32" for n in ("Mean", "Rstd", "DRES", "DW", "DB")}, "eps": "fp32"}
    for block_n in (1024, AN.MAX_COLS):
        _, warps = AN._block_and_warps(block_n, 2)
        for rms in (False, True):
            yield (f"add+{'rms' if rms else 'layer'}norm fwd N{block_n}", AN._add_norm_fwd_kernel, norm_types,
                   dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=not rms, IS_RMS=rms, STORE_S=True,
                        BLOCK_N=block_n), warps, 1)
            yield (f"add+{'rms' if rms else 'layer'}norm bwd N{block_n}", AN._add_norm_bwd_kernel, norm_types,
                   dict(HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_DS=True, IS_RMS=rms, WRITE_DRES=True,
                        BLOCK_N=block_n), 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16, 1)
    yield ("int8 quantize rows", I8._quantize_rows_kernel,
           {"X": "*bf16", "Smooth": "*fp32", "Q": "*i8", "Scale": "*fp32"}, dict(HAS_SMOOTH=True, BLOCK_K=4096), 4, 1,
           {"enable_fp_fusion": False})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any config spills registers")
    args = ap.parse_args()
    failed = spilled = too_big = 0
    for name, kernel, types, ce, warps, stages, *options in cases():
        try:
            u = compile_usage(kernel, types, ce, warps, stages, *options)
        except Exception as e:  # a config that does not compile: say which and why, go on
            failed += 1
            print(f"FAILED  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        spilled += u["spill"] > 0
        too_big += u["smem"] > SMEM_LIMIT
        flag = "NO-FIT" if u["smem"] > SMEM_LIMIT else "SPILLS" if u["spill"] else "ok    "
        print(f"{flag}  {name}: {u['regs']} regs, {u['spill']} B spilled, {u['smem'] // 1024} KiB smem", flush=True)
    print(f"{failed} failed to compile, {spilled} spill, {too_big} need more than {SMEM_LIMIT // 1024} KiB of shared "
          "memory (never launched)")
    sys.exit(1 if failed or (spilled and args.fail_on_spill) else 0)


if __name__ == "__main__":
    main()
