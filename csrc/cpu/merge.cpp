// Family 3, CPU: batched weight merging. `merge_threshold` finds each task's TIES magnitude threshold
// exactly (a sampled bracket and one counting pass, radix select when the bracket misses); `merge` reads the
// K inputs once per element in blocks, accumulating in fp32 in task order (the reference's order, so
// results match it exactly in fp32). The loops live in merge_loops.h, compiled twice: for the baseline ISA
// and for AVX2 (chosen at run time; MMT_CPU_ISA=baseline forces the former). No FMA in either: a fused
// multiply-add rounds once where the reference rounds twice.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <vector>

#include "merge_common.h"

namespace mmt {
namespace {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// `c ? a : +0.0f` and `c ? a : b` as bit masks, the same bits as the ternaries. Under GCC's default
// -ftrapping-math a float compare feeding ?: is not if-converted, so a loop holding one does not vectorise
// (measured: the merge loop ran scalar, ~5 ns per element and task).
inline float keep_if(bool c, float a) { return bits_float(float_bits(a) & (0u - static_cast<uint32_t>(c))); }
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
}

// Conversions written branch-free so that loops around them vectorise; the same values as c10's.
inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return bits_float(static_cast<uint32_t>(v.x) << 16); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

template <typename T>
T from_f32(float v);
template <>
inline float from_f32<float>(float v) {
  return v;
}
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  // c10's round-to-nearest-even, with its NaN (0x7FC0) as an integer select (see keep_if) instead of a branch.
  const uint32_t u = float_bits(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : r), c10::BFloat16::from_bits());
}
template <>
inline c10::Half from_f32<c10::Half>(float v) {
  return c10::Half(v);
}

namespace isa_baseline {
#include "merge_loops.h"
}  // namespace isa_baseline

#if defined(__x86_64__) && defined(__GNUC__)
#define MMT_MERGE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")  // not fma (see above)
namespace isa_avx2 {
#include "merge_loops.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef MMT_MERGE_AVX2
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  const char* force = std::getenv("MMT_CPU_ISA");
  return cpu_has && !(force && std::strcmp(force, "baseline") == 0);
#else
  return false;
#endif
}

at::Tensor merge_threshold_cpu(at::TensorList tensors, const std::optional<at::Tensor>& base, at::IntArrayRef ks) {
  check_merge_inputs("merge_threshold", tensors, base, at::kCPU);
  const int64_t K = static_cast<int64_t>(tensors.size()), n = tensors[0].numel();
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == K, "merge_threshold: ", ks.size(), " ks for ", K, " tensors");
  at::Tensor out = at::empty({K}, tensors[0].options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const bool avx2 = use_avx2();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ks[k] >= 0 && ks[k] <= n, "merge_threshold: ks[", k, "]=", ks[k], " outside [0, ", n, "]");
    if (ks[k] == 0) {
      o[k] = std::numeric_limits<float>::infinity();
      continue;
    }
    auto run = [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* x = tensors[k].data_ptr<scalar_t>();
      const scalar_t* b = base ? base->data_ptr<scalar_t>() : nullptr;
#ifdef MMT_MERGE_AVX2
      if (avx2) return isa_avx2::kth_largest_magnitude<scalar_t>(x, b, n, ks[k]);
#endif
      return isa_baseline::kth_largest_magnitude<scalar_t>(x, b, n, ks[k]);
    };
    switch (tensors[0].scalar_type()) {
      case at::kFloat: o[k] = run(float{}); break;
      case at::kBFloat16: o[k] = run(c10::BFloat16{}); break;
      default: o[k] = run(c10::Half{}); break;  // check_merge_inputs admits fp32, bf16 and fp16 only
    }
  }
  return out;
}

at::Tensor merge_cpu(at::TensorList tensors, const std::optional<at::Tensor>& base, at::ArrayRef<double> weights,
                     const std::optional<at::Tensor>& thresholds, at::ArrayRef<double> densities,
                     c10::string_view method, double lam, int64_t seed, bool sign_by_count) {
  MergeArgs a = check_merge(tensors, base, weights, thresholds, densities, method, seed, at::kCPU);
  at::Tensor out = at::empty_like(tensors[0], at::MemoryFormat::Contiguous);
  if (a.n == 0) return out;
  const float* thr = a.method == merge::kTies ? thresholds->data_ptr<float>() : nullptr;
  const bool avx2 = use_avx2();
  // fp32 / bf16 / fp16 only (check_merge rejects the rest), to keep the instantiations few.
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<const scalar_t*> xs;
    for (const auto& t : tensors) xs.push_back(t.data_ptr<scalar_t>());
    const scalar_t* b = a.has_base ? base->data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
#ifdef MMT_MERGE_AVX2
    if (avx2) return isa_avx2::merge_all<scalar_t>(a, xs.data(), b, o, thr, static_cast<float>(lam), sign_by_count);
#endif
    isa_baseline::merge_all<scalar_t>(a, xs.data(), b, o, thr, static_cast<float>(lam), sign_by_count);
  };
  switch (tensors[0].scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "merge: unsupported dtype ", tensors[0].scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CPU, m) {
  m.impl("merge_threshold", &mmt::merge_threshold_cpu);
  m.impl("merge", &mmt::merge_cpu);
}
