// Raw-pointer launchers for family 1 (compiled by nvcc without torch headers; see TOOLCHAIN.md).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace mmt {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct SparseAdamWParams {
  void* param;             // [R, C] (neuron_dim 0) or [C, R] (neuron_dim 1), contiguous
  const void* grad;        // same shape and dtype as param
  float* exp_avg;          // compact [K, C] or param-shaped
  float* exp_avg_sq;
  const int64_t* rows;     // [K] neuron indices
  const float* row_scale;  // [K] or nullptr
  const float* step_size;  // [K] lr / (1 - beta1^s_k) or nullptr (then `step_size_all`)
  const float* bc2_sqrt;   // [K] sqrt(1 - beta2^s_k) or nullptr (then `bc2_sqrt_all`)
  float step_size_all, bc2_sqrt_all;
  int64_t K, R, C;
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2, decay;  // formed in double on the host
  int neuron_dim;
  bool compact;
};

cudaError_t launch_sparse_adamw(const SparseAdamWParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmt
