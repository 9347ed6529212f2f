#!/usr/bin/env bash
# Build the CPU kernels with AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer into a plain C++
# executable (csrc/tests/sanitize_main.cpp drives every op through the dispatcher, valid and invalid inputs, the
# structured engine's linear_update and linear_update_mse included: csrc/structured.cpp declares them) and
# run it. Any overflow, use-after-free, undefined behaviour or leak fails the run. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=build/sanitize
mkdir -p "$out"
read -r inc lib < <("$py" -c "
import os, torch
from torch.utils.cpp_extension import include_paths
print(':'.join(include_paths()), os.path.join(os.path.dirname(torch.__file__), 'lib'))")
# -ffp-contract=off: the kernels' float arithmetic is rounded operation by operation, as PyTorch's (csrc/rounding.h)
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -ffp-contract=off -fopenmp -D_GLIBCXX_USE_CXX11_ABI=1 -Icsrc)
for dir in ${inc//:/ }; do flags+=(-isystem "$dir"); done
echo "sanitize: building $out/kernels (ASan + UBSan)"
g++ "${flags[@]}" csrc/ops.cpp csrc/structured.cpp csrc/cpu/*.cpp csrc/tests/sanitize_main.cpp -o "$out/kernels" \
  -L"$lib" -Wl,-rpath,"$lib" -ltorch -ltorch_cpu -lc10
# detect_leaks: LeakSanitizer reports memory still unreachable at exit
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$out/kernels"
