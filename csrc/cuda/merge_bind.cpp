// Family 3, CUDA binding: checks, workspace, stream lookup and dtype mapping; kernels are in merge.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/bind_common.h"
#include "merge.h"
#include "merge_common.h"

namespace mmt {
namespace {

at::Tensor merge_threshold_cuda(at::TensorList tensors, const std::optional<at::Tensor>& base, at::IntArrayRef ks) {
  check_merge_inputs("merge_threshold", tensors, base, at::kCUDA);
  const int64_t K = static_cast<int64_t>(tensors.size()), n = tensors[0].numel();
  TORCH_CHECK(K <= cuda::kMergeMaxTasks, "merge_threshold: the CUDA kernel takes at most ", cuda::kMergeMaxTasks,
              " tensors per call, got ", K);
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == K, "merge_threshold: ", ks.size(), " ks for ", K, " tensors");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto opts = tensors[0].options();
  at::Tensor out = at::empty({K}, opts.dtype(at::kFloat));
  // uint32 workspace held in int32 tensors (same size); remaining counts in int64.
  at::Tensor hist = at::empty({K * merge::kSelectBins}, opts.dtype(at::kInt));
  at::Tensor prefix = at::empty({K}, opts.dtype(at::kInt));
  at::Tensor remaining = at::empty({K}, opts.dtype(at::kLong));
  cuda::ThresholdParams p{};
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ks[k] >= 0 && ks[k] <= n, "merge_threshold: ks[", k, "]=", ks[k], " outside [0, ", n, "]");
    p.x[k] = tensors[k].data_ptr();
    p.ks[k] = ks[k];
  }
  p.base = base ? base->data_ptr() : nullptr;
  p.n = n;
  p.K = static_cast<int>(K);
  p.out = out.data_ptr<float>();
  p.hist = reinterpret_cast<uint32_t*>(hist.data_ptr<int32_t>());
  p.prefix = reinterpret_cast<uint32_t*>(prefix.data_ptr<int32_t>());
  p.remaining = remaining.data_ptr<int64_t>();
  const cudaError_t err = cuda::launch_magnitude_threshold(p, to_cuda_dtype(tensors[0].scalar_type(), "mmt merge"),
                                                           c10::cuda::getCurrentCUDAStream());
  check_launch(err, "merge_threshold");
  return out;
}

at::Tensor merge_cuda(at::TensorList tensors, const std::optional<at::Tensor>& base, at::ArrayRef<double> weights,
                      const std::optional<at::Tensor>& thresholds, at::ArrayRef<double> densities,
                      c10::string_view method, double lam, int64_t seed, bool sign_by_count) {
  MergeArgs a = check_merge(tensors, base, weights, thresholds, densities, method, seed, at::kCUDA);
  TORCH_CHECK(a.K <= cuda::kMergeMaxTasks, "merge: the CUDA kernel takes at most ", cuda::kMergeMaxTasks,
              " tensors per call, got ", a.K);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor out = at::empty_like(tensors[0], at::MemoryFormat::Contiguous);
  if (a.n == 0) return out;
  cuda::MergeParams p{};
  for (int64_t k = 0; k < a.K; ++k) {
    p.x[k] = tensors[k].data_ptr();
    p.weight[k] = a.weights[k];
    if (a.dare) {
      p.scale[k] = a.scale[k];
      p.keep24[k] = a.keep24[k];
      p.key[k] = a.keys[k];
    }
  }
  p.base = a.has_base ? base->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.thresholds = a.method == merge::kTies ? thresholds->data_ptr<float>() : nullptr;
  p.n = a.n;
  p.K = static_cast<int>(a.K);
  p.method = static_cast<int>(a.method);
  p.lam = static_cast<float>(lam);
  p.sign_by_count = sign_by_count;
  const cudaError_t err = cuda::launch_merge(p, to_cuda_dtype(tensors[0].scalar_type(), "mmt merge"),
                                             c10::cuda::getCurrentCUDAStream());
  check_launch(err, "merge");
  return out;
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CUDA, m) {
  m.impl("merge_threshold", &mmt::merge_threshold_cuda);
  m.impl("merge", &mmt::merge_cuda);
}
