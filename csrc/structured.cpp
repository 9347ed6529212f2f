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
}
