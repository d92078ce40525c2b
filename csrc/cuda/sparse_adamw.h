// Raw-pointer launchers for family 1 (compiled by nvcc without torch headers; see docs/kernels.md).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace mmt {
namespace cuda {

struct SparseAdamWParams {
  void* param;             // [R, C] (neuron_dim 0) or [C, R] (neuron_dim 1), contiguous
  const void* grad;        // same shape and dtype as param
  float* exp_avg;          // compact [K, C] (rows) / [C, K] (columns), or param-shaped
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

// ---- several tensors in one launch (sparse_adamw_multi_) ----------------------------------------------------
// One descriptor per tensor, in a device-side table (the idea of PyTorch's multi_tensor_apply, with the table in
// global memory instead of kernel arguments so the tensor count is unbounded). Blocks are numbered across
// tensors; block b belongs to the tensor with the last block_start <= b.
struct SparseAdamWTensor {
  void* param;
  const void* grad;           // param-shaped in the param's dtype, or fp32 in the state's layout when compact_grad
  float* exp_avg;             // compact [U, C] (rows) / [C, U] (columns), or param-shaped
  float* exp_avg_sq;
  const int64_t* rows;        // [K]
  const int64_t* state_rows;  // [K] compact-state neuron (row, or column for columns) per selected one, or nullptr
  const float* row_scale;     // [K] or nullptr
  const int64_t* row_step;    // [K] per-neuron step counts, or nullptr (then step_size_all / bc2_sqrt_all)
  int64_t K, R, C;
  int64_t U;             // neurons in the compact state (K without state_rows): a column state's row length
  int64_t block_start;   // first block of this tensor
  int64_t inner_blocks;  // blocks along the contiguous axis
  float step_size_all, bc2_sqrt_all;
  int neuron_dim;
  int dtype;  // DType
  int compact_grad;  // grad is fp32 [K, C] (rows) / [C, K] (columns), selected neuron k at index k
};

struct SparseAdamWMultiArgs {
  double lr, log_beta1, log_beta2;  // per-neuron bias corrections are formed in double on the device
  float beta1, beta2, eps, one_minus_beta1, one_minus_beta2, decay;
  bool compact;
};

// Blocks per tensor for the table's block_start/inner_blocks (host helper, same tiling as the kernel).
void sparse_adamw_multi_tiling(int64_t K, int64_t C, int neuron_dim, int64_t* outer, int64_t* inner_blocks);

// `table` is a device pointer to n descriptors; total_blocks = last block_start + its block count.
cudaError_t launch_sparse_adamw_multi(const SparseAdamWTensor* table, int n, int64_t total_blocks,
                                      const SparseAdamWMultiArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmt
