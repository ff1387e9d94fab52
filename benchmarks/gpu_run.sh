#!/usr/bin/env bash
# The device call of the performance benchmarks (4 GPUs; see BENCHMARKS.md). Writes under $OUT:
# env.txt, pytest_gpu.txt, moe_step.json + moe_step_D{2,4}.log, transfer.json + transfer.log.
# Needs .bench_data/ (made on the host: python benchmarks/moe_step.py --make-data --ep 2 4).
# Budget ~9.5 min of device time (limits below). RUN_TESTS=0 skips the GPU tests (they run beside the EP=2 benchmark, on GPUs 2 and 3).
set -u
OUT=${OUT:-/tmp/foremoe_bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
{ date -u; nvidia-smi -L; $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
T0=$SECONDS
TESTS=""
if [ "${RUN_TESTS:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=2,3 timeout 200 $PY -m pytest -q -m gpu tests/ -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1 &
  TESTS=$!
fi
moe() {  # moe EP TIMEOUT DEADLINE [extra args]; the deadline skips policies not yet started
  local ep=$1 limit=$2 deadline=$3; shift 3
  timeout "$limit" $PY benchmarks/moe_step.py --ep "$ep" --out "$OUT/moe_step.json" --deadline-s "$deadline" "$@" \
    >> "$OUT/moe_step_D$ep.log" 2>&1
  echo "moe_step D=$ep exit $? at $((SECONDS - T0)) s" | tee -a "$OUT/env.txt"
}
CUDA_VISIBLE_DEVICES=0,1 moe 2 170 130  # the first compile alone took 65 s (H200, jax 0.11.2)
[ -n "$TESTS" ] && { wait $TESTS; echo "pytest exit $? at $((SECONDS - T0)) s" | tee -a "$OUT/env.txt"; }
moe 4 180 140
timeout 200 $PY benchmarks/transfer.py --ep 2 4 --out "$OUT/transfer.json" > "$OUT/transfer.log" 2>&1
echo "transfer exit $? at $((SECONDS - T0)) s" | tee -a "$OUT/env.txt"
[ -n "$TESTS" ] && tail -n 3 "$OUT/pytest_gpu.txt"
grep -h "^| \|^D=\|Error" "$OUT/moe_step_D2.log" "$OUT/moe_step_D4.log" "$OUT/transfer.log" | grep -v "^D=.*: " | cut -c1-300
