// Raw-pointer launcher for the neuron-sparse weight gradient (compiled by nvcc without torch headers).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace mmt {
namespace cuda {

// acc[K, C] (fp32, contiguous) += a[:, rows].T @ b, with a [N, R] and b [N, C] contiguous of `dtype` and rows
// int64 [K] in [0, R); `transposed`: acc is [C, K] (acc[c, k], the column-neuron layout). Deterministic: each
// output element is summed by one thread in token order.
cudaError_t launch_sparse_weight_grad(float* acc, const void* a, const int64_t* rows, const void* b, int64_t N,
                                      int64_t R, int64_t K, int64_t C, bool transposed, DType dtype,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace mmt
