// The Python module `embedcore._C`. Importing it registers every op under torch.ops.embedcore
// (each csrc/<op>.cpp registers its own with TORCH_LIBRARY_FRAGMENT, so ops stay independent).
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "embedcore CPU kernels; the ops live in torch.ops.embedcore";
  m.def("openmp_threads", [] { return at::get_num_threads(); }, "threads used by at::parallel_for");
}
