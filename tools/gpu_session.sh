#!/usr/bin/env bash
# One device session: versions; warm the tensor-core kernel cache; the full benchmark
# alone on the GPU; then the GPU test suite (property tests with backend="gpu" plus
# tests/gpu, in parallel processes) beside the notebooks at full size.
# Logs and JSON go to $OUT. Usage:
#   OUT=dir bash tools/gpu_session.sh [parts] [bench] [ablate] [notebooks] [tests] [tc]
# ("parts": the tensor-core linear-branch kernels' own GPU tests first; failing parts are
# switched off with SLA_NUMBA_TC_OFF for the benchmark and the suite, and say so)
# (notebooks need the .whl folder of tools/notebook_wheels.txt carried along)
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/sla_numba_nbcache}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
STEPS=${*:-tests bench}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }
{ nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  python -c "import sys, torch, numpy, numba, numba.cuda as c, cupy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__)"
  python -m pip show numba-cuda 2>/dev/null | grep -i ^version; } >> "$OUT/steps.log" 2>&1
el "start: $STEPS"
if [[ " $STEPS " == *" tests "* || " $STEPS " == *" bench "* ]]; then
  python tools/warm_tc.py v2:64:64:64:bf16 v2:64:64:64:f16 v2:128:64:64:bf16 \
      v2:128:64:64:f16 v2:128:64:128:bf16 > /tmp/warm_tc.log 2>&1 &
  WARM=$!
fi
if [[ " $STEPS " == *" parts "* ]]; then
  # the tensor-core parts of the linear branch, each on its own tests first: a part
  # whose GPU tests fail is switched off (SLA_NUMBA_TC_OFF) for everything after
  OFF=""
  for part in states marginal linear; do
    f=tests/gpu/test_${part}_tc.py
    [[ -f $f ]] || continue
    timeout ${PART_TIMEOUT:-150} python -m pytest -q -o addopts= -p no:cacheprovider -x -n 3 \
        --timeout 120 $f > "/tmp/part_$part.log" 2>&1 &
    eval "P_$part=$!"
  done
  for part in states marginal linear; do
    pid_var="P_$part"; [[ -n "${!pid_var:-}" ]] || continue
    if wait ${!pid_var}; then el "part $part: GPU tests pass"
    else el "part $part: GPU tests FAIL -> SLA_NUMBA_TC_OFF"; OFF="$OFF,$part"
      tail -n 30 "/tmp/part_$part.log" >> "$OUT/steps.log"; fi
    tail -n 1 "/tmp/part_$part.log" | tee -a "$OUT/steps.log"
  done
  export SLA_NUMBA_TC_OFF=${OFF#,}
  el "SLA_NUMBA_TC_OFF=$SLA_NUMBA_TC_OFF"
fi
if [[ -n "${WARM:-}" ]]; then wait $WARM; el "warm tc rc=$?"; fi
if [[ " $STEPS " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_gpu.py ${BENCH_ARGS:-} \
      --json "$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1
  el "bench rc=$?"; grep -v -i warn "$OUT/bench.log" | tail -n 70
fi
if [[ " $STEPS " == *" ablate "* ]]; then
  # what each tensor-core part of the linear branch is worth: Wan shape, bf16, the
  # same benchmark with one part sent back to its SIMT kernel
  for part in states marginal linear; do
    SLA_NUMBA_TC_OFF=$(echo "${SLA_NUMBA_TC_OFF:-},$part" | sed 's/^,//') timeout 40 \
        python benchmarks/bench_gpu.py --shapes wan --topk 0.05 --dtypes bf16 --no-flex \
        --json /tmp/ablate_$part.json > /tmp/ablate_$part.log 2>&1
    el "ablate $part rc=$?"; grep "sla" /tmp/ablate_$part.log | sed "s/^/  [$part off] /" \
        | tee -a "$OUT/steps.log"
  done
fi
if [[ " $STEPS " == *" notebooks "* ]]; then
  # notebooks at full size, beside the tests (needs the .whl folder carried: nbclient & co)
  ( python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && mkdir -p /tmp/nb && \
    SLA_NB_QUICK=${SLA_NB_QUICK:-0} PYTHONPATH=/tmp/site:$PYTHONPATH timeout ${NB_TIMEOUT:-400} \
        python tools/run_notebooks.py --out /tmp/nb; echo "notebooks rc=$?";
    tar czf "$OUT/nb.tgz" -C /tmp nb ) > "$OUT/nb.log" 2>&1 &
  NBPID=$!
fi
if [[ " $STEPS " == *" tests "* ]]; then
  timeout ${TEST_TIMEOUT:-330} python -m pytest -q -o addopts= -p no:cacheprovider -n ${NPROC:-8} \
      --timeout 280 --durations=8 -ra ${PYTEST_ARGS:--m gpu tests} > "$OUT/pytest_gpu.log" 2>&1
  el "pytest ${PYTEST_ARGS:--m gpu tests} rc=$?"; tail -n 25 "$OUT/pytest_gpu.log"
fi
if [[ -n "${NBPID:-}" ]]; then
  wait $NBPID; el "notebooks done"; tail -n 30 "$OUT/nb.log"
fi
if [[ " $STEPS " == *" tc "* ]]; then
  timeout 120 python tools/bench_tc.py --variants v2 --reps 7 --loop 10 > /tmp/bench_tc.log 2>&1
  el "bench_tc rc=$?"; grep -v -i warn /tmp/bench_tc.log | tail -n 12
fi
