// Argument checks of sparse_weight_grad_ shared by its CPU and CUDA bindings.
#pragma once
#include <torch/torch.h>

namespace mmt {

struct SparseWgradArgs {
  int64_t N, R, K, C;  // tokens, neurons of a, selected neurons, columns of b
};

// acc [K, C] += a[:, rows].T @ b with a [N, R], b [N, C] of one dtype; acc fp32 (fp64 where `allow_fp64`).
// transposed: acc [C, K] += b.T @ a[:, rows].
inline SparseWgradArgs check_sparse_weight_grad(const at::Tensor& acc, const at::Tensor& a, const at::Tensor& rows,
                                                const at::Tensor& b, bool transposed, c10::DeviceType device,
                                                bool allow_fp64) {
  TORCH_CHECK(acc.device().type() == device, "sparse_weight_grad_: acc is on ", acc.device(), ", expected ", device);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "sparse_weight_grad_: a [N, R] and b [N, C]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "sparse_weight_grad_: rows must be int64 [K]");
  const int64_t d0 = transposed ? b.size(1) : rows.size(0), d1 = transposed ? rows.size(0) : b.size(1);
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == d0 && acc.size(1) == d1 && acc.is_contiguous(),
              "sparse_weight_grad_: acc must be contiguous ", transposed ? "[C, K]" : "[K, C]", " = [", d0, ", ", d1,
              "], got ", acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || (allow_fp64 && acc.scalar_type() == at::kDouble),
              "sparse_weight_grad_: acc must be fp32", allow_fp64 ? " or fp64" : "", ", got ", acc.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sparse_weight_grad_: a and b must share a dtype");
  TORCH_CHECK(a.device() == acc.device() && b.device() == acc.device() && rows.device() == acc.device(),
              "sparse_weight_grad_: all tensors must be on ", acc.device());
  return {a.size(0), a.size(1), rows.size(0), b.size(1)};
}

}  // namespace mmt
