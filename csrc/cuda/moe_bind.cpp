// Family 2, CUDA binding: checks, stream lookup, workspace and dtype mapping; kernels are in moe.cu.
// The grouped expert MLP and the FFT features have no CUDA C++ kernel: Triton runs them on GPUs.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cuda/bind_common.h"
#include "moe.h"
#include "moe_common.h"

namespace mmt {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> moe_permute_cuda(const Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK(expert_ids.is_cuda() && expert_ids.scalar_type() == at::kLong, "moe_permute: expert_ids must be a CUDA "
              "int64 tensor, got ", expert_ids.scalar_type(), " on ", expert_ids.device());
  TORCH_CHECK(num_experts >= 1 && num_experts <= 12288, "moe_permute: num_experts must be in [1, 12288], got ",
              num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const Tensor ids = expert_ids.contiguous();
  const int64_t n = ids.numel();
  const auto opts = ids.options();
  Tensor perm = at::empty({n}, opts), inv = at::empty({n}, opts), offsets = at::empty({num_experts + 1}, opts);
  Tensor workspace = at::empty({std::max<int64_t>(cuda::moe_permute_chunks(n), 1) * num_experts},
                               opts.dtype(at::kInt));
  check_launch(cuda::launch_moe_permute(ids.data_ptr<int64_t>(), n, num_experts, workspace.data_ptr<int32_t>(),
                                        perm.data_ptr<int64_t>(), inv.data_ptr<int64_t>(),
                                        offsets.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               "moe_permute");
  return {perm, inv, offsets};
}

Tensor moe_dispatch_cuda(const Tensor& x, const Tensor& perm, const std::optional<Tensor>& scale, int64_t k) {
  moe::check_rows(x, "moe_dispatch", "x");
  moe::check_index(perm, x, "moe_dispatch", "perm");
  TORCH_CHECK(x.is_cuda() && k >= 1 && perm.numel() == x.size(0) * k, "moe_dispatch: perm must have T*k=",
              x.size(0) * k, " entries on a CUDA device");
  moe::check_slot_weights(scale, perm.numel(), x, "moe_dispatch");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({perm.numel(), x.size(1)}, x.options());
  check_launch(cuda::launch_moe_dispatch(x.data_ptr(), perm.data_ptr<int64_t>(),
                                         scale ? scale->data_ptr<float>() : nullptr, out.data_ptr(), perm.numel(),
                                         x.size(1), k, to_cuda_dtype(x.scalar_type(), "mmt moe"),
                                         c10::cuda::getCurrentCUDAStream()),
               "moe_dispatch");
  return out;
}

Tensor moe_combine_cuda(const Tensor& yp, const Tensor& inv, const std::optional<Tensor>& weights, int64_t k) {
  moe::check_rows(yp, "moe_combine", "yp");
  moe::check_index(inv, yp, "moe_combine", "inv");
  TORCH_CHECK(yp.is_cuda() && k >= 1 && inv.numel() == yp.size(0) && inv.numel() % k == 0,
              "moe_combine: inv must have one entry per row of yp (", yp.size(0), ") and a multiple of k=", k);
  moe::check_slot_weights(weights, inv.numel(), yp, "moe_combine");
  const c10::cuda::CUDAGuard guard(yp.device());
  const int64_t T = inv.numel() / k;
  Tensor out = at::empty({T, yp.size(1)}, yp.options());
  check_launch(cuda::launch_moe_combine(yp.data_ptr(), inv.data_ptr<int64_t>(),
                                        weights ? weights->data_ptr<float>() : nullptr, out.data_ptr(), T, yp.size(1),
                                        k, to_cuda_dtype(yp.scalar_type(), "mmt moe"), c10::cuda::getCurrentCUDAStream()),
               "moe_combine");
  return out;
}

Tensor moe_combine_weight_grad_cuda(const Tensor& dout, const Tensor& yp, const Tensor& inv, int64_t k) {
  moe::check_rows(dout, "moe_combine_weight_grad", "dout");
  moe::check_rows(yp, "moe_combine_weight_grad", "yp");
  moe::check_index(inv, yp, "moe_combine_weight_grad", "inv");
  TORCH_CHECK(yp.is_cuda() && k >= 1 && inv.numel() == dout.size(0) * k && yp.size(0) == inv.numel() &&
                  yp.size(1) == dout.size(1) && yp.scalar_type() == dout.scalar_type(),
              "moe_combine_weight_grad: expected dout [T, d], yp [T*k, d] of one dtype and inv [T*k]");
  const c10::cuda::CUDAGuard guard(yp.device());
  Tensor out = at::empty({inv.numel()}, yp.options().dtype(at::kFloat));
  check_launch(cuda::launch_moe_combine_weight_grad(dout.data_ptr(), yp.data_ptr(), inv.data_ptr<int64_t>(),
                                                    out.data_ptr<float>(), inv.numel(), yp.size(1), k,
                                                    to_cuda_dtype(yp.scalar_type(), "mmt moe"),
                                                    c10::cuda::getCurrentCUDAStream()),
               "moe_combine_weight_grad");
  return out;
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CUDA, m) {
  m.impl("moe_permute", &mmt::moe_permute_cuda);
  m.impl("moe_dispatch", &mmt::moe_dispatch_cuda);
  m.impl("moe_combine", &mmt::moe_combine_cuda);
  m.impl("moe_combine_weight_grad", &mmt::moe_combine_weight_grad_cuda);
}
