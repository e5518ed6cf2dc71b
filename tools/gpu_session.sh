#!/usr/bin/env bash
# One device session: versions, the GPU test suite (property tests with backend="gpu"
# plus tests/gpu, in parallel processes), then the full benchmark alone on the GPU.
# Logs and JSON go to $OUT. Usage: OUT=dir bash tools/gpu_session.sh [tests] [bench] [tc]
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/sla_numba_nbcache}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
STEPS=${*:-tests bench}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }
{ nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  python -c "import sys, torch, numpy, numba, numba.cuda as c, cupy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__)"
  python -m pip show numba-cuda 2>/dev/null | grep -i ^version; } > "$OUT/versions.txt" 2>&1
el "start: $STEPS"
if [[ " $STEPS " == *" tests "* || " $STEPS " == *" bench "* ]]; then
  python tools/warm_tc.py v2:64:64:64:bf16 v2:64:64:64:f16 v2:128:64:64:bf16 \
      v2:128:64:64:f16 v2:128:64:128:bf16 > "$OUT/warm_tc.log" 2>&1
  el "warm tc rc=$?"
fi
if [[ " $STEPS " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-280} python benchmarks/bench_gpu.py ${BENCH_ARGS:-} \
      --json "$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1
  el "bench rc=$?"; grep -v -i warn "$OUT/bench.log" | tail -n 70
fi
if [[ " $STEPS " == *" tests "* ]]; then
  timeout ${TEST_TIMEOUT:-330} python -m pytest -q -o addopts= -p no:cacheprovider -n ${NPROC:-8} \
      --timeout 280 --durations=8 -ra ${PYTEST_ARGS:--m gpu tests} > "$OUT/pytest_gpu.log" 2>&1
  el "pytest ${PYTEST_ARGS:--m gpu tests} rc=$?"; tail -n 25 "$OUT/pytest_gpu.log"
fi
if [[ " $STEPS " == *" tc "* ]]; then
  timeout 120 python tools/bench_tc.py --variants v2 --reps 7 --loop 10 > "$OUT/bench_tc.log" 2>&1
  el "bench_tc rc=$?"; grep -v -i warn "$OUT/bench_tc.log" | tail -n 12
fi
