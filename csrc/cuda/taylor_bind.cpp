// Family 1, CUDA binding of taylor_accumulate_: checks, workspace, stream; the kernels are in taylor.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/bind_common.h"
#include "sparse_adamw_common.h"
#include "taylor.h"

namespace mmt {
namespace {

void taylor_accumulate_cuda(at::Tensor acc, const at::Tensor& act, const at::Tensor& grad,
                            const at::Tensor& token_weight) {
  const TaylorArgs a = check_taylor(acc, act, grad, token_weight, at::kCUDA);
  if (a.N == 0 || a.M == 0) return;
  const c10::cuda::CUDAGuard guard(act.device());
  const cuda::DType dtype = to_cuda_dtype(act.scalar_type(), "taylor_accumulate_");
  const int64_t chunks = cuda::taylor_chunks(a.N, a.M);
  at::Tensor workspace;
  if (chunks > 1) workspace = at::empty({chunks, a.M}, acc.options());
  const cudaError_t err = cuda::launch_taylor_accumulate(
      acc.data_ptr<float>(), act.data_ptr(), grad.data_ptr(), token_weight.data_ptr<float>(), a.N, a.M, dtype,
      chunks > 1 ? workspace.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream());
  check_launch(err, "taylor_accumulate_");
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CUDA, m) { m.impl("taylor_accumulate_", &mmt::taylor_accumulate_cuda); }
