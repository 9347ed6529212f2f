#!/usr/bin/env bash
# Evidence about the CUDA kernels without a GPU: ptxas -v (registers, stack frame, spills) and the fma instructions
# of the PTX attributed to source lines, for every csrc/cuda/*.cu at sm_90, before (csrc/ at $BASELINE) and after
# (the working tree). Writes benchmarks/results/cuda-evidence.txt; exits non-zero when a bitwise kernel holds an
# fma on one of its own lines or a structured kernel uses local memory (benchmarks/cuda_evidence.py says which).
#
#   bash benchmarks/cuda_evidence.sh                 # BASELINE=50a8ba5 (main before issue 17 part 5)
#   BASELINE= bash benchmarks/cuda_evidence.sh       # the working tree only
#
# nvcc and a CUDA build of torch come from ../shared/tools/cuda-compile-check (override: CUDA_COMPILE_CHECK); where
# nvcc and the CUDA headers are already usable (CUDA_HOME set, as on a GPU machine), they are used directly.
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${BASELINE-50a8ba5}
args=(benchmarks/cuda_evidence.py --out benchmarks/results/cuda-evidence.txt ${baseline:+--baseline "$baseline"})
if [[ -n ${CUDA_HOME:-} ]] && "${PYTHON:-python3}" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  exec "${PYTHON:-python3}" "${args[@]}"
fi
exec "${CUDA_COMPILE_CHECK:-../shared/tools/cuda-compile-check}" -- python "${args[@]}"
