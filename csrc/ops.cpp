// Every mmt op schema, in one place. Kernels register per backend in cpu/*.cpp and cuda/*_bind.cpp.
// Each op's Python spec (mmt_kernels/, registered through mmt_kernels/_registry.py) repeats its schema for the
// Triton custom op and adds the fake (meta) kernel and autograd; docs/kernels.md has the recipe.
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
  // Several tensors in one call (one CUDA launch over a device-side descriptor table). Per tensor i:
  // state_rows[i] (int64 [K_i], optional) is the compact-state row of each selected neuron (state may hold
  // more neurons than are selected now, e.g. the union over language pairs); row_steps[i] is int64.
  // compact_grad=true (needs compact): grads[i] is fp32 [K_i, C_i], row k = selected neuron k's gradient.
  m.def(
      "sparse_adamw_multi_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor[] grads, "
      "Tensor[] rows, Tensor?[] state_rows, Tensor?[] row_scales, Tensor?[] row_steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, int step, int[] neuron_dims, bool compact, "
      "bool compact_grad=False) -> ()");
  // Taylor importance: acc[j] += sum_t token_weight[t] * |act[t, j] * grad[t, j]| over act/grad [N, M]
  // (token_weight = 1/len(seq) on a sequence's tokens, 0 on padding: a per-sequence token mean).
  m.def("taylor_accumulate_(Tensor(a!) acc, Tensor act, Tensor grad, Tensor token_weight) -> ()");

  // ---- family 2: FFT-routed top-k MoE --------------------------------------------------------
  // Slot t*k+s is the s-th expert choice of token t. perm [T*k] lists slots in expert order (stable),
  // inv is its inverse, offsets [E+1] the expert segments. act: 0 = silu, 1 = gelu (tanh approximation).
  m.def("moe_permute(Tensor expert_ids, int num_experts) -> (Tensor perm, Tensor inv, Tensor offsets)");
  // xp[j] = x[perm[j] // k] * scale[perm[j]] (scale fp32 [T*k], optional).
  m.def("moe_dispatch(Tensor x, Tensor perm, Tensor? scale, int k) -> Tensor");
  // out[t] = sum_s weights[t*k+s] * yp[inv[t*k+s]], fp32 accumulation, no atomics.
  m.def("moe_combine(Tensor yp, Tensor inv, Tensor? weights, int k) -> Tensor");
  // dweights[t*k+s] = <dout[t], yp[inv[t*k+s]]> in fp32: the combine's gradient w.r.t. its weights.
  m.def("moe_combine_weight_grad(Tensor dout, Tensor yp, Tensor inv, int k) -> Tensor");
  // Grouped SwiGLU over expert segments; returns y and the gate/up pre-activations saved for backward.
  m.def("moe_grouped_mlp(Tensor xp, Tensor offsets, Tensor w_gate, Tensor w_up, Tensor w_down, int act) "
        "-> (Tensor y, Tensor gate, Tensor up)");
  // dx (empty unless need_dx) and dW (empty unless need_dw; zero for experts with train_mask false).
  m.def("moe_grouped_mlp_backward(Tensor dy, Tensor xp, Tensor gate, Tensor up, Tensor offsets, Tensor w_gate, "
        "Tensor w_up, Tensor w_down, Tensor? train_mask, int act, bool need_dx, bool need_dw) "
        "-> (Tensor dx, Tensor dw_gate, Tensor dw_up, Tensor dw_down)");
  // log1p(|x @ basis|) with basis [d, 2F] = [cos | -sin] (a DFT as a GEMM); reim [T, 2F] saved for backward.
  m.def("moe_fft_features(Tensor x, Tensor basis) -> (Tensor feats, Tensor reim)");
  m.def("moe_fft_features_backward(Tensor grad, Tensor reim, Tensor basis) -> Tensor");

  // ---- family 3: batched weight merging ------------------------------------------------------
  // K same-shape contiguous tensors (fine-tuned models, or task vectors when base is None); fp32/bf16/fp16.
  // merge_threshold: fp32 [K], the ks[k]-th largest |tensors[k] - base| by radix select (+inf if ks[k] == 0).
  m.def("merge_threshold(Tensor[] tensors, Tensor? base, int[] ks) -> Tensor");
  // merge: one fused pass over the K inputs per element, fp32 accumulation, output in the input dtype.
  // method: linear | task_arithmetic | ties (needs thresholds) | dare_linear | dare_ties (densities, seed).
  m.def(
      "merge(Tensor[] tensors, Tensor? base, float[] weights, Tensor? thresholds, float[] densities, str method, "
      "float lam, int seed, bool sign_by_count) -> Tensor");

  // ---- fused linear + cross-entropy (row-wise softmax work on a chunk of logits) -----------------
  // z = softcap * tanh(l / softcap) when softcap > 0, else l. Rows whose target is ignore_index get loss = lse = 0.
  // cross_entropy_lse: fp32 loss[r] = lse(z[r]) - z[r, target[r]] and lse[r].
  m.def("cross_entropy_lse(Tensor logits, Tensor target, int ignore_index, float softcap) "
        "-> (Tensor loss, Tensor lse)");
  // cross_entropy_grad_: logits[r] <- grad_loss[r] * d loss[r] / d logits[r] (softmax minus one-hot), in place.
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor target, Tensor lse, Tensor grad_loss, int ignore_index, "
        "float softcap) -> ()");
  // ---- neuron-sparse weight gradient ------------------------------------------------------------
  // acc[K, C] += a[:, rows].T @ b (fp32 acc): rows of dW = dy.T @ x (a = dy, b = x), for the K selected neurons
  // only; transposed: acc[C, K] += b.T @ a[:, rows], the selected columns of dW (a = x, b = dy) as they lie in dW.
  m.def("sparse_weight_grad_(Tensor(a!) acc, Tensor a, Tensor rows, Tensor b, bool transposed=False) -> ()");
}
