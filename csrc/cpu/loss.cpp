// Fused linear + cross-entropy, CPU: the row-wise softmax work on a chunk of logits (fp32/bf16/fp16 in).
// Each row is read twice for the log-sum-exp (max, then sum of exp) and read + written once for the gradient.
// exp is a short polynomial the compiler vectorises (std::exp does not vectorise without -ffast-math); the loops
// are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (target_clones).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mmt {
namespace {

// exp(x) for x <= 88.7 to ~2 ulp: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2]; x below -87.3 flushes to 0.
// Branch-free so that GCC vectorises the loops that call it: clamping with min/max, rounding to the nearest
// integer with the 1.5 * 2^23 trick (std::floor is a libm call or a control-flow path without SSE4.1 and
// -ffast-math, and either stopped the vectoriser: the loops below ran one float at a time until 2026-12).
inline float vexp(float x) {
  const float lo = -87.3f, hi = 88.7f;
  const float xc = std::min(std::max(x, lo), hi);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale * static_cast<float>(x >= lo);  // a multiply, not a select: AVX2 vectorises it too
}

inline float vtanh(float y) { return 1.0f - 2.0f / (vexp(2.0f * y) + 1.0f); }

template <typename T>
inline float capped(T v, float cap) {
  const float x = static_cast<float>(v);
  return cap > 0.0f ? cap * vtanh(x / cap) : x;
}

// The row loops are written once per case (capped or not) with the cap test outside: a test inside the loop
// body is control flow the vectoriser refuses.
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
float row_max(const T* z, int64_t V, float cap) {
  float m = -INFINITY;
  if (cap > 0.0f) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) m = std::max(m, cap * vtanh(static_cast<float>(z[j]) / cap));
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<float>(z[j]));
  }
  return m;
}

// sum_j exp(z_j - m): fp32 lanes over blocks of 2048 entries, blocks added in double (an fp32 running sum over
// a 262k vocabulary drifts by many ulps; 2048 terms spread over the vector lanes do not).
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
double row_sumexp(const T* z, int64_t V, float m, float cap) {
  double s = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += 2048) {
    const int64_t j1 = std::min(V, j0 + 2048);
    float b = 0.0f;
    if (cap > 0.0f) {
#pragma omp simd reduction(+ : b)
      for (int64_t j = j0; j < j1; ++j) b += vexp(cap * vtanh(static_cast<float>(z[j]) / cap) - m);
    } else {
#pragma omp simd reduction(+ : b)
      for (int64_t j = j0; j < j1; ++j) b += vexp(static_cast<float>(z[j]) - m);
    }
    s += static_cast<double>(b);
  }
  return s;
}

template <typename T>
float row_lse(const T* z, int64_t V, float cap) {
  const float m = row_max(z, V, cap);
  if (m == -INFINITY) return m;
  return m + static_cast<float>(std::log(row_sumexp(z, V, m, cap)));
}

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void row_grad(T* z, int64_t V, float lse, float scale, float cap) {
  if (cap > 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float th = vtanh(static_cast<float>(z[j]) / cap);
      z[j] = static_cast<T>(scale * vexp(cap * th - lse) * (1.0f - th * th));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) z[j] = static_cast<T>(scale * vexp(static_cast<float>(z[j]) - lse));
  }
}

void check_rows(const char* name, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, name, ": logits must be [N, V] with V >= 1");
  TORCH_CHECK(logits.is_contiguous(), name, ": logits must be contiguous");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              name, ": logits dtype must be fp32, bf16 or fp16, got ", logits.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == logits.size(0) &&
                  target.is_contiguous(),
              name, ": target must be contiguous int64 [N]");
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_lse_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double softcap) {
  check_rows("cross_entropy_lse", logits, target);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto loss = at::empty({N}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  const float cap = static_cast<float>(softcap);
  const int64_t* t = target.data_ptr<int64_t>();
  float* lo = loss.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_lse", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (t[r] == ignore_index) {
          lo[r] = ls[r] = 0.0f;
          continue;
        }
        TORCH_CHECK(t[r] >= 0 && t[r] < V, "cross_entropy_lse: target ", t[r], " at row ", r, " is outside [0, ",
                    V, ")");
        const float l = row_lse(z + r * V, V, cap);
        ls[r] = l;
        lo[r] = l - capped(z[r * V + t[r]], cap);
      }
    });
  });
  return {loss, lse};
}

void cross_entropy_grad_cpu(at::Tensor logits, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& grad_loss, int64_t ignore_index, double softcap) {
  check_rows("cross_entropy_grad_", logits, target);
  const int64_t N = logits.size(0), V = logits.size(1);
  for (const auto* t : {&lse, &grad_loss}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == N && t->is_contiguous(),
                "cross_entropy_grad_: lse and grad_loss must be contiguous fp32 [N]");
  }
  const float cap = static_cast<float>(softcap);
  const int64_t* t = target.data_ptr<int64_t>();
  const float* ls = lse.data_ptr<float>();
  const float* gl = grad_loss.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_grad_", [&] {
    scalar_t* z = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = z + r * V;
        if (t[r] == ignore_index) {
          std::fill(row, row + V, static_cast<scalar_t>(0.0f));
          continue;
        }
        TORCH_CHECK(t[r] >= 0 && t[r] < V, "cross_entropy_grad_: target ", t[r], " at row ", r,
                    " is outside [0, ", V, ")");
        // the target's entry, read before the row is overwritten: d/dz of -z[t] adds -1 (through the cap)
        const float xt = static_cast<float>(row[t[r]]);
        row_grad(row, V, ls[r], gl[r], cap);
        float dcap = 1.0f;
        if (cap > 0.0f) {
          const float th = vtanh(xt / cap);
          dcap = 1.0f - th * th;
        }
        const float zt = cap > 0.0f ? cap * vtanh(xt / cap) : xt;
        row[t[r]] = static_cast<scalar_t>(gl[r] * (vexp(zt - ls[r]) - 1.0f) * dcap);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmt, CPU, m) {
  m.impl("cross_entropy_lse", &cross_entropy_lse_cpu);
  m.impl("cross_entropy_grad_", &cross_entropy_grad_cpu);
}

}  // namespace mmt
