// Family 2, CUDA: permute (counting sort), dispatch and combine. No atomics on outputs: the permute's
// histograms use shared-memory integer atomics (order-independent), and combine gathers the k rows
// of each token in a fixed order, so every result is bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>

#include "moe.h"

namespace mmt {
namespace cuda {
namespace {


constexpr int kChunk = static_cast<int>(kMoePermuteChunk);

// ---- permute ----

__global__ void permute_count_kernel(const int64_t* ids, int64_t n, int64_t E, int32_t* counts) {
  extern __shared__ int32_t hist[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (i < n) {
    const int64_t e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts[blockIdx.x * E + e] = hist[e];
}

// One block: totals per expert, exclusive scan into offsets, then counts[c, e] becomes the first
// position of chunk c's slots of expert e.
__global__ void permute_scan_kernel(int32_t* counts, int64_t chunks, int64_t E, int64_t* offsets) {
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += counts[c * E + e];
    offsets[e + 1] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t base = offsets[e];
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t cnt = counts[c * E + e];
      counts[c * E + e] = static_cast<int32_t>(base);
      base += cnt;
    }
  }
}

__global__ void permute_scatter_kernel(const int64_t* ids, int64_t n, int64_t E, const int32_t* bases, int64_t* perm,
                                       int64_t* inv) {
  __shared__ int64_t sid[kChunk];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  sid[threadIdx.x] = i < n ? ids[i] : -1;
  __syncthreads();
  if (i >= n) return;
  const int64_t e = sid[threadIdx.x];
  assert(e >= 0 && e < E && "moe_permute: expert id outside [0, num_experts)");
  if (e < 0 || e >= E) return;
  int rank = 0;  // earlier slots of the same expert in this chunk: keeps the sort stable
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += sid[j] == e;
  const int64_t pos = static_cast<int64_t>(bases[blockIdx.x * E + e]) + rank;
  perm[pos] = i;
  inv[i] = pos;
}

// ---- dispatch / combine ----

template <typename T>
__global__ void dispatch_kernel(const T* x, const int64_t* perm, const float* scale, T* out, int64_t n, int64_t d,
                                int64_t k) {
  for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
    const int64_t slot = perm[j];
    const T* src = x + (slot / k) * d;
    T* dst = out + j * d;
    if (scale) {
      const float w = scale[slot];
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = from_f32<T>(to_f32(src[c]) * w);
    } else {
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
    }
  }
}

template <typename T>
__global__ void combine_kernel(const T* yp, const int64_t* inv, const float* w, T* out, int64_t T_, int64_t d,
                               int64_t k) {
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = 0.f;
      for (int64_t s = 0; s < k; ++s) {
        const int64_t row = inv[t * k + s];
        acc += (w ? w[t * k + s] : 1.f) * to_f32(yp[row * d + c]);
      }
      out[t * d + c] = from_f32<T>(acc);
    }
  }
}

template <typename T>
__global__ void combine_weight_grad_kernel(const T* dout, const T* yp, const int64_t* inv, float* out, int64_t n,
                                           int64_t d, int64_t k) {
  __shared__ float warp_sums[32];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* g = dout + (i / k) * d;
    const T* y = yp + inv[i] * d;
    float acc = 0.f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) acc += to_f32(g[c]) * to_f32(y[c]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      acc = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
      if (lane == 0) out[i] = acc;
    }
    __syncthreads();
  }
}

inline int row_threads(int64_t d) { return d >= 256 ? 256 : (d >= 128 ? 128 : (d >= 64 ? 64 : 32)); }
inline unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(rows < 65535 * 32 ? rows : 65535 * 32); }

template <typename Fn>
cudaError_t by_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    case DType::kFloat16: fn(__half{}); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_moe_permute(const int64_t* ids, int64_t n, int64_t E, int32_t* workspace, int64_t* perm,
                               int64_t* inv, int64_t* offsets, cudaStream_t stream) {
  const int64_t chunks = moe_permute_chunks(n);
  if (E * static_cast<int64_t>(sizeof(int32_t)) > 48 * 1024) return cudaErrorInvalidValue;  // > 12288 experts
  if (chunks > 0) {
    permute_count_kernel<<<static_cast<unsigned>(chunks), kChunk, E * sizeof(int32_t), stream>>>(ids, n, E, workspace);
  }
  permute_scan_kernel<<<1, 1024, 0, stream>>>(workspace, chunks, E, offsets);
  if (chunks > 0) {
    permute_scatter_kernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(ids, n, E, workspace, perm, inv);
  }
  return cudaGetLastError();
}

cudaError_t launch_moe_dispatch(const void* x, const int64_t* perm, const float* scale, void* out, int64_t n,
                                int64_t d, int64_t k, DType dtype, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_kernel<T><<<row_blocks(n), row_threads(d), 0, stream>>>(static_cast<const T*>(x), perm, scale,
                                                                      static_cast<T*>(out), n, d, k);
  });
}

cudaError_t launch_moe_combine(const void* yp, const int64_t* inv, const float* w, void* out, int64_t T, int64_t d,
                               int64_t k, DType dtype, cudaStream_t stream) {
  if (T == 0 || d == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using U = decltype(tag);
    combine_kernel<U><<<row_blocks(T), row_threads(d), 0, stream>>>(static_cast<const U*>(yp), inv, w,
                                                                     static_cast<U*>(out), T, d, k);
  });
}

cudaError_t launch_moe_combine_weight_grad(const void* dout, const void* yp, const int64_t* inv, float* out,
                                           int64_t n, int64_t d, int64_t k, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    combine_weight_grad_kernel<T><<<row_blocks(n), row_threads(d), 0, stream>>>(
        static_cast<const T*>(dout), static_cast<const T*>(yp), inv, out, n, d, k);
  });
}

}  // namespace cuda
}  // namespace mmt
