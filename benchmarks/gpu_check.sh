#!/usr/bin/env bash
# One-command GPU check of fastopt: install, run the GPU tests, benchmark.
#
#   benchmarks/gpu_check.sh [--dry-run] [--no-venv] [RESULTS_FILE]
#
# On a machine with an NVIDIA GPU, its driver and python3 >= 3.10 (nothing
# else needed), this
#   1. creates a venv (build/gpu-check-venv; $FASTOPT_GPU_CHECK_VENV) and
#      installs the project with `pip install ".[cuda,torch]"` and pytest;
#   2. checks that fastopt, numba-cuda (and torch) import and see the GPU;
#   3. runs the tests of tests/test_cuda_backend.py that need a real GPU
#      (test_gpu_matches_reference: the whole rule x option matrix on device
#      arrays against the NumPy reference);
#   4. runs `python -m fastopt bench --device cuda --rules adamw,adam,sgd,lion
#      --sizes 2^20,2^24,2^26` (with torch.optim on the GPU as the competitor
#      when torch has CUDA);
# and writes everything to RESULTS_FILE (default gpu_check_results.txt; the
# benchmark's JSON goes next to it as RESULTS_FILE.json). Every step has a
# timeout, and all of them share a budget ($FASTOPT_GPU_CHECK_BUDGET, default
# 450 s) so the whole run ends in under 8 minutes. The exit status is 0 when
# every step passed.
#
# Options and environment:
#   --dry-run (or FASTOPT_GPU_CHECK_DRY_RUN=1)  the CPU-side parts only: install
#       (unless --no-venv), import check, `pytest --collect-only` of
#       tests/test_cuda_backend.py and `python -m fastopt bench --help`. CI runs
#       this without a GPU.
#   --no-venv  no venv and no install: use the current interpreter ($PYTHON, else
#       python3) with this checkout's src/ first on PYTHONPATH.
#   FASTOPT_TORCH_SPEC  what to pip-install for torch instead of the pyproject
#       pin (torch==2.13.0), word-split, e.g. "torch==2.13.0" or
#       "torch --index-url https://download.pytorch.org/whl/cu130". If torch
#       cannot be installed the check goes on without it (no torch rows).
#   FASTOPT_GPU_CHECK_PYTEST_K  the tests to run (pytest -k; default
#       test_gpu_matches_reference; empty: the whole file, which also needs
#       ptxas from the test extra).
#   PYTHON  the interpreter that creates the venv (or runs, with --no-venv).
set -u -o pipefail

usage() { sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=${FASTOPT_GPU_CHECK_DRY_RUN:-0}
[ "$DRY_RUN" = 1 ] || DRY_RUN=0
USE_VENV=1
RESULTS=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --no-venv) USE_VENV=0 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) if [ -n "$RESULTS" ]; then echo "gpu_check.sh: one results file, got $RESULTS and $arg" >&2; exit 2; fi
           RESULTS=$arg ;;
    esac
done
RESULTS=${RESULTS:-gpu_check_results.txt}
case "$RESULTS" in /*) ;; *) RESULTS="$PWD/$RESULTS" ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
BUDGET=${FASTOPT_GPU_CHECK_BUDGET:-450}
START=$SECONDS
PYTEST_K=${FASTOPT_GPU_CHECK_PYTEST_K-test_gpu_matches_reference}
FAILED=()
SUMMARY=()

mkdir -p "$(dirname "$RESULTS")" && : > "$RESULTS" || { echo "gpu_check.sh: cannot write $RESULTS" >&2; exit 2; }

log() { printf '%s\n' "$*" >> "$RESULTS"; }
say() { printf 'gpu_check: %s\n' "$*"; log "$*"; }

HAVE_TIMEOUT=0
command -v timeout > /dev/null 2>&1 && HAVE_TIMEOUT=1

# step NAME LIMIT_SECONDS REQUIRED(1/0) CMD...: run CMD with its output in the
# results file, at most LIMIT seconds (less when the budget is nearly spent).
step() {
    local name=$1 limit=$2 required=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    log ""
    log "===== $name (limit ${limit} s) ====="
    log "\$ $*"
    if [ "$limit" -lt 5 ]; then
        say "$name: SKIPPED (the ${BUDGET} s budget is spent)"
        SUMMARY+=("$name: skipped, out of time")
        [ "$required" = 1 ] && FAILED+=("$name")
        return 124
    fi
    local t0=$SECONDS rc
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        timeout --kill-after=10 "$limit" "$@" >> "$RESULTS" 2>&1
    else
        "$@" >> "$RESULTS" 2>&1
    fi
    rc=$?
    local took=$((SECONDS - t0)) verdict=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        verdict="TIMED OUT after ${took} s"
    elif [ "$rc" != 0 ]; then
        verdict="FAILED (exit $rc)"
    fi
    log "----- $name: $verdict (${took} s) -----"
    printf 'gpu_check: %s: %s (%s s)\n' "$name" "$verdict" "$took"
    SUMMARY+=("$name: $verdict (${took} s)")
    if [ "$rc" != 0 ] && [ "$required" = 1 ]; then FAILED+=("$name"); fi
    return "$rc"
}

finish() {
    log ""
    log "===== summary ====="
    local line
    for line in "${SUMMARY[@]}"; do log "  $line"; done
    if [ "${#FAILED[@]}" -eq 0 ]; then
        log "RESULT: PASS ($((SECONDS - START)) s)"
        echo "gpu_check: PASS in $((SECONDS - START)) s; results in $RESULTS"
        exit 0
    fi
    log "RESULT: FAIL (${FAILED[*]}) ($((SECONDS - START)) s)"
    echo "gpu_check: FAIL (${FAILED[*]}) in $((SECONDS - START)) s; results in $RESULTS"
    exit 1
}

say "fastopt GPU check: $([ "$DRY_RUN" = 1 ] && echo 'dry run (CPU-side parts only)' || echo 'full run'); results in $RESULTS"
log "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
log "host: $(uname -srm) $(hostname 2>/dev/null)"
log "checkout: $REPO ($(git -C "$REPO" describe --always --dirty 2>/dev/null || echo 'not a git checkout'))"
log "budget: ${BUDGET} s"

# ---- the GPU as the driver sees it -------------------------------------------------
if command -v nvidia-smi > /dev/null 2>&1; then
    step "nvidia-smi" 30 0 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
elif [ "$DRY_RUN" = 1 ]; then
    log "nvidia-smi: not found (fine for a dry run)"
else
    say "nvidia-smi: not found; the NVIDIA driver is needed for a full run"
fi

# ---- the interpreter ----------------------------------------------------------------
BASE_PY=${PYTHON:-python3}
if ! command -v "$BASE_PY" > /dev/null 2>&1; then
    say "no $BASE_PY found: set PYTHON to a python >= 3.10"
    FAILED+=("python"); finish
fi
if ! "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    say "$BASE_PY is $("$BASE_PY" -V 2>&1); fastopt needs python >= 3.10"
    FAILED+=("python"); finish
fi

TORCH=0
if [ "$USE_VENV" = 1 ]; then
    VENV=${FASTOPT_GPU_CHECK_VENV:-$REPO/build/gpu-check-venv}
    if [ -x "$VENV/bin/python" ]; then
        log "reusing the venv $VENV"
    else
        step "venv" 60 1 "$BASE_PY" -m venv "$VENV" || finish
    fi
    PY="$VENV/bin/python"
    if [ -n "${FASTOPT_TORCH_SPEC:-}" ]; then
        # shellcheck disable=SC2086  # the spec is words on purpose (a version, index options)
        step "install torch ($FASTOPT_TORCH_SPEC)" 240 0 "$PY" -m pip install --quiet $FASTOPT_TORCH_SPEC \
            || say "continuing without torch (no torch rows in the benchmark)"
        step "install fastopt[cuda]" 240 1 "$PY" -m pip install --quiet ".[cuda]"
    else
        step "install fastopt[cuda,torch]" 300 0 "$PY" -m pip install --quiet ".[cuda,torch]" \
            || { say "continuing without torch (no torch rows in the benchmark)";
                 step "install fastopt[cuda]" 240 1 "$PY" -m pip install --quiet ".[cuda]"; }
    fi
    if ! "$PY" -c 'import fastopt' > /dev/null 2>&1; then
        # The build of the C library needs a C compiler; the CUDA backend is pure
        # Python, so check this checkout's sources with their dependencies instead.
        say "fastopt is not installed (no C compiler?); using $REPO/src with its dependencies"
        step "install dependencies" 240 1 "$PY" -m pip install --quiet numpy numba cffi "numba-cuda[cu13]>=0.30,<0.31"
        export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    step "install pytest" 60 1 "$PY" -m pip install --quiet "pytest>=8"
else
    PY=$(command -v "$BASE_PY")
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    log "no venv: $PY with PYTHONPATH=$PYTHONPATH"
fi

# ---- imports ----------------------------------------------------------------------
IMPORTS='
import platform, sys
import numpy, numba
import fastopt
print("python", platform.python_version(), sys.executable)
print("fastopt", fastopt.__version__, fastopt.__file__)
print("numpy", numpy.__version__, "numba", numba.__version__)
try:
    import numba_cuda
    print("numba-cuda", getattr(numba_cuda, "__version__", "?"))
except ImportError as exc:
    print("numba-cuda: not importable:", exc)
from numba import cuda
print("cuda.is_available():", cuda.is_available())
if cuda.is_available():
    for d in cuda.gpus:
        print("  GPU", d.id, d.name.decode() if isinstance(d.name, bytes) else d.name, "cc", d.compute_capability)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available:", torch.cuda.is_available())
except ImportError as exc:
    print("torch: not importable:", exc)
print("backends:")
for info in fastopt.backends().values():
    print("  ", info)
'
step "imports" 120 1 "$PY" -c "$IMPORTS" || finish
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' > /dev/null 2>&1; then TORCH=1; fi

PYTEST_ARGS=(-p no:cacheprovider tests/test_cuda_backend.py)
if [ "$DRY_RUN" = 1 ]; then
    step "collect tests/test_cuda_backend.py" 180 1 "$PY" -m pytest --collect-only -q "${PYTEST_ARGS[@]}"
    step "bench --help" 60 1 "$PY" -m fastopt bench --help
    finish
fi

# ---- on the GPU --------------------------------------------------------------------
if ! "$PY" -c 'import sys; from numba import cuda; sys.exit(not cuda.is_available())' > /dev/null 2>&1; then
    say "no CUDA GPU visible to numba (see the imports step); the GPU steps cannot run"
    FAILED+=("gpu"); finish
fi
[ -n "$PYTEST_K" ] && PYTEST_ARGS+=(-k "$PYTEST_K")
step "GPU tests (pytest ${PYTEST_ARGS[*]})" 150 1 "$PY" -m pytest -q -rs "${PYTEST_ARGS[@]}"

BENCH=(-m fastopt bench --device cuda --rules adamw,adam,sgd,lion --sizes 2^20,2^24,2^26 --markdown --quiet
       --json "$RESULTS.json")
[ "$TORCH" = 1 ] || BENCH+=(--competitors none)
step "bench" 240 1 "$PY" "${BENCH[@]}"
finish
