// Family 3: argument checks shared by the CPU kernels and the CUDA binding (torch headers; not for nvcc).
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <optional>
#include <string>

#include "merge_hash.h"

namespace mmt {

inline merge::Method parse_merge_method(c10::string_view name) {
  const std::string s(name.data(), name.size());
  if (s == "linear") return merge::kLinear;
  if (s == "task_arithmetic") return merge::kTaskArithmetic;
  if (s == "ties") return merge::kTies;
  if (s == "dare_linear") return merge::kDareLinear;
  if (s == "dare_ties") return merge::kDareTies;
  TORCH_CHECK(false, "merge: unknown method '", s, "'; expected linear, task_arithmetic, ties, dare_linear or dare_ties");
}

// Every tensor (and base) contiguous, same shape, dtype and device; fp32/bf16/fp16.
inline void check_merge_inputs(const char* op, at::TensorList tensors, const std::optional<at::Tensor>& base,
                               c10::DeviceType device) {
  TORCH_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  const at::Tensor& t0 = tensors[0];
  TORCH_CHECK(t0.device().type() == device, op, ": tensors[0] is on ", t0.device(), ", expected ", device);
  const auto dt = t0.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": tensors must be fp32, bf16 or fp16, got ", dt);
  TORCH_CHECK(t0.numel() < (int64_t(1) << 32), op, ": tensors of 2^32 or more elements are not supported (",
              t0.numel(), ")");
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.sizes() == t0.sizes(), op, ": tensors[", k, "] has shape ", t.sizes(), ", tensors[0] ", t0.sizes());
    TORCH_CHECK(t.scalar_type() == dt, op, ": tensors[", k, "] is ", t.scalar_type(), ", tensors[0] ", dt);
    TORCH_CHECK(t.device() == t0.device(), op, ": tensors[", k, "] is on ", t.device(), ", tensors[0] on ",
                t0.device());
    TORCH_CHECK(t.is_contiguous(), op, ": tensors[", k, "] must be contiguous");
  }
  if (base) {
    TORCH_CHECK(base->sizes() == t0.sizes(), op, ": base has shape ", base->sizes(), ", tensors ", t0.sizes());
    TORCH_CHECK(base->scalar_type() == dt, op, ": base is ", base->scalar_type(), ", tensors ", dt);
    TORCH_CHECK(base->device() == t0.device(), op, ": base is on ", base->device(), ", tensors on ", t0.device());
    TORCH_CHECK(base->is_contiguous(), op, ": base must be contiguous");
  }
}

struct MergeArgs {
  merge::Method method;
  int64_t K, n;
  bool has_base;  // linear never reads base
  bool ties_like, dare;
  std::vector<float> weights, scale;       // scale = fp32(1/p_k) for DARE (formed in double)
  std::vector<uint32_t> keep24, keys;      // DARE keep threshold and hash key per task
};

inline MergeArgs check_merge(at::TensorList tensors, const std::optional<at::Tensor>& base,
                             c10::ArrayRef<double> weights, const std::optional<at::Tensor>& thresholds,
                             c10::ArrayRef<double> densities, c10::string_view method, int64_t seed,
                             c10::DeviceType device) {
  check_merge_inputs("merge", tensors, base, device);
  MergeArgs a;
  a.method = parse_merge_method(method);
  a.K = static_cast<int64_t>(tensors.size());
  a.n = tensors[0].numel();
  a.has_base = base.has_value() && a.method != merge::kLinear;
  a.ties_like = a.method == merge::kTies || a.method == merge::kDareTies;
  a.dare = a.method == merge::kDareLinear || a.method == merge::kDareTies;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == a.K, "merge: ", weights.size(), " weights for ", a.K,
              " tensors");
  for (double w : weights) a.weights.push_back(static_cast<float>(w));
  if (a.method == merge::kTies) {
    TORCH_CHECK(thresholds.has_value(), "merge: method 'ties' needs thresholds (see merge_threshold)");
    TORCH_CHECK(thresholds->scalar_type() == at::kFloat && thresholds->numel() == a.K &&
                    thresholds->is_contiguous() && thresholds->device() == tensors[0].device(),
                "merge: thresholds must be contiguous fp32 [K=", a.K, "] on the tensors' device, got ",
                thresholds->scalar_type(), " ", thresholds->sizes(), " on ", thresholds->device());
  }
  if (a.dare) {
    TORCH_CHECK(static_cast<int64_t>(densities.size()) == a.K, "merge: ", densities.size(), " densities for ", a.K,
                " tensors");
    const uint32_t seed32 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
    for (int64_t k = 0; k < a.K; ++k) {
      const double p = densities[k];
      TORCH_CHECK(p > 0.0 && p <= 1.0, "merge: DARE density ", k, " must be in (0, 1], got ", p);
      a.scale.push_back(static_cast<float>(1.0 / p));
      a.keep24.push_back(static_cast<uint32_t>(std::min<double>(16777216.0, std::floor(p * 16777216.0))));
      a.keys.push_back(merge::task_key(seed32, static_cast<uint32_t>(k)));
    }
  }
  return a;
}

}  // namespace mmt
