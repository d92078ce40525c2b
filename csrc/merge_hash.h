// Family 3: the pieces every merge backend must compute identically, with no torch or CUDA headers
// (included by cpu/merge.cpp, cuda/merge.cu; mirrored in mmt_kernels/reference/merge.py and triton/merge.py).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define MMT_HD __host__ __device__ __forceinline__
#else
#define MMT_HD inline
#endif

namespace mmt {
namespace merge {

enum Method : int { kLinear = 0, kTaskArithmetic = 1, kTies = 2, kDareLinear = 3, kDareTies = 4 };

// MurmurHash3's 32-bit finaliser: a bijection with good avalanche, cheap on every backend.
MMT_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

MMT_HD uint32_t task_key(uint32_t seed, uint32_t task) { return fmix32(fmix32(task + 0x9E3779B9u) ^ seed); }

// Counter-based DARE draw: depends only on (seed, task, element index), never on tiling or thread count.
MMT_HD bool dare_keep(uint32_t key, uint32_t index, uint32_t keep_threshold24) {
  uint32_t h = fmix32(index ^ key);
  h = fmix32(h + key);
  return (h >> 8) < keep_threshold24;
}

// Radix select over the bit patterns of non-negative floats (monotone as uint32): three digit passes.
constexpr int kSelectPasses = 3;
constexpr int kSelectBins = 2048;  // bins of the widest digit (bits 30..20; bit 31 is 0 for |x|)
MMT_HD int select_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
MMT_HD uint32_t select_digit_mask(int pass) { return pass == 0 ? 0x7FFu : 0x3FFu; }

}  // namespace merge
}  // namespace mmt
