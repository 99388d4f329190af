// Every schema of the r1kernels operator library, in one place.
//
// Implementations register themselves per device next to their kernels:
//   csrc/<op>/<op>_cpu.cpp    TORCH_LIBRARY_IMPL(r1kernels, CPU, m)
//   csrc/<op>/<op>_cuda.cpp   TORCH_LIBRARY_IMPL(r1kernels, CUDA, m)  (CUDA builds only)
// Fake (meta) kernels and autograd formulas are registered from Python in
// r1kernels/_custom_ops.py, so every op works under torch.compile(fullgraph=True).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(r1kernels, m) {
  // Group-normalized advantages. scale: "group" | "batch" | "none".
  m.def("group_advantages(Tensor rewards, int group_size, str scale, float eps) -> Tensor");
}

// `import r1kernels._C` loads this shared library; the static initializers above register the
// ops with the dispatcher. The module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
