// Raw-pointer launcher for the Taylor importance accumulator (compiled by nvcc without torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "dtype.h"

namespace mmt {
namespace cuda {

// Token chunks of the first pass for N tokens: each chunk writes one partial row of `workspace` [chunks, M].
int64_t taylor_chunks(int64_t N, int64_t M);

// acc[j] += sum_t w[t] * |act[t,j] * grad[t,j]|; act/grad [N, M] contiguous of `dtype`. `workspace` holds
// taylor_chunks(N, M) * M floats (unused when that is 1). Deterministic: fixed-order reductions, no atomics.
cudaError_t launch_taylor_accumulate(float* acc, const void* act, const void* grad, const float* w, int64_t N,
                                     int64_t M, DType dtype, float* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmt
