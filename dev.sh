#!/usr/bin/env bash
# Set up .venv (torch, build tools), build fastattn in place, then run one job:
#   bash dev.sh demo    check every backend against the reference and print the speedups on this machine, then
#                       train a small GPT on the embedded corpus for 2 minutes and generate from it
#                       (extra arguments go to `fastattn demo`: --train-seconds N, 0 to skip)
#   bash dev.sh test    the test suite (extra arguments go to pytest)
#   bash dev.sh bench   the pytest-benchmark comparisons (extra arguments go to pytest)
#   bash dev.sh lint    ruff check . with pyproject.toml's rules, no build (extra arguments go to ruff: --fix)
# Environment: PYTHON (default python3), MAX_JOBS, FASTATTN_CUDA_ARCHS, FASTATTN_SKIP_CUDA_BUILD (see README).
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-demo}
shift || true
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
if [ "$job" = lint ]; then exec .venv/bin/python -m ruff check . "$@"; fi  # no build needed
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# setup.py keeps the compiled objects in build/temp.*: a rerun recompiles only changed C++/CUDA sources
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
case "$job" in
  demo)  exec .venv/bin/python -m fastattn demo "$@" ;;
  test)  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" ;;
  bench) exec .venv/bin/python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider "$@" ;;
  *) echo "usage: bash dev.sh [demo|test|bench|lint] [args...]" >&2; exit 2 ;;
esac
