// Family 3, CPU: batched weight merging. `merge_threshold` finds each task's TIES magnitude threshold by
// radix select (three histogram passes over the fp32 bit patterns of |x - base|, no sort); `merge` reads
// the K inputs once per element in blocks of kBlock, accumulating in fp32 in task order (the reference's
// order, so results match it exactly in fp32).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "merge_common.h"

namespace mmt {
namespace {

using merge::kSelectBins;

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

// k-th largest |x - b| (|x| when b is null) as fp32; k >= 1.
template <typename scalar_t>
float kth_largest_magnitude(const scalar_t* x, const scalar_t* b, int64_t n, int64_t k) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<uint32_t> hist(static_cast<size_t>(chunks) * kSelectBins);
  uint32_t prefix = 0;  // bits fixed by earlier passes
  int64_t remaining = k;
  for (int pass = 0; pass < merge::kSelectPasses; ++pass) {
    const int shift = merge::select_shift(pass);
    const uint32_t dmask = merge::select_digit_mask(pass);
    const int fixed_shift = pass == 0 ? 32 : merge::select_shift(pass - 1);  // higher bits must equal prefix
    std::fill(hist.begin(), hist.end(), 0u);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        uint32_t* h = hist.data() + c * kSelectBins;
        const int64_t e = std::min(n, (c + 1) * kChunk);
        for (int64_t i = c * kChunk; i < e; ++i) {
          const float v = b ? static_cast<float>(x[i]) - static_cast<float>(b[i]) : static_cast<float>(x[i]);
          const uint32_t u = float_bits(std::fabs(v));
          if (fixed_shift == 32 || (u >> fixed_shift) == (prefix >> fixed_shift)) ++h[(u >> shift) & dmask];
        }
      }
    });
    // Walk the digit's bins from the top until `remaining` elements are covered.
    int64_t cum = 0;
    for (int d = static_cast<int>(dmask); d >= 0; --d) {
      int64_t cnt = 0;
      for (int64_t c = 0; c < chunks; ++c) cnt += hist[c * kSelectBins + d];
      if (cum + cnt >= remaining) {
        prefix |= static_cast<uint32_t>(d) << shift;
        remaining -= cum;
        break;
      }
      cum += cnt;
    }
  }
  return bits_float(prefix);
}

at::Tensor merge_threshold_cpu(at::TensorList tensors, const std::optional<at::Tensor>& base, at::IntArrayRef ks) {
  check_merge_inputs("merge_threshold", tensors, base, at::kCPU);
  const int64_t K = static_cast<int64_t>(tensors.size()), n = tensors[0].numel();
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == K, "merge_threshold: ", ks.size(), " ks for ", K, " tensors");
  at::Tensor out = at::empty({K}, tensors[0].options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ks[k] >= 0 && ks[k] <= n, "merge_threshold: ks[", k, "]=", ks[k], " outside [0, ", n, "]");
    if (ks[k] == 0) {
      o[k] = std::numeric_limits<float>::infinity();
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensors[0].scalar_type(), "merge_threshold_cpu", [&] {
      o[k] = kth_largest_magnitude<scalar_t>(tensors[k].data_ptr<scalar_t>(),
                                             base ? base->data_ptr<scalar_t>() : nullptr, n, ks[k]);
    });
  }
  return out;
}

constexpr int64_t kBlock = 512;

// Accumulators of one block; every task adds its contribution in task order (the reference's order).
struct Acc {
  float bval[kBlock], tot[kBlock], pos[kBlock], neg[kBlock], cpos[kBlock], cneg[kBlock], vote[kBlock];
};

// One task's pass over a block. METHOD/FIRST/HAS_BASE are compile-time so the loop has no branches on
// them and vectorises; FIRST assigns instead of adding (the reference starts from its first term, which
// keeps -0.0 and makes linear of one model bit-exact).
template <typename scalar_t, int METHOD, bool FIRST, bool HAS_BASE, bool COUNT>
void accumulate(Acc& acc, const scalar_t* __restrict__ x, int64_t len, int64_t start, float w, float th, float sc,
                uint32_t key, uint32_t keep24) {
  constexpr bool kTiesLike = METHOD == merge::kTies || METHOD == merge::kDareTies;
  constexpr bool kDare = METHOD == merge::kDareLinear || METHOD == merge::kDareTies;
  // restrict: without it the compiler must assume x aliases the accumulators and does not vectorise.
  const float* __restrict__ bval = acc.bval;
  float* __restrict__ tot = acc.tot;
  float* __restrict__ vote = acc.vote;
  float* __restrict__ pos = acc.pos;
  float* __restrict__ neg = acc.neg;
  float* __restrict__ cpos = acc.cpos;
  float* __restrict__ cneg = acc.cneg;
  for (int64_t i = 0; i < len; ++i) {
    float t = static_cast<float>(x[i]);
    if constexpr (METHOD != merge::kLinear && HAS_BASE) t -= bval[i];
    if constexpr (METHOD == merge::kTies) t = std::fabs(t) >= th ? t : 0.0f;
    if constexpr (kDare) t = merge::dare_keep(key, static_cast<uint32_t>(start + i), keep24) ? t * sc : 0.0f;
    if constexpr (!kTiesLike) {
      const float term = w * t;
      tot[i] = FIRST ? term : tot[i] + term;
    } else {
      const float v = COUNT ? static_cast<float>((t > 0.0f) - (t < 0.0f)) : t;
      const float wt = w * t;
      const float p = t > 0.0f ? wt : 0.0f, q = t < 0.0f ? wt : 0.0f;
      const float cp = t > 0.0f ? 1.0f : 0.0f, cq = t < 0.0f ? 1.0f : 0.0f;
      vote[i] = FIRST ? v : vote[i] + v;
      pos[i] = FIRST ? p : pos[i] + p;
      neg[i] = FIRST ? q : neg[i] + q;
      cpos[i] = FIRST ? cp : cpos[i] + cp;
      cneg[i] = FIRST ? cq : cneg[i] + cq;
    }
  }
}

template <typename scalar_t, int METHOD, bool HAS_BASE, bool COUNT>
void merge_cpu_impl(const MergeArgs& a, const std::vector<const scalar_t*>& xs, const scalar_t* base, scalar_t* out,
                    const float* thr, float lam) {
  constexpr bool kTiesLike = METHOD == merge::kTies || METHOD == merge::kDareTies;
  constexpr bool kDare = METHOD == merge::kDareLinear || METHOD == merge::kDareTies;
  at::parallel_for(0, (a.n + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
    Acc acc;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t start = blk * kBlock;
      const int64_t len = std::min(kBlock, a.n - start);
      if constexpr (HAS_BASE && METHOD != merge::kLinear) {
        for (int64_t i = 0; i < len; ++i) acc.bval[i] = static_cast<float>(base[start + i]);
      }
      for (int64_t k = 0; k < a.K; ++k) {
        const float th = METHOD == merge::kTies ? thr[k] : 0.0f;
        const float sc = kDare ? a.scale[k] : 1.0f;
        const uint32_t key = kDare ? a.keys[k] : 0u, keep24 = kDare ? a.keep24[k] : 0u;
        if (k == 0) {
          accumulate<scalar_t, METHOD, true, HAS_BASE, COUNT>(acc, xs[k] + start, len, start, a.weights[k], th, sc,
                                                              key, keep24);
        } else {
          accumulate<scalar_t, METHOD, false, HAS_BASE, COUNT>(acc, xs[k] + start, len, start, a.weights[k], th, sc,
                                                               key, keep24);
        }
      }
      for (int64_t i = 0; i < len; ++i) {
        float r;
        if constexpr (METHOD == merge::kLinear) {
          r = acc.tot[i];
        } else {
          float m;
          if constexpr (kTiesLike) {
            m = acc.vote[i] >= 0.0f ? acc.pos[i] / std::max(acc.cpos[i], 1.0f)
                                    : acc.neg[i] / std::max(acc.cneg[i], 1.0f);
          } else {
            m = acc.tot[i];
          }
          r = HAS_BASE ? acc.bval[i] + lam * m : lam * m;
        }
        out[start + i] = static_cast<scalar_t>(r);
      }
    }
  });
}

template <typename scalar_t, int METHOD>
void merge_dispatch_flags(const MergeArgs& a, const std::vector<const scalar_t*>& xs, const scalar_t* base,
                          scalar_t* out, const float* thr, float lam, bool count) {
  if (a.has_base) {
    count ? merge_cpu_impl<scalar_t, METHOD, true, true>(a, xs, base, out, thr, lam)
          : merge_cpu_impl<scalar_t, METHOD, true, false>(a, xs, base, out, thr, lam);
  } else {
    count ? merge_cpu_impl<scalar_t, METHOD, false, true>(a, xs, base, out, thr, lam)
          : merge_cpu_impl<scalar_t, METHOD, false, false>(a, xs, base, out, thr, lam);
  }
}

template <typename scalar_t>
void merge_dispatch(const MergeArgs& a, const std::vector<const scalar_t*>& xs, const scalar_t* base, scalar_t* out,
                    const float* thr, float lam, bool count) {
  switch (a.method) {
    case merge::kLinear: return merge_dispatch_flags<scalar_t, merge::kLinear>(a, xs, base, out, thr, lam, count);
    case merge::kTaskArithmetic:
      return merge_dispatch_flags<scalar_t, merge::kTaskArithmetic>(a, xs, base, out, thr, lam, count);
    case merge::kTies: return merge_dispatch_flags<scalar_t, merge::kTies>(a, xs, base, out, thr, lam, count);
    case merge::kDareLinear:
      return merge_dispatch_flags<scalar_t, merge::kDareLinear>(a, xs, base, out, thr, lam, count);
    case merge::kDareTies: return merge_dispatch_flags<scalar_t, merge::kDareTies>(a, xs, base, out, thr, lam, count);
  }
}

at::Tensor merge_cpu(at::TensorList tensors, const std::optional<at::Tensor>& base, at::ArrayRef<double> weights,
                     const std::optional<at::Tensor>& thresholds, at::ArrayRef<double> densities,
                     c10::string_view method, double lam, int64_t seed, bool sign_by_count) {
  MergeArgs a = check_merge(tensors, base, weights, thresholds, densities, method, seed, at::kCPU);
  at::Tensor out = at::empty_like(tensors[0], at::MemoryFormat::Contiguous);
  if (a.n == 0) return out;
  const float* thr = a.method == merge::kTies ? thresholds->data_ptr<float>() : nullptr;
  // fp32 / bf16 / fp16 only (check_merge rejects the rest), to keep the instantiations few.
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<const scalar_t*> xs;
    for (const auto& t : tensors) xs.push_back(t.data_ptr<scalar_t>());
    merge_dispatch<scalar_t>(a, xs, a.has_base ? base->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                             thr, static_cast<float>(lam), sign_by_count);
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
