#!/usr/bin/env bash
# One command for a GPU machine (torch preinstalled, no package index): build the extension with the machine's own
# torch, run the tests (CUDA cases included), run the CUDA kernel tests under compute-sanitizer (memcheck and
# racecheck), run `gradfd bench --device cpu,cuda` and a check shared over one NCCL rank; everything is written to
# OUTDIR.
#
#   bash benchmarks/gpu.sh OUTDIR        # OUTDIR defaults to $OUT, then ./gpu-results
#
# Budget: under 5 minutes on an H100/H200 (the CUDA build is the longest step, about a minute with 16 jobs).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
py=${PYTHON:-python3}
status=0
step() { echo; echo "== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/machine.txt"

step "build (pip install --no-build-isolation --no-deps -e .)"
$py -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
$py -c "from gradfd import ops; print('kernels', ops.kernels_available(), 'cuda kernels', ops.cuda_kernels_available(),
ops.unavailable_reason() or '')" | tee -a "$out/machine.txt"

step "tests (CUDA cases included)"
timeout 150 $py -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15 || status=1

step "compute-sanitizer over the CUDA kernel tests"
# every CUDA kernel: perturb_rows_/central_differences (test_kernels), linear_update/linear_update_mse and the
# structured engine on CUDA (test_structured, test_cuda_kernels: every node-count bucket and tile edge), bias_gelu
# (test_jacobian's custom_op tests). racecheck matters for linear_update, which stages its tiles in shared memory.
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 $py -m pytest -q -x tests/test_kernels.py \
      tests/test_structured.py tests/test_cuda_kernels.py tests/test_jacobian.py tests/test_reference_mode.py \
      -k "cuda or custom_op" \
      -p no:cacheprovider > "$out/sanitizer-$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? (0 = clean)" | tee -a "$out/sanitizer.txt"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitizer-$tool.log" | tail -2 | tee -a "$out/sanitizer.txt"
  done
else
  echo "compute-sanitizer not found" | tee "$out/sanitizer.txt"
fi

step "gradfd bench --device cpu,cuda"
timeout 200 $py -m gradfd bench --device cpu,cuda --out "$out" 2>/dev/null | tee "$out/bench-table.md" || status=1

step "a check shared over one NCCL rank (torchrun; issue 25)"
timeout 120 $py -m torch.distributed.run --nproc-per-node 1 -m gradfd check gradfd/demo/distributed.py:target \
  --distributed --device cuda --no-progress 2>&1 | tee "$out/distributed-nccl.txt" | tail -8 || status=1

step "structured engine on the GPU (the 4096x4096 bar)"
timeout 120 $py benchmarks/bench_structured.py --device cuda --no-record 2>/dev/null | tee "$out/bench-structured-cuda.md" || status=1
exit $status
