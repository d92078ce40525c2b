// Argument checks and bias corrections shared by the CPU and CUDA bindings of sparse_adamw_.
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace mmt {

struct SparseAdamWArgs {
  int64_t K, R, C;  // selected neurons, neurons in the tensor, elements per neuron
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2, decay;  // formed in double: 1 - 0.99f loses 5e-6 relative
  int64_t step, neuron_dim;
  bool compact;
  bool compact_grad;  // grad is fp32 in the compact layout (below), not param-shaped
  // Compact state/grad layout: [K, C] for rows (neuron k at k * C + c), [C, K] for columns (neuron_dim 1, at
  // c * K + k: a param row's K selected elements and their state are then both walked contiguously). With
  // state_rows the state holds U >= K neurons: [U, C] or [C, U], and U is its row length for columns.
  int64_t U;
};

// "[K, C]" for row neurons, "[C, K]" for columns: the compact layout, for error messages.
inline std::string compact_shape(int64_t k, int64_t c, int64_t neuron_dim) {
  return "[" + std::to_string(neuron_dim == 0 ? k : c) + ", " + std::to_string(neuron_dim == 0 ? c : k) + "]";
}

inline SparseAdamWArgs check_sparse_adamw(const at::Tensor& param, const at::Tensor& exp_avg,
                                          const at::Tensor& exp_avg_sq, const at::Tensor& grad,
                                          const at::Tensor& rows, const std::optional<at::Tensor>& row_scale,
                                          const std::optional<at::Tensor>& row_step, double lr, double beta1,
                                          double beta2, double eps, double weight_decay, int64_t step,
                                          int64_t neuron_dim, bool compact, c10::DeviceType device,
                                          bool has_state_rows = false, bool compact_grad = false) {
  TORCH_CHECK(param.device().type() == device, "sparse_adamw_: param is on ", param.device(), ", expected ", device);
  TORCH_CHECK(param.dim() == 1 || param.dim() == 2, "sparse_adamw_: param must be 1-D or 2-D, got shape ",
              param.sizes());
  TORCH_CHECK(neuron_dim == 0 || (neuron_dim == 1 && param.dim() == 2),
              "sparse_adamw_: neuron_dim must be 0, or 1 for a 2-D param; got ", neuron_dim);
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "sparse_adamw_: param and grad must be contiguous");
  TORCH_CHECK(grad.device() == param.device(), "sparse_adamw_: grad on ", grad.device(), ", param on ",
              param.device());
  if (!compact_grad) {
    TORCH_CHECK(grad.sizes() == param.sizes(), "sparse_adamw_: grad shape ", grad.sizes(), " != param shape ",
                param.sizes());
    TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "sparse_adamw_: grad dtype ", grad.scalar_type(),
                " != param dtype ", param.scalar_type());
  }
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "sparse_adamw_: rows must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(rows.device() == param.device(), "sparse_adamw_: rows on ", rows.device(), ", param on ",
              param.device());
  SparseAdamWArgs a;
  a.K = rows.numel();
  const int64_t d0 = param.size(0), d1 = param.dim() == 2 ? param.size(1) : 1;
  a.R = neuron_dim == 0 ? d0 : d1;
  a.C = neuron_dim == 0 ? d1 : d0;
  if (compact_grad) {
    TORCH_CHECK(compact, "sparse_adamw_: compact_grad needs compact state");
    TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.numel() == a.K * a.C, "sparse_adamw_: a compact grad must "
                "be fp32 ", compact_shape(a.K, a.C, neuron_dim), " (K=", a.K, ", C=", a.C, "), got ",
                grad.scalar_type(), " ", grad.sizes());
  }
  for (const at::Tensor* s : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->device() == param.device(),
                "sparse_adamw_: optimizer state must be contiguous fp32 on the param's device");
    if (compact && has_state_rows) {  // [U, C] or [C, U] with U >= K: neurons addressed through state_rows
      TORCH_CHECK(a.C == 0 || s->numel() % a.C == 0, "sparse_adamw_: compact state needs whole neurons of ", a.C,
                  " elements (", neuron_dim == 0 ? "[U, C]" : "[C, U]", "), got shape ", s->sizes());
    } else if (compact) {
      TORCH_CHECK(s->numel() == a.K * a.C, "sparse_adamw_: compact state needs ", compact_shape(a.K, a.C, neuron_dim),
                  " elements, got shape ", s->sizes());
    } else {
      TORCH_CHECK(s->sizes() == param.sizes(), "sparse_adamw_: full state shape ", s->sizes(),
                  " != param shape ", param.sizes());
    }
  }
  if (row_scale) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->numel() == a.K &&
                    row_scale->is_contiguous() && row_scale->device() == param.device(),
                "sparse_adamw_: row_scale must be contiguous fp32 [K=", a.K, "] on the param's device");
  }
  if (row_step) {
    TORCH_CHECK(row_step->numel() == a.K && row_step->dim() == 1, "sparse_adamw_: row_step must be [K=", a.K, "]");
    // CUDA reads it on the device: a CPU row_step would be dereferenced there as a host pointer.
    TORCH_CHECK(row_step->device() == param.device() && row_step->is_contiguous() &&
                    (row_step->scalar_type() == at::kLong || row_step->scalar_type() == at::kInt),
                "sparse_adamw_: row_step must be a contiguous int32/int64 tensor on the param's device (",
                param.device(), "), got ", row_step->scalar_type(), " on ", row_step->device());
  } else {
    TORCH_CHECK(step >= 1, "sparse_adamw_: step must be >= 1, got ", step);
  }
  a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps; a.weight_decay = weight_decay;
  a.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  a.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  a.decay = static_cast<float>(1.0 - lr * weight_decay);
  a.step = step; a.neuron_dim = neuron_dim; a.compact = compact; a.compact_grad = compact_grad;
  a.U = (compact && has_state_rows && a.C > 0) ? exp_avg.numel() / a.C : a.K;
  return a;
}

// Per-tensor checks of sparse_adamw_multi_ (list lengths, state_rows, int64 row_steps) on top of the
// single-tensor ones; returns one SparseAdamWArgs per tensor.
inline std::vector<SparseAdamWArgs> check_sparse_adamw_multi(
    const at::TensorList params, const at::TensorList exp_avgs, const at::TensorList exp_avg_sqs,
    const at::TensorList grads, const at::TensorList rows, const c10::List<std::optional<at::Tensor>>& state_rows,
    const c10::List<std::optional<at::Tensor>>& row_scales, const c10::List<std::optional<at::Tensor>>& row_steps,
    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step, at::IntArrayRef neuron_dims,
    bool compact, bool compact_grad, c10::DeviceType device) {
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && grads.size() == n && rows.size() == n &&
                  state_rows.size() == n && row_scales.size() == n && row_steps.size() == n &&
                  neuron_dims.size() == n,
              "sparse_adamw_multi_: every list must have one entry per param (", n, " params)");
  std::vector<SparseAdamWArgs> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::optional<at::Tensor> sr = state_rows.get(i), rs = row_scales.get(i), st = row_steps.get(i);
    TORCH_CHECK(!sr || compact, "sparse_adamw_multi_: state_rows[", i, "] needs compact=true");
    SparseAdamWArgs a = check_sparse_adamw(params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], rows[i], rs, st, lr,
                                           beta1, beta2, eps, weight_decay, step, neuron_dims[i], compact, device,
                                           sr.has_value(), compact_grad);
    if (sr) {
      TORCH_CHECK(sr->scalar_type() == at::kLong && sr->numel() == a.K && sr->is_contiguous() &&
                      sr->device() == params[i].device(),
                  "sparse_adamw_multi_: state_rows[", i, "] must be contiguous int64 [K=", a.K, "] on the param's device");
      TORCH_CHECK(exp_avg_sqs[i].numel() == exp_avgs[i].numel(), "sparse_adamw_multi_: exp_avg and exp_avg_sq of "
                  "param ", i, " differ in size");
    }
    if (st) {
      TORCH_CHECK(st->scalar_type() == at::kLong, "sparse_adamw_multi_: row_steps[", i, "] must be int64");
    }
    out.push_back(a);
  }
  return out;
}

// step_size[k] = lr / (1 - beta1^s_k), bc2_sqrt[k] = sqrt(1 - beta2^s_k), computed in double on the host.
inline void bias_corrections(const SparseAdamWArgs& a, const std::optional<at::Tensor>& row_step, float* step_size,
                             float* bc2_sqrt) {
  at::Tensor steps;
  if (row_step) steps = row_step->to(at::kCPU, at::kLong).contiguous();
  const int64_t* s = row_step ? steps.data_ptr<int64_t>() : nullptr;
  for (int64_t k = 0; k < a.K; ++k) {
    const double n = s ? static_cast<double>(s[k]) : static_cast<double>(a.step);
    TORCH_CHECK(n >= 1, "sparse_adamw_: row_step[", k, "] must be >= 1, got ", n);
    step_size[k] = static_cast<float>(a.lr / (1.0 - std::pow(static_cast<double>(a.beta1), n)));
    bc2_sqrt[k] = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(a.beta2), n)));
  }
}

// ---- taylor_accumulate_ (also family 1: it feeds the neuron selection) ----

struct TaylorArgs {
  int64_t N, M;  // tokens, neurons
};

inline TaylorArgs check_taylor(const at::Tensor& acc, const at::Tensor& act, const at::Tensor& grad,
                               const at::Tensor& token_weight, c10::DeviceType device) {
  TORCH_CHECK(act.device().type() == device, "taylor_accumulate_: act is on ", act.device(), ", expected ", device);
  TORCH_CHECK(act.dim() == 2, "taylor_accumulate_: act must be [N tokens, M neurons], got shape ", act.sizes());
  TORCH_CHECK(grad.sizes() == act.sizes() && grad.scalar_type() == act.scalar_type(),
              "taylor_accumulate_: grad ", grad.sizes(), "/", grad.scalar_type(), " must match act ", act.sizes(), "/",
              act.scalar_type());
  TORCH_CHECK(act.is_contiguous() && grad.is_contiguous(), "taylor_accumulate_: act and grad must be contiguous");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.dim() == 1 && acc.numel() == act.size(1) && acc.is_contiguous(),
              "taylor_accumulate_: acc must be contiguous fp32 [M=", act.size(1), "], got ", acc.scalar_type(), " ",
              acc.sizes());
  TORCH_CHECK(token_weight.scalar_type() == at::kFloat && token_weight.dim() == 1 &&
                  token_weight.numel() == act.size(0) && token_weight.is_contiguous(),
              "taylor_accumulate_: token_weight must be contiguous fp32 [N=", act.size(0), "], got ",
              token_weight.scalar_type(), " ", token_weight.sizes());
  TORCH_CHECK(acc.device() == act.device() && grad.device() == act.device() && token_weight.device() == act.device(),
              "taylor_accumulate_: all tensors must be on ", act.device());
  return {act.size(0), act.size(1)};
}

}  // namespace mmt
