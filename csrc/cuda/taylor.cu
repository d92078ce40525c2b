// Family 1, CUDA: Taylor importance accumulator. Pass 1: blocks of 32 columns x 8 token lanes walk a chunk of
// tokens (a warp reads 32 consecutive columns of one token: coalesced), reduce their 8 lanes in shared memory
// and write one partial per (chunk, column). Pass 2 adds the partials to acc in chunk order. No atomics, so
// results do not depend on scheduling.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "taylor.h"

namespace mmt {
namespace cuda {
namespace {

constexpr int kCols = 32;
constexpr int kLanes = 8;
constexpr int64_t kTokensPerChunk = 256;

template <typename T> __device__ __forceinline__ float ld(const T* p, int64_t i) { return to_f32(p[i]); }

template <typename T>
__global__ void taylor_partial_kernel(float* out, const T* act, const T* grad, const float* w, int64_t N, int64_t M,
                                      int64_t tokens_per_chunk, bool accumulate) {
  __shared__ float part[kLanes][kCols];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t t0 = chunk * tokens_per_chunk;
  const int64_t t1 = t0 + tokens_per_chunk < N ? t0 + tokens_per_chunk : N;
  float sum = 0.0f;
  if (j < M) {
    for (int64_t t = t0 + threadIdx.y; t < t1; t += kLanes) {
      const float wt = w[t];
      sum += wt * fabsf(ld(act, t * M + j) * ld(grad, t * M + j));
    }
  }
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < M) {
    float total = 0.0f;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) total += part[l][threadIdx.x];
    if (accumulate) out[j] += total;           // single chunk: straight into acc
    else out[chunk * M + j] = total;           // partial row of the workspace
  }
}

__global__ void taylor_reduce_kernel(float* acc, const float* workspace, int64_t chunks, int64_t M) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M) return;
  float total = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) total += workspace[c * M + j];
  acc[j] += total;
}

}  // namespace

int64_t taylor_chunks(int64_t N, int64_t M) {
  (void)M;
  const int64_t chunks = (N + kTokensPerChunk - 1) / kTokensPerChunk;
  return chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks);
}

cudaError_t launch_taylor_accumulate(float* acc, const void* act, const void* grad, const float* w, int64_t N,
                                     int64_t M, DType dtype, float* workspace, cudaStream_t stream) {
  if (N == 0 || M == 0) return cudaSuccess;
  const int64_t chunks = taylor_chunks(N, M);
  const int64_t per_chunk = (N + chunks - 1) / chunks;
  const int64_t col_blocks = (M + kCols - 1) / kCols;
  if (col_blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  const dim3 block(kCols, kLanes);
  const bool direct = chunks == 1;
  float* out = direct ? acc : workspace;
  switch (dtype) {
    case DType::kFloat32:
      taylor_partial_kernel<float><<<grid, block, 0, stream>>>(out, static_cast<const float*>(act),
          static_cast<const float*>(grad), w, N, M, per_chunk, direct);
      break;
    case DType::kBFloat16:
      taylor_partial_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(out, static_cast<const __nv_bfloat16*>(act),
          static_cast<const __nv_bfloat16*>(grad), w, N, M, per_chunk, direct);
      break;
    case DType::kFloat16:
      taylor_partial_kernel<__half><<<grid, block, 0, stream>>>(out, static_cast<const __half*>(act),
          static_cast<const __half*>(grad), w, N, M, per_chunk, direct);
      break;
  }
  if (!direct) {
    taylor_reduce_kernel<<<static_cast<unsigned>((M + 255) / 256), 256, 0, stream>>>(acc, workspace, chunks, M);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmt
