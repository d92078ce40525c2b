// Family 1b, CUDA: neuron-sparse weight gradient acc[K, C] += a[:, rows].T @ b (fp32 accumulation), or
// acc[C, K] (transposed: column neurons' layout).
// A block computes a 64 x 64 tile of acc (64 selected neurons x 64 columns); its 256 threads own 4 x 4 outputs
// each (neurons k0 + ty + 16i, columns c0 + tx + 16j: neighbouring threads write neighbouring columns; ty and tx
// swap roles for the transposed acc, so the writes stay coalesced). Tokens
// are walked 16 at a time through shared memory: the selected columns of a are gathered there (rows[] sorted, so
// a warp's loads stay within a few segments), b's tile is a coalesced row slice. SIMT fp32 FMA, no tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>

#include "sparse_grad.h"

namespace mmt {
namespace cuda {
namespace {

constexpr int kTile = 64;   // neurons and columns per block
constexpr int kStep = 16;   // tokens per shared-memory step
constexpr int kThreads = 256;

template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kThreads)
    sparse_weight_grad_kernel(float* __restrict__ acc, const T* __restrict__ a, const int64_t* __restrict__ rows,
                              const T* __restrict__ b, int64_t N, int64_t R, int64_t K, int64_t C) {
  __shared__ float as[kStep][kTile];
  __shared__ float bs[kStep][kTile];
  __shared__ int64_t neuron[kTile];
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x;
  if (tid < kTile) {
    const int64_t k = k0 + tid;
    const int64_t r = k < K ? rows[k] : -1;
    assert((k >= K || (r >= 0 && r < R)) && "sparse_weight_grad_: rows value outside [0, R)");
    neuron[tid] = r;
  }
  __syncthreads();
  const int ty = tid / 16, tx = tid % 16;
  const int kq = kTransposed ? tx : ty, cq = kTransposed ? ty : tx;  // tx walks acc's contiguous axis
  float sum[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sum[i][j] = 0.0f;
  for (int64_t n0 = 0; n0 < N; n0 += kStep) {
    for (int e = tid; e < kStep * kTile; e += kThreads) {
      const int nn = e / kTile, col = e % kTile;
      const int64_t n = n0 + nn;
      const int64_t r = neuron[col];
      const int64_t c = c0 + col;
      as[nn][col] = (n < N && r >= 0) ? to_f32(a[n * R + r]) : 0.0f;
      bs[nn][col] = (n < N && c < C) ? to_f32(b[n * C + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int nn = 0; nn < kStep; ++nn) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[nn][kq + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[nn][cq + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[i][j] = fmaf(av[i], bv[j], sum[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t k = k0 + kq + 16 * i;
    if (k >= K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + cq + 16 * j;
      if (c < C) acc[kTransposed ? c * K + k : k * C + c] += sum[i][j];
    }
  }
}

}  // namespace

template <typename T>
void launch_typed(float* acc, const void* a, const int64_t* rows, const void* b, int64_t N, int64_t R, int64_t K,
                  int64_t C, bool transposed, dim3 grid, cudaStream_t stream) {
  const T* at = static_cast<const T*>(a);
  const T* bt = static_cast<const T*>(b);
  if (transposed) {
    sparse_weight_grad_kernel<T, true><<<grid, kThreads, 0, stream>>>(acc, at, rows, bt, N, R, K, C);
  } else {
    sparse_weight_grad_kernel<T, false><<<grid, kThreads, 0, stream>>>(acc, at, rows, bt, N, R, K, C);
  }
}

cudaError_t launch_sparse_weight_grad(float* acc, const void* a, const int64_t* rows, const void* b, int64_t N,
                                      int64_t R, int64_t K, int64_t C, bool transposed, DType dtype,
                                      cudaStream_t stream) {
  if (K == 0 || C == 0 || N == 0) return cudaSuccess;
  const int64_t tiles_c = (C + kTile - 1) / kTile, tiles_k = (K + kTile - 1) / kTile;
  if (tiles_c > 2147483647LL || tiles_k > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles_c), static_cast<unsigned>(tiles_k));
  switch (dtype) {
    case DType::kFloat32: launch_typed<float>(acc, a, rows, b, N, R, K, C, transposed, grid, stream); break;
    case DType::kBFloat16: launch_typed<__nv_bfloat16>(acc, a, rows, b, N, R, K, C, transposed, grid, stream); break;
    case DType::kFloat16: launch_typed<__half>(acc, a, rows, b, N, R, K, C, transposed, grid, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmt
