// Family 1, CUDA binding: checks, stream lookup and dtype mapping; the kernels are in sparse_adamw.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "sparse_adamw.h"
#include "sparse_adamw_common.h"

namespace mmt {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "mmt CUDA kernels take fp32, bf16 or fp16 params, got ", t);
  }
}

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
  const cudaError_t err = cuda::launch_sparse_adamw(p, to_dtype(param.scalar_type()),
                                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sparse_adamw_ CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CUDA, m) { m.impl("sparse_adamw_", &mmt::sparse_adamw_cuda); }
