// Family 3, CUDA: fused K-way merge (one read of each input per element, fp32 accumulation in task
// order, as the reference) and radix-select TIES thresholds (shared-memory histograms of the fp32 bit
// patterns of |x - base|, 11 + 10 + 10 bits; the digit choice runs on the device, so no host sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "merge.h"

namespace mmt {
namespace cuda {
namespace {


constexpr int kThreads = 256;

template <typename T, int METHOD>
__global__ void merge_kernel(const MergeParams p) {
  constexpr bool kTiesLike = METHOD == merge::kTies || METHOD == merge::kDareTies;
  constexpr bool kDare = METHOD == merge::kDareLinear || METHOD == merge::kDareTies;
  const T* base = static_cast<const T*>(p.base);
  T* out = static_cast<T*>(p.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const float b = (METHOD != merge::kLinear && base) ? to_f32(base[i]) : 0.0f;
    float tot = 0.0f, vote = 0.0f, pos = 0.0f, neg = 0.0f, cpos = 0.0f, cneg = 0.0f;
    for (int k = 0; k < p.K; ++k) {
      const float x = to_f32(static_cast<const T*>(p.x[k])[i]);
      const float w = p.weight[k];
      float t = METHOD == merge::kLinear ? x : (base ? x - b : x);
      if (METHOD == merge::kTies) t = fabsf(t) >= p.thresholds[k] ? t : 0.0f;
      if (kDare) t = merge::dare_keep(p.key[k], static_cast<uint32_t>(i), p.keep24[k]) ? t * p.scale[k] : 0.0f;
      if (kTiesLike) {
        const float v = p.sign_by_count ? static_cast<float>((t > 0.0f) - (t < 0.0f)) : t;
        const float wt = w * t;
        vote = k == 0 ? v : vote + v;
        pos = k == 0 ? (t > 0.0f ? wt : 0.0f) : pos + (t > 0.0f ? wt : 0.0f);
        neg = k == 0 ? (t < 0.0f ? wt : 0.0f) : neg + (t < 0.0f ? wt : 0.0f);
        cpos += t > 0.0f ? 1.0f : 0.0f;
        cneg += t < 0.0f ? 1.0f : 0.0f;
      } else {
        tot = k == 0 ? w * t : tot + w * t;  // first term assigned: linear of one model is exact
      }
    }
    float r;
    if (METHOD == merge::kLinear) {
      r = tot;
    } else {
      const float m = kTiesLike ? (vote >= 0.0f ? pos / fmaxf(cpos, 1.0f) : neg / fmaxf(cneg, 1.0f)) : tot;
      r = base ? b + p.lam * m : p.lam * m;
    }
    out[i] = from_f32<T>(r);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t magnitude_bits(const T* x, const T* base, int64_t i) {
  const float v = base ? to_f32(x[i]) - to_f32(base[i]) : to_f32(x[i]);
  return __float_as_uint(fabsf(v));
}

// grid (blocks, K): histogram of digit `pass` among elements whose higher bits match the task's prefix.
template <typename T>
__global__ void threshold_hist_kernel(const ThresholdParams p, int pass) {
  __shared__ uint32_t hist[merge::kSelectBins];
  const int task = blockIdx.y;
  for (int j = threadIdx.x; j < merge::kSelectBins; j += blockDim.x) hist[j] = 0;
  __syncthreads();
  if (p.ks[task] > 0) {
    const T* x = static_cast<const T*>(p.x[task]);
    const T* base = static_cast<const T*>(p.base);
    const int shift = merge::select_shift(pass);
    const uint32_t dmask = merge::select_digit_mask(pass);
    const int fixed = pass == 0 ? 32 : merge::select_shift(pass - 1);
    const uint32_t prefix = p.prefix[task];
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
      const uint32_t u = magnitude_bits(x, base, i);
      if (fixed == 32 || (u >> fixed) == (prefix >> fixed)) atomicAdd(&hist[(u >> shift) & dmask], 1u);
    }
  }
  __syncthreads();
  uint32_t* g = p.hist + static_cast<int64_t>(task) * merge::kSelectBins;
  for (int j = threadIdx.x; j < merge::kSelectBins; j += blockDim.x) {
    if (hist[j]) atomicAdd(&g[j], hist[j]);
  }
}

// One thread per task: walk the digit's bins from the top until `remaining` elements are covered.
__global__ void threshold_select_kernel(const ThresholdParams p, int pass) {
  const int task = blockIdx.x * blockDim.x + threadIdx.x;
  if (task >= p.K || p.ks[task] == 0) return;
  const uint32_t* h = p.hist + static_cast<int64_t>(task) * merge::kSelectBins;
  const int shift = merge::select_shift(pass);
  int64_t cum = 0;
  const int64_t remaining = p.remaining[task];
  for (int d = static_cast<int>(merge::select_digit_mask(pass)); d >= 0; --d) {
    const int64_t cnt = h[d];
    if (cum + cnt >= remaining || d == 0) {
      p.prefix[task] |= static_cast<uint32_t>(d) << shift;
      p.remaining[task] = remaining - cum;
      break;
    }
    cum += cnt;
  }
  if (pass == merge::kSelectPasses - 1) p.out[task] = __uint_as_float(p.prefix[task]);
}

__global__ void threshold_init_kernel(const ThresholdParams p) {
  const int task = blockIdx.x * blockDim.x + threadIdx.x;
  if (task < p.K) {
    p.prefix[task] = 0;
    p.remaining[task] = p.ks[task];
    if (p.ks[task] == 0) p.out[task] = __uint_as_float(0x7F800000u);  // +inf: keep nothing
  }
}

int grid_for(int64_t n, int per_sm_blocks) {
  int dev = 0, sms = 80;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * per_sm_blocks;
  return static_cast<int>(want < cap ? (want > 0 ? want : 1) : cap);
}

template <typename T>
cudaError_t launch_merge_t(const MergeParams& p, cudaStream_t s) {
  const int grid = grid_for(p.n, 8);
  switch (p.method) {
    case merge::kLinear: merge_kernel<T, merge::kLinear><<<grid, kThreads, 0, s>>>(p); break;
    case merge::kTaskArithmetic: merge_kernel<T, merge::kTaskArithmetic><<<grid, kThreads, 0, s>>>(p); break;
    case merge::kTies: merge_kernel<T, merge::kTies><<<grid, kThreads, 0, s>>>(p); break;
    case merge::kDareLinear: merge_kernel<T, merge::kDareLinear><<<grid, kThreads, 0, s>>>(p); break;
    case merge::kDareTies: merge_kernel<T, merge::kDareTies><<<grid, kThreads, 0, s>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_threshold_t(const ThresholdParams& p, cudaStream_t s) {
  threshold_init_kernel<<<1, kMergeMaxTasks, 0, s>>>(p);
  // Per task, enough blocks to fill the device; each flushes one shared histogram.
  const int blocks = (grid_for(p.n, 4) + p.K - 1) / p.K;
  for (int pass = 0; pass < merge::kSelectPasses; ++pass) {
    cudaError_t e = cudaMemsetAsync(p.hist, 0, sizeof(uint32_t) * merge::kSelectBins * p.K, s);
    if (e != cudaSuccess) return e;
    threshold_hist_kernel<T><<<dim3(blocks > 0 ? blocks : 1, p.K), kThreads, 0, s>>>(p, pass);
    threshold_select_kernel<<<1, kMergeMaxTasks, 0, s>>>(p, pass);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_merge(const MergeParams& p, DType dtype, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.K < 1 || p.K > kMergeMaxTasks) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_merge_t<float>(p, stream);
    case DType::kBFloat16: return launch_merge_t<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_merge_t<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_magnitude_threshold(const ThresholdParams& p, DType dtype, cudaStream_t stream) {
  if (p.K < 1 || p.K > kMergeMaxTasks) return cudaErrorInvalidValue;
  if (p.n == 0) {
    threshold_init_kernel<<<1, kMergeMaxTasks, 0, stream>>>(p);
    return cudaGetLastError();
  }
  switch (dtype) {
    case DType::kFloat32: return launch_threshold_t<float>(p, stream);
    case DType::kBFloat16: return launch_threshold_t<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_threshold_t<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mmt
