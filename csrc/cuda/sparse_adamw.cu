// Family 1, CUDA: strict neuron-sparse AdamW. One thread per element of the selected neurons,
// 4 elements per thread along the contiguous axis; fp32 math and state whatever the param dtype.
// Compact state (and grad) is [K, C] for row neurons, [C, K] for columns: the inner (thread) axis is then
// contiguous in the state for both, so a warp's state accesses coalesce.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>

#include "sparse_adamw.h"

namespace mmt {
namespace cuda {
namespace {


constexpr int kThreads = 256;
constexpr int kPerThread = 4;

template <typename T>
__global__ void sparse_adamw_kernel(SparseAdamWParams p) {
  // blockIdx.x walks neurons (neuron_dim 0) or param rows (neuron_dim 1); y walks the contiguous axis.
  const int64_t outer = blockIdx.x;
  const int64_t inner0 = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kPerThread;
  const int64_t inner_len = p.neuron_dim == 0 ? p.C : p.K;
  T* param = static_cast<T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t inner = inner0 + i;
    if (inner >= inner_len) return;
    const int64_t k = p.neuron_dim == 0 ? outer : inner;
    const int64_t c = p.neuron_dim == 0 ? inner : outer;
    const int64_t n = p.rows[k];
    assert(n >= 0 && n < p.R && "sparse_adamw_: rows value outside [0, neurons)");
    const int64_t pidx = p.neuron_dim == 0 ? n * p.C + c : c * p.R + n;
    const int64_t sidx = !p.compact ? pidx : p.neuron_dim == 0 ? k * p.C + c : c * p.K + k;
    const float step_size = p.step_size ? p.step_size[k] : p.step_size_all;
    const float bc2_sqrt = p.bc2_sqrt ? p.bc2_sqrt[k] : p.bc2_sqrt_all;
    assert(bc2_sqrt > 0.0f && "sparse_adamw_: row_step values must be >= 1");
    const float g = to_f32(grad[pidx]) * (p.row_scale ? p.row_scale[k] : 1.0f);
    const float m = p.beta1 * p.exp_avg[sidx] + p.one_minus_beta1 * g;
    const float v = p.beta2 * p.exp_avg_sq[sidx] + p.one_minus_beta2 * g * g;
    p.exp_avg[sidx] = m;
    p.exp_avg_sq[sidx] = v;
    const float w = to_f32(param[pidx]) * p.decay - step_size * m / (sqrtf(v) / bc2_sqrt + p.eps);
    param[pidx] = from_f32<T>(w);
  }
}

// One element of one tensor of the multi-tensor launch (T = the tensor's dtype).
template <typename T>
__device__ __forceinline__ void multi_update(const SparseAdamWTensor& d, const SparseAdamWMultiArgs& a, int64_t outer,
                                             int64_t inner) {
  const int64_t k = d.neuron_dim == 0 ? outer : inner;
  const int64_t c = d.neuron_dim == 0 ? inner : outer;
  const int64_t n = d.rows[k];
  assert(n >= 0 && n < d.R && "sparse_adamw_multi_: rows value outside [0, neurons)");
  const int64_t pidx = d.neuron_dim == 0 ? n * d.C + c : c * d.R + n;
  const int64_t srow = d.state_rows ? d.state_rows[k] : k;
  const int64_t sidx = !a.compact ? pidx : d.neuron_dim == 0 ? srow * d.C + c : c * d.U + srow;
  float step_size = d.step_size_all, bc2_sqrt = d.bc2_sqrt_all;
  if (d.row_step) {  // 1 - beta^s = -expm1(s log beta), in double: fp32 would lose ~5e-6 relative
    const double s = static_cast<double>(d.row_step[k]);
    assert(s >= 1.0 && "sparse_adamw_multi_: row_steps values must be >= 1");
    step_size = static_cast<float>(a.lr / -expm1(s * a.log_beta1));
    bc2_sqrt = static_cast<float>(sqrt(-expm1(s * a.log_beta2)));
  }
  T* param = static_cast<T*>(d.param);
  const int64_t gidx = d.neuron_dim == 0 ? k * d.C + c : c * d.K + k;  // compact grad: the state's layout
  const float g_raw = d.compact_grad ? static_cast<const float*>(d.grad)[gidx]
                                     : to_f32(static_cast<const T*>(d.grad)[pidx]);
  const float g = g_raw * (d.row_scale ? d.row_scale[k] : 1.0f);
  const float m = a.beta1 * d.exp_avg[sidx] + a.one_minus_beta1 * g;
  const float v = a.beta2 * d.exp_avg_sq[sidx] + a.one_minus_beta2 * g * g;
  d.exp_avg[sidx] = m;
  d.exp_avg_sq[sidx] = v;
  param[pidx] = from_f32<T>(to_f32(param[pidx]) * a.decay - step_size * m / (sqrtf(v) / bc2_sqrt + a.eps));
}

__global__ void sparse_adamw_multi_kernel(const SparseAdamWTensor* __restrict__ table, int n,
                                          SparseAdamWMultiArgs a) {
  const int64_t b = blockIdx.x;
  int lo = 0, hi = n - 1;  // last tensor whose block_start <= b (tables are short: a binary search is enough)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].block_start <= b) lo = mid; else hi = mid - 1;
  }
  const SparseAdamWTensor d = table[lo];
  const int64_t local = b - d.block_start;
  const int64_t outer = local / d.inner_blocks;
  const int64_t inner0 = ((local % d.inner_blocks) * kThreads + threadIdx.x) * kPerThread;
  const int64_t inner_len = d.neuron_dim == 0 ? d.C : d.K;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t inner = inner0 + i;
    if (inner >= inner_len) return;
    switch (static_cast<DType>(d.dtype)) {  // uniform per block: no divergence
      case DType::kFloat32: multi_update<float>(d, a, outer, inner); break;
      case DType::kBFloat16: multi_update<__nv_bfloat16>(d, a, outer, inner); break;
      case DType::kFloat16: multi_update<__half>(d, a, outer, inner); break;
    }
  }
}

}  // namespace

void sparse_adamw_multi_tiling(int64_t K, int64_t C, int neuron_dim, int64_t* outer, int64_t* inner_blocks) {
  const int64_t inner = neuron_dim == 0 ? C : K;
  *outer = (K == 0 || C == 0) ? 0 : (neuron_dim == 0 ? K : C);
  *inner_blocks = (inner + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  if (*inner_blocks == 0) *inner_blocks = 1;
}

cudaError_t launch_sparse_adamw_multi(const SparseAdamWTensor* table, int n, int64_t total_blocks,
                                      const SparseAdamWMultiArgs& args, cudaStream_t stream) {
  if (n == 0 || total_blocks == 0) return cudaSuccess;
  if (total_blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  sparse_adamw_multi_kernel<<<static_cast<unsigned>(total_blocks), kThreads, 0, stream>>>(table, n, args);
  return cudaGetLastError();
}

cudaError_t launch_sparse_adamw(const SparseAdamWParams& p, DType dtype, cudaStream_t stream) {
  if (p.K == 0 || p.C == 0) return cudaSuccess;
  const int64_t outer = p.neuron_dim == 0 ? p.K : p.C;
  const int64_t inner = p.neuron_dim == 0 ? p.C : p.K;
  // outer on grid.x (up to 2^31-1), the contiguous axis on grid.y (65535 * 1024 elements per neuron).
  const int64_t inner_blocks = (inner + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  if (inner_blocks > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(outer), static_cast<unsigned>(inner_blocks));
  switch (dtype) {
    case DType::kFloat32: sparse_adamw_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: sparse_adamw_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kFloat16: sparse_adamw_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmt
