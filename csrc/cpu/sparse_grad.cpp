// Neuron-sparse weight gradient, CPU: acc[K, C] += a[:, rows].T @ b, fp32 accumulation.
// The K selected columns of a are gathered (N x K, a tenth of a at a 10% selection) and one BLAS GEMM runs
// into the accumulator in place: the dense [R, C] product is never formed.
#include <torch/library.h>
#include <torch/torch.h>

namespace mmt {
namespace {

void sparse_weight_grad_cpu(at::Tensor acc, const at::Tensor& a, const at::Tensor& rows, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "sparse_weight_grad_: a [N, R] and b [N, C]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "sparse_weight_grad_: rows must be int64 [K]");
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == rows.size(0) && acc.size(1) == b.size(1) && acc.is_contiguous(),
              "sparse_weight_grad_: acc must be contiguous [K, C]");
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "sparse_weight_grad_: acc must be fp32 or fp64");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sparse_weight_grad_: a and b must share a dtype");
  if (rows.numel() == 0 || a.size(0) == 0) return;
  const auto dt = acc.scalar_type();
  // fp32 inputs GEMM straight into acc; bf16/fp16 are widened first (the GEMM then accumulates in fp32)
  const at::Tensor as = a.index_select(1, rows).to(dt);
  acc.addmm_(as.t(), b.to(dt));
}

}  // namespace

TORCH_LIBRARY_IMPL(mmt, CPU, m) { m.impl("sparse_weight_grad_", &sparse_weight_grad_cpu); }

}  // namespace mmt
