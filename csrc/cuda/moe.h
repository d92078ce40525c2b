// Raw-pointer launchers for family 2's permute / dispatch / combine (compiled by nvcc without torch
// headers; see docs/kernels.md). The grouped expert GEMM runs in Triton on GPUs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace mmt {
namespace cuda {


// Slots handled by one block of the permute kernels; the workspace holds one count per (chunk, expert).
constexpr int64_t kMoePermuteChunk = 256;
inline int64_t moe_permute_chunks(int64_t n) { return (n + kMoePermuteChunk - 1) / kMoePermuteChunk; }

// Stable counting sort of `ids` [n] (values in [0, E)) without a host sync: per-chunk histograms,
// a one-block prefix sum over (expert, chunk), then a scatter that ranks each slot inside its chunk.
// workspace: int32 [moe_permute_chunks(n) * E]. Writes perm [n], inv [n], offsets [E+1].
cudaError_t launch_moe_permute(const int64_t* ids, int64_t n, int64_t E, int32_t* workspace, int64_t* perm,
                               int64_t* inv, int64_t* offsets, cudaStream_t stream);

// out[j] = x[perm[j] / k] * scale[perm[j]] (scale may be null); x [n/k, d], out [n, d].
cudaError_t launch_moe_dispatch(const void* x, const int64_t* perm, const float* scale, void* out, int64_t n,
                                int64_t d, int64_t k, DType dtype, cudaStream_t stream);

// out[t] = sum_s w[t*k+s] * yp[inv[t*k+s]] in fp32, s in order (w may be null); one block per token.
cudaError_t launch_moe_combine(const void* yp, const int64_t* inv, const float* w, void* out, int64_t T, int64_t d,
                               int64_t k, DType dtype, cudaStream_t stream);

// out[i] = <dout[i / k], yp[inv[i]]> in fp32, for i in [0, n).
cudaError_t launch_moe_combine_weight_grad(const void* dout, const void* yp, const int64_t* inv, float* out,
                                           int64_t n, int64_t d, int64_t k, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmt
