// Neuron-sparse weight gradient, CPU: acc[K, C] += a[:, rows].T @ b (or acc[C, K] += b.T @ a[:, rows]
// when transposed), fp32 accumulation.
// The K selected columns of a are gathered (N x K, a tenth of a at a 10% selection) and one BLAS GEMM runs
// into the accumulator in place: the dense [R, C] product is never formed.
#include <torch/library.h>
#include <torch/torch.h>

#include "sparse_grad_common.h"

namespace mmt {
namespace {

void sparse_weight_grad_cpu(at::Tensor acc, const at::Tensor& a, const at::Tensor& rows, const at::Tensor& b,
                            bool transposed) {
  check_sparse_weight_grad(acc, a, rows, b, transposed, at::kCPU, /*allow_fp64=*/true);
  if (rows.numel() == 0 || a.size(0) == 0) return;
  const auto dt = acc.scalar_type();
  // fp32 inputs GEMM straight into acc; bf16/fp16 are widened first (the GEMM then accumulates in fp32)
  const at::Tensor as = a.index_select(1, rows).to(dt);
  if (transposed) {
    acc.addmm_(b.to(dt).t(), as);
  } else {
    acc.addmm_(as.t(), b.to(dt));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mmt, CPU, m) { m.impl("sparse_weight_grad_", &sparse_weight_grad_cpu); }

}  // namespace mmt
