// gradfd's op schemas: the one TORCH_LIBRARY block. Implementations live in csrc/cpu/ and csrc/cuda/;
// fake (meta) kernels are registered in gradfd/ops.py beside the Python wrappers. This file needs no Python, so
// that csrc/tests/sanitize_main.cpp can link it into a plain executable (.ci/sanitize.sh).
#include <torch/library.h>

TORCH_LIBRARY(gradfd, m) {
  // Re-targets a buffer of perturbed copies of `base` in O(rows) work. Precondition: each row r equals base
  // except possibly at column columns[r]. For r = s*C + c (C = len(index)) the op restores that column from
  // base, then sets rows[r, index[c]] = round(base[index[c]] + offsets[s] * step[c]) and columns[r] = index[c].
  // Returns displacement[s, c] = rows[r, index[c]] - base[index[c]], exact in float64: the step actually taken.
  m.def("perturb_rows_(Tensor(a!) rows, Tensor(b!) columns, Tensor base, Tensor index, Tensor step, "
        "float[] offsets) -> Tensor");
  // out[k, c] = (losses[2k, c] - losses[2k+1, c]) / (displacement[2k, c] - displacement[2k+1, c]) in float64.
  m.def("central_differences(Tensor losses, Tensor displacement) -> Tensor");
  // The example custom op (float32 only): y = gelu(x + bias), bias over x's last dimension, and its backward
  // with respect to x. Its autograd formula is registered from Python (gradfd/custom_op.py).
  m.def("bias_gelu(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad, Tensor x, Tensor bias) -> Tensor");
  // The half-precision example op: RMSNorm over x's last dimension, y = x * rstd * weight with
  // rstd = 1 / sqrt(mean(x^2) + eps) per row, for float16, bfloat16, float32 and float64, accumulating in float32
  // (float64 for float64). Returns (y, rstd); rstd is float32 (float64 for float64), of shape x.shape[:-1].
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // Its backward: (grad_x, grad_weight). planted_bug=True leaves the weight out of the projection term of grad_x
  // (mean(g * xhat) for mean(g * weight * xhat)), the planted bug of gradfd/custom_op.py's rms_norm_buggy.
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool planted_bug) -> "
        "(Tensor, Tensor)");
}
