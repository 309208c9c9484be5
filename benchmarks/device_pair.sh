#!/usr/bin/env bash
# Two lists of steps side by side on a two-GPU machine (nvidia-h200-x2), one per GPU, then one
# archive of everything they wrote ($OUT/pair.tgz: a call returns at most 8 files). Run from the
# repo root, carrying .whl:
#   bash benchmarks/device_pair.sh "gpu-tests stack" "mixed"
# Each list is what benchmarks/device_run.sh takes. The two share the host's cores: host-timed
# figures (swaps, set_scale) read high while the other GPU's process compiles; time those alone.
# ARGS0 / ARGS1 set BENCH_ARGS for one side (else both take BENCH_ARGS).
# DEADLINE_S (default 570) bounds each side; a side cut short still leaves the run files its
# finished suites wrote, which the archive takes from benchmarks/results/runs.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lorahot-out}; mkdir -p "$OUT"
work=$(mktemp -d); mkdir -p "$work/g0" "$work/g1" "$work/runs"; touch "$work/start"
bash benchmarks/device_run.sh none > "$work/install.log" 2>&1  # the wheels, once, before both sides
export PYTHONPATH=/tmp/site
deadline=${DEADLINE_S:-570}
SECONDS=0
side() {  # GPU, steps
  local args_var="ARGS$1"
  BENCH_ARGS=${!args_var:-${BENCH_ARGS:-}} CUDA_VISIBLE_DEVICES=$1 OUT=$work/g$1 SUITE_TIMEOUT=$deadline TESTS_TIMEOUT=$deadline \
    timeout "$deadline" bash benchmarks/device_run.sh $2 > "$work/g$1.log" 2>&1
}
side 0 "${1:-gpu-tests}" &
side 1 "${2:-none}" &
wait
find benchmarks/results/runs -name "*.json" -newer "$work/start" -exec cp {} "$work/runs/" \;
echo "both sides done in ${SECONDS} s"
tar czf "$OUT/pair.tgz" -C "$work" .
for g in g0 g1; do echo "=== $g"; grep -v "^ " "$work/$g.log" | tail -15; done
