#!/usr/bin/env bash
# The GPU suite: on a fresh GPU machine with torch, triton and nvcc (no internet), build fastattn for this GPU, run
# the whole test suite on it (the gpu-marked tests too: tests/test_cuda_*.py check the CUDA C++ kernels), run the GPU
# benchmarks, and write OUTDIR/summary.md + summary.json (GPU, commit, measured copy bandwidth, each kernel's speedup
# vs torch) with the logs. Budget: <= 8 minutes on an H100.
#   usage: bash benchmarks/gpu_suite.sh OUTDIR   (PYTHON=python3, FASTATTN_COMMIT=<sha> when .git is absent,
#          SUITE_BUDGET_S=450: the tests and benchmarks are cut off so that the whole suite ends within it;
#          BENCH_RESERVE_S=210 of it are kept for the benchmarks: bench_train.py's two compiled GPT-2-small rows
#          compile first, outside the timing)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-450}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
log() { echo "[gpu_suite +$(elapsed)s] $*"; }
commit=${FASTATTN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
log "GPU: $(tail -1 "$OUT/gpu.txt"); commit $commit"

arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
log "building for sm_$arch"
if ! FASTATTN_CUDA_ARCHS=$arch MAX_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps -e . \
     > "$OUT/build.log" 2>&1; then
  log "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1
fi
log "built: $($PY -c 'import fastattn; i = fastattn.build_info(); print(i["cuda_archs"], i["backends"])')"

xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n $(( $(nproc) > 12 ? 12 : $(nproc) ))"
t_tests=$(( BUDGET - $(elapsed) - ${BENCH_RESERVE_S:-210} ))
log "tests ($xdist, one OpenMP thread per worker (CI covers the threaded CPU paths), up to ${t_tests}s)"
OMP_NUM_THREADS=1 FASTATTN_EXPECT_CPP=1 FASTATTN_EXPECT_CUDA_OPS=1 timeout -s INT -k 20 $t_tests $PY -m pytest tests -q \
  -p no:cacheprovider $xdist -o junit_family=xunit1 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
log "tests rc=$?: $(tail -1 "$OUT/tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40

t_bench=$(( BUDGET - $(elapsed) - 25 ))
log "benchmarks (up to ${t_bench}s)"
FASTATTN_BENCH_SUITE=1 timeout -s INT -k 10 $t_bench $PY -m pytest benchmarks/bench_int8.py benchmarks/bench_add_norm.py \
  benchmarks/bench_decode.py benchmarks/bench_attention.py benchmarks/bench_dropout.py benchmarks/bench_modules.py \
  benchmarks/bench_models.py benchmarks/bench_hf.py benchmarks/bench_train.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
log "benchmarks rc=$?: $(tail -1 "$OUT/bench.log")"

$PY benchmarks/gpu_summary.py "$OUT" "$commit"
$PY benchmarks/plot.py "$OUT/bench.json" "$OUT/speedup.png" > /dev/null
log "done"
