// Family 1, CPU: Taylor importance accumulator acc[j] += sum_t w[t] * |a[t,j] * g[t,j]|.
// Parallel over column blocks (each thread owns its columns: deterministic, no reduction across threads);
// rows are walked in order so each thread streams contiguous column slices. Sums are kept in double:
// thousands of tokens are added per column and fp32 sequential sums would drift.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "sparse_adamw_common.h"

namespace mmt {
namespace {

template <typename scalar_t>
void taylor_cpu_impl(float* acc, const scalar_t* act, const scalar_t* grad, const float* w, int64_t N, int64_t M) {
  constexpr int64_t kCols = 256;
  const int64_t blocks = (M + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> sum(kCols);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kCols, len = std::min(kCols, M - j0);
      std::fill(sum.begin(), sum.begin() + len, 0.0);
      for (int64_t t = 0; t < N; ++t) {
        const float wt = w[t];
        if (wt == 0.0f) continue;  // padding
        const scalar_t* ar = act + t * M + j0;
        const scalar_t* gr = grad + t * M + j0;
        for (int64_t j = 0; j < len; ++j) {
          sum[j] += static_cast<double>(wt * std::fabs(static_cast<float>(ar[j]) * static_cast<float>(gr[j])));
        }
      }
      for (int64_t j = 0; j < len; ++j) acc[j0 + j] = static_cast<float>(acc[j0 + j] + sum[j]);
    }
  });
}

void taylor_accumulate_cpu(at::Tensor acc, const at::Tensor& act, const at::Tensor& grad,
                           const at::Tensor& token_weight) {
  const TaylorArgs a = check_taylor(acc, act, grad, token_weight, at::kCPU);
  if (a.N == 0 || a.M == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "taylor_accumulate_cpu", [&] {
    taylor_cpu_impl<scalar_t>(acc.data_ptr<float>(), act.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                              token_weight.data_ptr<float>(), a.N, a.M);
  });
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CPU, m) { m.impl("taylor_accumulate_", &mmt::taylor_accumulate_cpu); }
