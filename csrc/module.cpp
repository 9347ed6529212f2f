// The Python module object of the extension (gradfd._C, or the JIT-built gradfd_C); the ops themselves are
// registered with the dispatcher by csrc/ops.cpp and the backend files when the library loads.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradfd native kernels; the ops are registered under torch.ops.gradfd";
#ifdef GRADFD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
