// Op schemas of the structured engine (gradfd/structured.py). They extend the gradfd namespace declared in
// csrc/ops.cpp with a fragment; implementations live in csrc/cpu/structured_cpu.cpp and
// csrc/cuda/structured_cuda.cu, fake (meta) kernels in gradfd/structured.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(gradfd, m) {
  // The perturbed output columns of a product linear in the perturbed parameter, without re-running the product:
  // out[c, r] = round(base[r, column[c]] + delta[c] * features[r, feature[c]]), computed in float64 and rounded
  // once to base's dtype. base (n, K), features (n, D), column/feature (C,) int64, delta (C,) float64 -> (C, n).
  m.def("linear_update(Tensor base, Tensor features, Tensor column, Tensor feature, Tensor delta) -> Tensor");
  // How every perturbation changes the squared-error sum of such a product followed by an activation, summing the
  // changed terms only and reading each input once per coordinate:
  //   out[s, c] = sum_r [(act(round(base[r, j] + delta[s, c] * features[r, i])) - target[r, j])**2
  //                      - (act(base[r, j]) - target[r, j])**2]
  // with j = column[c], i = feature[c]: each term is the element's squared error at the perturbed point minus the
  // same at the base point, both evaluated (never expanded algebraically). The activation is evaluated in base's
  // dtype; differences, squares and the sum in float64. activation: 0 identity, 1 tanh, 2 relu, 3 sigmoid.
  // delta (S, C) float64 -> (S, C) float64.
  m.def("linear_update_mse(Tensor base, Tensor features, Tensor target, Tensor column, Tensor feature, "
        "Tensor delta, int activation) -> Tensor");
  // How every perturbation changes the summed negative log-likelihood of a product whose output moved by an outer
  // product (one input column or one weight row of the product replaced), then a bias and log-softmax over classes:
  //   logits[r, k] = round(round(base[r, k] + rows[b, r] * cols[b, k]) + bias[k])
  //   out[b]       = sum_r [nll(logits[r], target[r]) - nll(base logits[r], target[r])]
  // with nll(x, t) = round(-weight[t] * round(log_softmax(x)[t])) (0 where t == ignore_index). The move is computed
  // in float64 and rounded once to base's dtype (mm is linear in each operand); the bias add, the log-softmax and the
  // product with the weight in base's op-math type, each rounded to base's dtype, as PyTorch's ops are; the base
  // point evaluated by the same code; differences and the sum over rows in float64. bias and weight may be None.
  // base (n, K), rows (B, n) and cols (B, K) float64, target (n,) int64 -> (B,) float64.
  m.def("outer_update_nll(Tensor base, Tensor? bias, Tensor rows, Tensor cols, Tensor target, Tensor? weight, "
        "int ignore_index) -> Tensor");
}
