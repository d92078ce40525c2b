// Every mmt op schema, in one place. Kernels register per backend in cpu/*.cpp and cuda/*_bind.cpp.
// Python-side fake (meta) kernels and autograd live next to each family's wrapper in mmt_kernels/.
#include <Python.h>
#include <torch/library.h>

// `import mmt_kernels._C` loads this library; the ops register through the dispatcher, not pybind.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mmt, m) {
  // ---- family 1: neuron-sparse AdamW -------------------------------------------------------
  // Strict AdamW step on the neurons `rows` (sorted int64 [K]) of `param`. neuron_dim=0: neurons are
  // rows of a 2-D [R, C] weight (or elements of a 1-D bias); neuron_dim=1: columns of [C, R].
  // compact=true: exp_avg/exp_avg_sq are [K, C] (one state row per selected neuron), else param-shaped.
  // row_step (int32/int64 [K], optional) gives each neuron's own step count for bias correction,
  // otherwise `step` is used. row_scale (fp32 [K], optional) multiplies each neuron's gradient.
  m.def(
      "sparse_adamw_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, Tensor rows, "
      "Tensor? row_scale, Tensor? row_step, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "int step, int neuron_dim, bool compact) -> ()");

  // ---- family 2: FFT-routed top-k MoE (schemas added by the MoE kernels) ---------------------

  // ---- family 3: batched weight merging (schemas added by the merge kernels) -----------------
}
