#!/usr/bin/env bash
# One GPU session: warm the tensor-core kernel cache in parallel, run tests/gpu (files in
# parallel processes), and the quick benchmark once the kernels it needs are cached.
# Logs go to $OUT (or ./gpu_logs). Usage: bash tools/gpu_checks.sh
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=. NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/sla_numba_nbcache}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }
nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader > "$OUT/gpu.txt" 2>&1
PT="python -m pytest -q -p no:cacheprovider --durations=6"
el "warm tc (parallel) + test_gpu_backend"
python tools/warm_tc.py v2:64:64:64:bf16 v2:64:64:64:f16 v2:128:64:64:bf16 \
    v2:128:64:64:f16 v2:128:64:128:bf16 > "$OUT/warm_tc.log" 2>&1 &
W=$!
timeout 160 $PT tests/gpu/test_gpu_backend.py > "$OUT/pytest_backend.log" 2>&1 &
P1=$!
wait $W; el "warm tc rc=$?"
timeout 150 $PT tests/gpu/test_paths.py > "$OUT/pytest_paths.log" 2>&1 &
P2=$!
timeout 150 $PT tests/gpu/test_tc_cuda.py tests/gpu/test_tc_sim.py > "$OUT/pytest_tc.log" 2>&1 &
P3=$!
wait $P1; el "pytest backend rc=$?"
el "bench --quick (test_paths / test_tc may still run)"
timeout ${BENCH_TIMEOUT:-150} python benchmarks/bench_gpu.py --quick \
    --json "$OUT/bench_quick.json" > "$OUT/bench.log" 2>&1 &
B=$!
wait $P2; el "pytest paths rc=$?"; wait $P3; el "pytest tc rc=$?"
wait $B; el "bench rc=$?"
tail -n 4 "$OUT"/pytest_*.log; grep -v -i warn "$OUT/bench.log" | tail -n 40
