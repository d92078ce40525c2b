// Family 1b, CUDA binding of sparse_weight_grad_: checks, device guard, stream; the kernel is in sparse_grad.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/bind_common.h"
#include "sparse_grad.h"
#include "sparse_grad_common.h"

namespace mmt {
namespace {

void sparse_weight_grad_cuda(at::Tensor acc, const at::Tensor& a, const at::Tensor& rows, const at::Tensor& b,
                             bool transposed) {
  const SparseWgradArgs s = check_sparse_weight_grad(acc, a, rows, b, transposed, at::kCUDA, /*allow_fp64=*/false);
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && rows.is_contiguous(),
              "sparse_weight_grad_: a, b and rows must be contiguous");
  if (s.K == 0 || s.C == 0 || s.N == 0) return;
  const c10::cuda::CUDAGuard guard(acc.device());
  const cuda::DType dtype = to_cuda_dtype(a.scalar_type(), "sparse_weight_grad_");
  const cudaError_t err =
      cuda::launch_sparse_weight_grad(acc.data_ptr<float>(), a.data_ptr(), rows.data_ptr<int64_t>(), b.data_ptr(),
                                      s.N, s.R, s.K, s.C, transposed, dtype, c10::cuda::getCurrentCUDAStream());
  check_launch(err, "sparse_weight_grad_");
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CUDA, m) { m.impl("sparse_weight_grad_", &mmt::sparse_weight_grad_cuda); }
