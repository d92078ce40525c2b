// Family 1, CUDA binding: checks, stream lookup and dtype mapping; the kernels are in sparse_adamw.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cuda/bind_common.h"
#include "sparse_adamw.h"
#include "sparse_adamw_common.h"

namespace mmt {
namespace {

void sparse_adamw_cuda(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& grad,
                       const at::Tensor& rows, const std::optional<at::Tensor>& row_scale,
                       const std::optional<at::Tensor>& row_step, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int64_t step, int64_t neuron_dim, bool compact) {
  SparseAdamWArgs a = check_sparse_adamw(param, exp_avg, exp_avg_sq, grad, rows, row_scale, row_step, lr, beta1,
                                         beta2, eps, weight_decay, step, neuron_dim, compact, at::kCUDA);
  const c10::cuda::CUDAGuard guard(param.device());
  // Bias corrections in fp64 (1 - beta^s in fp32 loses up to 5e-6 relative); per-row ones stay on device.
  at::Tensor step_size, bc2_sqrt;
  if (row_step) {
    const at::Tensor s = row_step->to(at::kDouble);
    step_size = (lr / (1.0 - at::pow(beta1, s))).to(at::kFloat).contiguous();
    bc2_sqrt = (1.0 - at::pow(beta2, s)).sqrt().to(at::kFloat).contiguous();
  }
  cuda::SparseAdamWParams p{};
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.exp_avg = exp_avg.data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  p.rows = rows.data_ptr<int64_t>();
  p.row_scale = row_scale ? row_scale->data_ptr<float>() : nullptr;
  p.step_size = row_step ? step_size.data_ptr<float>() : nullptr;
  p.bc2_sqrt = row_step ? bc2_sqrt.data_ptr<float>() : nullptr;
  p.step_size_all = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  p.bc2_sqrt_all = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  p.K = a.K; p.R = a.R; p.C = a.C;
  p.lr = a.lr; p.beta1 = a.beta1; p.beta2 = a.beta2; p.eps = a.eps; p.weight_decay = a.weight_decay;
  p.one_minus_beta1 = a.one_minus_beta1; p.one_minus_beta2 = a.one_minus_beta2; p.decay = a.decay;
  p.neuron_dim = static_cast<int>(a.neuron_dim);
  p.compact = a.compact;
  const cudaError_t err = cuda::launch_sparse_adamw(p, to_cuda_dtype(param.scalar_type(), "sparse_adamw_"),
                                                    c10::cuda::getCurrentCUDAStream());
  check_launch(err, "sparse_adamw_");
}

// One launch for every tensor: descriptors go to a pinned host buffer, then to the device on the current stream
// (the caching host allocator keeps the pinned block alive until that copy has run).
void sparse_adamw_multi_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList grads, at::TensorList rows,
                             const c10::List<std::optional<at::Tensor>>& state_rows,
                             const c10::List<std::optional<at::Tensor>>& row_scales,
                             const c10::List<std::optional<at::Tensor>>& row_steps, double lr, double beta1,
                             double beta2, double eps, double weight_decay, int64_t step, at::IntArrayRef neuron_dims,
                             bool compact, bool compact_grad) {
  const std::vector<SparseAdamWArgs> args =
      check_sparse_adamw_multi(params, exp_avgs, exp_avg_sqs, grads, rows, state_rows, row_scales, row_steps, lr,
                               beta1, beta2, eps, weight_decay, step, neuron_dims, compact, compact_grad,
                               at::kCUDA);
  const int n = static_cast<int>(args.size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (int i = 1; i < n; ++i) {
    TORCH_CHECK(params[i].device() == params[0].device(), "sparse_adamw_multi_: all tensors must be on one device; "
                "param ", i, " is on ", params[i].device(), ", param 0 on ", params[0].device());
  }
  const int64_t bytes = static_cast<int64_t>(n) * static_cast<int64_t>(sizeof(cuda::SparseAdamWTensor));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* table = reinterpret_cast<cuda::SparseAdamWTensor*>(host.data_ptr<uint8_t>());
  const float step_size_all = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  const float bc2_sqrt_all = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  int64_t total_blocks = 0;
  for (int i = 0; i < n; ++i) {
    const SparseAdamWArgs& a = args[i];
    const std::optional<at::Tensor> sr = state_rows.get(i), rs = row_scales.get(i), st = row_steps.get(i);
    cuda::SparseAdamWTensor d{};
    d.param = params[i].data_ptr();
    d.grad = grads[i].data_ptr();
    d.exp_avg = exp_avgs[i].data_ptr<float>();
    d.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    d.rows = rows[i].data_ptr<int64_t>();
    d.state_rows = sr ? sr->data_ptr<int64_t>() : nullptr;
    d.row_scale = rs ? rs->data_ptr<float>() : nullptr;
    d.row_step = st ? st->data_ptr<int64_t>() : nullptr;
    d.K = a.K; d.R = a.R; d.C = a.C; d.U = a.U;
    d.step_size_all = step_size_all;
    d.bc2_sqrt_all = bc2_sqrt_all;
    d.neuron_dim = static_cast<int>(a.neuron_dim);
    d.compact_grad = compact_grad ? 1 : 0;
    d.dtype = static_cast<int>(to_cuda_dtype(params[i].scalar_type(), "sparse_adamw_"));
    int64_t outer = 0, inner_blocks = 1;
    cuda::sparse_adamw_multi_tiling(a.K, a.C, d.neuron_dim, &outer, &inner_blocks);
    d.inner_blocks = inner_blocks;
    d.block_start = total_blocks;
    total_blocks += outer * inner_blocks;
    table[i] = d;
  }
  if (total_blocks == 0) return;
  at::Tensor device_table = host.to(params[0].device(), /*non_blocking=*/true);
  cuda::SparseAdamWMultiArgs m{};
  m.lr = lr;
  m.log_beta1 = std::log(beta1);
  m.log_beta2 = std::log(beta2);
  m.beta1 = static_cast<float>(beta1);
  m.beta2 = static_cast<float>(beta2);
  m.eps = static_cast<float>(eps);
  m.one_minus_beta1 = args[0].one_minus_beta1;
  m.one_minus_beta2 = args[0].one_minus_beta2;
  m.decay = args[0].decay;
  m.compact = compact;
  const cudaError_t err = cuda::launch_sparse_adamw_multi(
      reinterpret_cast<const cuda::SparseAdamWTensor*>(device_table.data_ptr<uint8_t>()), n, total_blocks, m,
      c10::cuda::getCurrentCUDAStream());
  check_launch(err, "sparse_adamw_multi_");
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CUDA, m) {
  m.impl("sparse_adamw_", &mmt::sparse_adamw_cuda);
  m.impl("sparse_adamw_multi_", &mmt::sparse_adamw_multi_cuda);
}
