// Raw-pointer launchers for family 3 (compiled by nvcc without torch headers; see docs/kernels.md).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

#include "merge_hash.h"

namespace mmt {
namespace cuda {


constexpr int kMergeMaxTasks = 32;  // inputs travel by value in the kernel parameters (4 KiB limit)

struct MergeParams {
  const void* x[kMergeMaxTasks];  // K contiguous inputs of n elements, one dtype
  const void* base;               // or nullptr (task vectors; never read by linear)
  void* out;
  float weight[kMergeMaxTasks];
  float scale[kMergeMaxTasks];      // DARE: fp32(1 / p_k)
  uint32_t keep24[kMergeMaxTasks];  // DARE: keep iff (hash >> 8) < keep24
  uint32_t key[kMergeMaxTasks];     // DARE: merge::task_key(seed, k)
  const float* thresholds;          // TIES: [K] on device
  int64_t n;
  int K;
  int method;  // merge::Method
  float lam;
  bool sign_by_count;
};

cudaError_t launch_merge(const MergeParams& p, DType dtype, cudaStream_t stream);

struct ThresholdParams {
  const void* x[kMergeMaxTasks];
  const void* base;  // or nullptr
  int64_t ks[kMergeMaxTasks];
  int64_t n;
  int K;
  float* out;  // [K] fp32 on device
  // Workspace on device: hist [K * merge::kSelectBins] uint32, prefix [K] uint32, remaining [K] int64.
  uint32_t* hist;
  uint32_t* prefix;
  int64_t* remaining;
};

// Three histogram passes + on-device digit choice; no host synchronisation.
cudaError_t launch_magnitude_threshold(const ThresholdParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmt
