// Family 1, CPU: strict neuron-sparse AdamW. OpenMP over neurons (or param rows for column
// neurons); the inner loop is contiguous in the state so the compiler vectorises it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sparse_adamw_common.h"

namespace mmt {
namespace {

// grad_t: scalar_t for a param-shaped grad, float for a compact one (the state's layout, see SparseAdamWArgs).
template <typename scalar_t, typename grad_t>
void sparse_adamw_cpu_impl(const SparseAdamWArgs& a, scalar_t* param, const grad_t* grad, float* m, float* v,
                           const int64_t* rows, const int64_t* state_rows, const float* row_scale,
                           const float* step_size, const float* bc2_sqrt) {
  const float decay = a.decay, b1 = a.beta1, b2 = a.beta2, eps = a.eps;
  const float omb1 = a.one_minus_beta1, omb2 = a.one_minus_beta2;
  auto update = [&](int64_t pidx, int64_t sidx, int64_t gidx, int64_t k) {
    const float scale = row_scale ? row_scale[k] : 1.0f;
    const float g = static_cast<float>(grad[gidx]) * scale;
    float p = static_cast<float>(param[pidx]) * decay;
    const float mk = b1 * m[sidx] + omb1 * g;
    const float vk = b2 * v[sidx] + omb2 * g * g;
    m[sidx] = mk;
    v[sidx] = vk;
    p -= step_size[k] * mk / (std::sqrt(vk) / bc2_sqrt[k] + eps);
    param[pidx] = static_cast<scalar_t>(p);
  };
  const int64_t K = a.K, C = a.C, R = a.R;
  if (a.neuron_dim == 0) {
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t base = rows[k] * C;
        const int64_t sbase = a.compact ? (state_rows ? state_rows[k] : k) * C : base;
        const int64_t gbase = a.compact_grad ? k * C : base;
        for (int64_t c = 0; c < C; ++c) update(base + c, sbase + c, gbase + c, k);
      }
    });
  } else {
    // Neurons are columns: threads own param rows c; the compact state and grad are [C, K] (or [C, U]), so
    // row c's K selected elements are contiguous there, and the param reads stay within param row c (rows[]
    // sorted). The [K, C] layout strided these by C floats each: a cache line and TLB miss per element.
    const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
    at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t prow = c * R, srow = c * a.U, grow = c * K;
        if (!a.compact) {
          for (int64_t k = 0; k < K; ++k) update(prow + rows[k], prow + rows[k], prow + rows[k], k);
        } else if (state_rows) {
          for (int64_t k = 0; k < K; ++k) {
            update(prow + rows[k], srow + state_rows[k], a.compact_grad ? grow + k : prow + rows[k], k);
          }
        } else if (a.compact_grad) {  // the hot path of sparse_linear + NeuronSparseAdamW: state and grad contiguous
          for (int64_t k = 0; k < K; ++k) update(prow + rows[k], grow + k, grow + k, k);
        } else {
          for (int64_t k = 0; k < K; ++k) update(prow + rows[k], grow + k, prow + rows[k], k);
        }
      }
    });
  }
}

// One tensor: bias corrections on the host (fp64), then the dtype-dispatched loop.
void run_one(const SparseAdamWArgs& a, at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
             const at::Tensor& grad, const at::Tensor& rows, const std::optional<at::Tensor>& state_rows,
             const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& row_step) {
  if (a.K == 0 || a.C == 0) return;
  std::vector<float> step_size(a.K), bc2_sqrt(a.K);
  bias_corrections(a, row_step, step_size.data(), bc2_sqrt.data());
  const float* scale = row_scale ? row_scale->data_ptr<float>() : nullptr;
  const int64_t* srows = state_rows ? state_rows->data_ptr<int64_t>() : nullptr;
  if (srows) {  // an out-of-range state row would write outside the state: check on the host (cheap, K ints)
    for (int64_t k = 0; k < a.K; ++k) {
      TORCH_CHECK(srows[k] >= 0 && srows[k] < a.U, "sparse_adamw_multi_: state_rows[", k, "]=", srows[k],
                  " outside the state's ", a.U, " neurons");
    }
  }
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t k = 0; k < a.K; ++k) {
    TORCH_CHECK(r[k] >= 0 && r[k] < a.R, "sparse_adamw_: rows[", k, "]=", r[k], " outside [0, ", a.R, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "sparse_adamw_cpu", [&] {
    if (a.compact_grad) {
      sparse_adamw_cpu_impl<scalar_t, float>(a, param.data_ptr<scalar_t>(), grad.data_ptr<float>(),
                                             exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), r, srows,
                                             scale, step_size.data(), bc2_sqrt.data());
    } else {
      sparse_adamw_cpu_impl<scalar_t, scalar_t>(a, param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                                exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), r, srows,
                                                scale, step_size.data(), bc2_sqrt.data());
    }
  });
}

void sparse_adamw_cpu(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& grad,
                      const at::Tensor& rows, const std::optional<at::Tensor>& row_scale,
                      const std::optional<at::Tensor>& row_step, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int64_t step, int64_t neuron_dim, bool compact) {
  SparseAdamWArgs a = check_sparse_adamw(param, exp_avg, exp_avg_sq, grad, rows, row_scale, row_step, lr, beta1,
                                         beta2, eps, weight_decay, step, neuron_dim, compact, at::kCPU);
  run_one(a, param, exp_avg, exp_avg_sq, grad, rows, std::nullopt, row_scale, row_step);
}

// CPU multi-tensor: a loop over tensors (each one is already parallel over its neurons).
void sparse_adamw_multi_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList grads, at::TensorList rows,
                            const c10::List<std::optional<at::Tensor>>& state_rows,
                            const c10::List<std::optional<at::Tensor>>& row_scales,
                            const c10::List<std::optional<at::Tensor>>& row_steps, double lr, double beta1,
                            double beta2, double eps, double weight_decay, int64_t step, at::IntArrayRef neuron_dims,
                            bool compact, bool compact_grad) {
  const std::vector<SparseAdamWArgs> args =
      check_sparse_adamw_multi(params, exp_avgs, exp_avg_sqs, grads, rows, state_rows, row_scales, row_steps, lr,
                               beta1, beta2, eps, weight_decay, step, neuron_dims, compact, compact_grad, at::kCPU);
  for (size_t i = 0; i < args.size(); ++i) {
    at::Tensor p = params[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    run_one(args[i], p, m, v, grads[i], rows[i], state_rows.get(i), row_scales.get(i), row_steps.get(i));
  }
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CPU, m) {
  m.impl("sparse_adamw_", &mmt::sparse_adamw_cpu);
  m.impl("sparse_adamw_multi_", &mmt::sparse_adamw_multi_cpu);
}
