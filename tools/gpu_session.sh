#!/usr/bin/env bash
# One device session on the H200, in steps (each with its own time limit); logs and JSON
# go to $OUT (steps.log and the JSON files directly, every log in logs.tgz).
#   OUT=dir bash tools/gpu_session.sh STEP [STEP ...]
# Steps, in the order given:
#   first    first SLA call of a fresh process, cold and warm Numba cache (tools/first_call.py;
#            run it first on a fresh machine; FIRST_PROFILE=1 adds a cold and a warm process
#            under cProfile, stats in logs.tgz, first_prof/)
#   compare  tensor-core kernels: this tree against the one carried as .old/ (compile time,
#            outputs, speed): tools/compare_tc_kernels.py and tools/compare_tc_linear.py
#   wgmma    the wgmma-from-Numba probe (tools/wgmma_probe.py)
#   tests    the GPU test suite (-m gpu, parallel processes), plus the diffusers tests when
#            the diffusers wheel is carried in .whl/
#   dist     context-parallel wrapper on one GPU (NCCL, world size 1): overhead vs plain SLA
#   bench    benchmarks/bench_gpu.py (SLA vs SDPA vs FlexAttention, stage tables)
#   classify tools/bench_classify.py (new kernels vs the sort reference, map == CPU's)
#   classfused tools/bench_classify.py --fused: the default classification kernels against
#            SLA_NUMBA_CLASSIFY=fused and its tilings (Wan, B2), maps == default's and CPU's,
#            read and fp64-bmm floors (CLASSFUSED_ARGS, e.g. --quick; CLASSFUSED_TIMEOUT)
#   warmup   sla_numba.warmup on a cold cache, then a new process's first Wan-shape call
#   cpu      benchmarks/bench_cpu.py on this machine's CPU, 2 threads (taskset)
#   marginal tools/sweep_marginal.py: the marginal-sum kernels' tiles, bf16 states,
#            the pipelined bf16 kernel (SLA_NUMBA_MARGINAL=pipelined) and the cuBLAS floor
#   linear   tools/sweep_linear.py and tools/sweep_linear_backward.py: the linear forward's
#            and the linear gradients' register and pipelined kernels (SLA_NUMBA_LINEAR,
#            SLA_NUMBA_LINEAR_GRAD), same bits, and the cuBLAS floors
#   sparsebwd tools/sweep_sparse_backward.py: the sparse backward's sync and pipelined
#            kernels (SLA_NUMBA_SPARSE_BWD), same bits, TFLOP/s (Wan shape, D=64 B2 H16)
#   margwg   tools/sweep_marginal_wgmma.py: the marginal sums on wgmma (SLA_NUMBA_MARGINAL=wgmma;
#            N 128/256, stages 3/4, 1/2 warpgroups) against the pipelined default, float64
#            and the cuBLAS floor, row and column sums, wan and b2 sizes (MARGWG_TIMEOUT)
#   sparsewg tools/sweep_sparse_wgmma.py: the sparse forward on wgmma (SLA_NUMBA_SPARSE_FWD)
#            against the mma.sync kernel at the Wan shape (bf16 D 128 / 64, fp16), --quick first
#   linwg    tools/sweep_linear_wgmma.py: the linear forward on wgmma (SLA_NUMBA_LINEAR=wgmma)
#            variants (HK, stages) against the pipelined mma.sync kernel (max diff, bits) and
#            float64, the cuBLAS floor; Wan and B2 H16 N8192 D64 (LINWG_TIMEOUT, LINWG_ARGS)
#   lbwdwg   tools/sweep_linear_backward_wgmma.py: the linear branch's dk / dv on wgmma
#            (SLA_NUMBA_LINEAR_GRAD=wgmma) variants against the pipelined kernel, float64 and
#            the cuBLAS floor, Wan (D 128) and B2 H16 N8192 D64, --quick first (LBWDWG_TIMEOUT)
#   nvmath   tools/nvmath_eval.py: nvmath-python's cuBLASDx GEMM tiles (nvmath.device, in a
#            numba-cuda kernel; its wheels carried in .whl/) vs the project's mma.sync states
#            kernels and torch.bmm on the linear branch's states product (NVMATH_TIMEOUT)
#   states   tools/sweep_states.py: the key-block states' register, staged and pipelined
#            kernels (SLA_NUMBA_STATES_KERNEL), bf16 and fp32 states, same bits, cuBLAS floor
#   stateswg tools/sweep_states_wgmma.py: the key-block states on Hopper wgmma
#            (SLA_NUMBA_STATES_KERNEL=wgmma) against the default kernel and the cuBLAS floor,
#            Wan and B2 H16 D64 shapes, bf16 and fp32 states; first the sm_90a PTX check
#            (tools/check_states_wgmma_ptx.py: registers, spills) (STATESWG_TIMEOUT)
#   host     host-side costs: tools/host_overhead.py (launch paths, whole calls; HOST_ARGS)
#            and tools/profile_gpu.py (kernels vs wall), bf16, PROFILE_SHAPES (b2 wan)
#   graphs   tools/bench_graphs.py: eager vs CUDA-graph replay (torch.cuda.graph) vs SDPA
#            (cuDNN), b2 and wan bf16, fwd and fwd+bwd, replay == eager bits; and
#            torch.compile(mode="reduce-overhead") of a call (GRAPHS_ARGS, e.g. --no-compile)
#   gradprec tools/grad_states_precision.py: gradients with fp32 / bf16 gradient sums
#            (SLA_NUMBA_GRAD_STATES) against an fp32 SIMT run (GRADPREC_SHAPE, default wan)
#   ncu      Nsight Compute (on the H200 image: /usr/local/cuda/bin/ncu) on one launch of a
#            kernel: NCU_SCRIPT (default tools/ncu_marginal.py) with NCU_ARGS, kernels matching
#            NCU_KERNEL (regex, default marginal); speed of light, memory, warp states,
#            occupancy (session 9: the marginal sums are L1/TEX-bound)
#   reuse    tools/bench_reuse.py: the backward reading the forward's row states
#            (SLA_NUMBA_SAVE_STATES=1) against recomputing them: time, memory, same bits
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT" /tmp/logs
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/sla_numba_nbcache}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }
{ nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  python -c "import sys, torch, numpy, numba; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)"
  python -m pip show numba-cuda cupy-cuda13x 2>/dev/null | grep -i -E "^(name|version)"
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*\(avx512f\).*/Flags: ... avx512f .../' ; } >> "$OUT/steps.log" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
run() {  # run NAME LIMIT CMD...: log to /tmp/logs/NAME.log, print its tail
  # The command runs in its own process group, and the whole group is killed at the
  # limit: pytest-xdist workers outlive a plain `timeout` and would share the GPU with
  # the next step (a benchmark).
  local name=$1 limit=$2 pid watcher rc; shift 2
  setsid "$@" > "/tmp/logs/$name.log" 2>&1 &
  pid=$!
  ( sleep "$limit"; kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null ) &
  watcher=$!
  wait "$pid"; rc=$?
  kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
  kill -KILL -- "-$pid" 2>/dev/null  # stragglers of a finished run
  el "$name rc=$rc"; grep -v -i -E "warn|^\s*$" "/tmp/logs/$name.log" | tail -n "${TAIL:-25}"
}
for step in "$@"; do
  el "step $step"
  case $step in
    first)   run first ${FIRST_TIMEOUT:-330} python tools/first_call.py --json "$OUT/first_call.json" \
                 ${FIRST_PROFILE:+--profile /tmp/logs/first_prof} ;;
    compare) run compare_sparse 240 python tools/compare_tc_kernels.py --old .old --new . --rounds 3
             run compare_linear 200 python tools/compare_tc_linear.py --old .old --new . --rounds 3 ;;
    wgmma)   run wgmma 130 python tools/wgmma_probe.py --check --bench --json "$OUT/wgmma.json" ;;
    tests)   TAIL=40 run pytest_gpu ${TEST_TIMEOUT:-420} python -m pytest -q -o addopts= \
                 -p no:cacheprovider -n ${NPROC:-8} --timeout 380 --durations=10 -ra \
                 --tb=short --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:--m gpu tests}
             grep -E "(PASSED|FAILED|ERROR)" /tmp/logs/pytest_gpu.log | grep -c PASSED
             grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR)" /tmp/logs/pytest_gpu.log | head -40 ;;
    dist)    run dist 150 torchrun --nproc_per_node 1 benchmarks/bench_distributed.py \
                 --overhead --check --json "$OUT/bench_distributed.json" ;;
    bench)   TAIL=80 run bench ${BENCH_TIMEOUT:-330} python benchmarks/bench_gpu.py ${BENCH_ARGS:-} \
                 --json "$OUT/bench_gpu.json" ;;
    classify) TAIL=60 run classify ${CLASSIFY_TIMEOUT:-150} python tools/bench_classify.py \
                 ${CLASSIFY_ARGS:---old} ;;
    classfused) TAIL=60 run classfused ${CLASSFUSED_TIMEOUT:-150} python tools/bench_classify.py \
                 --fused ${CLASSFUSED_ARGS:-} ;;
    warmup)  run warmup 200 python tools/check_warmup_gpu.py ;;
    cpu)     run cpu 200 taskset -c 0,1 python benchmarks/bench_cpu.py --threads 2 \
                 --json "$OUT/bench_cpu_device.json" ;;
    marginal) TAIL=40 run marginal ${MARGINAL_TIMEOUT:-150} python tools/sweep_marginal.py ;;
    linear)  TAIL=40 run linear ${LINEAR_TIMEOUT:-120} python tools/sweep_linear.py
             TAIL=40 run linear_grad ${LINEAR_TIMEOUT:-120} python tools/sweep_linear_backward.py ;;
    sparsebwd) TAIL=40 run sparse_bwd ${SPARSEBWD_TIMEOUT:-150} python tools/sweep_sparse_backward.py ;;
    margwg)  TAIL=60 run margwg ${MARGWG_TIMEOUT:-150} python tools/sweep_marginal_wgmma.py ;;
    sparsewg) TAIL=40 run sparsewg_quick 120 python tools/sweep_sparse_wgmma.py --quick
              TAIL=40 run sparsewg ${SPARSEWG_TIMEOUT:-150} python tools/sweep_sparse_wgmma.py ;;
    linwg)   TAIL=60 run linwg ${LINWG_TIMEOUT:-180} python tools/sweep_linear_wgmma.py ${LINWG_ARGS:-} ;;
    lbwdwg)  [ "${LBWDWG_QUICK:-1}" = 1 ] && TAIL=40 run lbwdwg_quick 120 \
                 python tools/sweep_linear_backward_wgmma.py --quick --shapes wan
             TAIL=40 run lbwdwg ${LBWDWG_TIMEOUT:-150} python tools/sweep_linear_backward_wgmma.py ;;
    nvmath)  TAIL=40 run nvmath ${NVMATH_TIMEOUT:-420} python tools/nvmath_eval.py ;;
    states)  TAIL=40 run states ${STATES_TIMEOUT:-120} python tools/sweep_states.py ;;
    stateswg) [ "${STATESWG_PTX:-1}" = 1 ] && TAIL=30 run stateswg_ptx 120 \
                 python tools/check_states_wgmma_ptx.py
             TAIL=60 run stateswg ${STATESWG_TIMEOUT:-180} python tools/sweep_states_wgmma.py ;;
    host)    TAIL=40 run host ${HOST_TIMEOUT:-200} python tools/host_overhead.py ${HOST_ARGS:-} \
                 --json "$OUT/host_overhead.json"
             for shape in ${PROFILE_SHAPES:-b2 wan}; do
               TAIL=40 run profile_$shape 100 python tools/profile_gpu.py --shape $shape --dtype bf16
             done ;;
    graphs)  TAIL=80 run graphs ${GRAPHS_TIMEOUT:-240} python tools/bench_graphs.py ${GRAPHS_ARGS:-} \
                 --json "$OUT/bench_graphs.json" ;;
    reuse)   TAIL=40 run reuse ${REUSE_TIMEOUT:-150} python tools/bench_reuse.py ${REUSE_ARGS:-} \
                 --json "$OUT/bench_reuse.json" ;;
    gradprec) TAIL=20 run gradprec ${GRADPREC_TIMEOUT:-100} python tools/grad_states_precision.py \
                 --shape ${GRADPREC_SHAPE:-wan} ;;
    ncu)     TAIL=80 run ncu ${NCU_TIMEOUT:-150} /usr/local/cuda/bin/ncu --kernel-name \
                 "regex:${NCU_KERNEL:-marginal}" --launch-skip 1 --launch-count 1 \
                 --section SpeedOfLight --section MemoryWorkloadAnalysis \
                 --section WarpStateStats --section Occupancy \
                 python ${NCU_SCRIPT:-tools/ncu_marginal.py} ${NCU_ARGS:-} ;;
    *)       el "unknown step $step" ;;
  esac
done
tar czf "$OUT/logs.tgz" -C /tmp logs
el "done"
