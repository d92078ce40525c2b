// Family 2, CPU: FFT-routed top-k MoE. Permute is a counting sort (O(T*k), stable); dispatch/combine are
// row gathers parallel over rows (combine gathers the k rows of a token, so no atomics and a fixed
// summation order); the grouped expert MLP is one GEMM per expert segment (BLAS on contiguous slices,
// no copies) with the SwiGLU elementwise work fused into single OpenMP passes over all experts.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "moe_common.h"

namespace mmt {
namespace {

using at::Tensor;

// act 0: silu; act 1: gelu, tanh approximation (Gemma 3's gelu_pytorch_tanh).
template <typename T>
inline T act_fwd(T g, int64_t act) {
  if (act == 0) return g / (T(1) + std::exp(-g));
  const T c = T(0.7978845608028654), a = T(0.044715);
  return T(0.5) * g * (T(1) + std::tanh(c * (g + a * g * g * g)));
}

// act(g) and act'(g) together: one exp (silu) or one tanh (gelu) per element instead of two.
template <typename T>
inline void act_fwd_bwd(T g, int64_t act, T& a, T& da) {
  if (act == 0) {
    const T s = T(1) / (T(1) + std::exp(-g));
    a = g * s;
    da = s * (T(1) + g * (T(1) - s));
    return;
  }
  const T c = T(0.7978845608028654), k = T(0.044715);
  const T t = std::tanh(c * (g + k * g * g * g));
  a = T(0.5) * g * (T(1) + t);
  da = T(0.5) * (T(1) + t) + T(0.5) * g * (T(1) - t * t) * c * (T(1) + T(3) * k * g * g);
}

// mm_out takes Tensor&; slices (narrow/select) are rvalues, so bind them to a named copy first.
inline void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

std::vector<int64_t> checked_offsets(const Tensor& offsets, int64_t E, int64_t N, const char* op) {
  const Tensor off = offsets.to(at::kCPU).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  std::vector<int64_t> v(o, o + E + 1);
  TORCH_CHECK(v[0] == 0 && v[E] == N, op, ": offsets must run from 0 to the number of rows ", N, ", got ", v[0],
              " .. ", v[E]);
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(v[e] <= v[e + 1], op, ": offsets must be non-decreasing");
  return v;
}

// ---- permute / dispatch / combine -----------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> moe_permute_cpu(const Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong, "moe_permute: expert_ids must be int64, got ",
              expert_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "moe_permute: num_experts must be >= 1, got ", num_experts);
  const Tensor ids = expert_ids.contiguous();
  const int64_t N = ids.numel(), E = num_experts;
  const auto opts = ids.options();
  Tensor perm = at::empty({N}, opts), inv = at::empty({N}, opts), offsets = at::empty({E + 1}, opts);
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t *pp = perm.data_ptr<int64_t>(), *ip = inv.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>();
  std::vector<int64_t> cursor(E, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "moe_permute: expert id ", id[i], " at slot ", i, " is outside [0, ", E, ")");
    ++cursor[id[i]];
  }
  op[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    op[e + 1] = op[e] + cursor[e];
    cursor[e] = op[e];
  }
  // Walking slots in order makes the scatter stable: an expert's slots keep token order.
  for (int64_t i = 0; i < N; ++i) {
    const int64_t pos = cursor[id[i]]++;
    pp[pos] = i;
    ip[i] = pos;
  }
  return {perm, inv, offsets};
}

Tensor moe_dispatch_cpu(const Tensor& x, const Tensor& perm, const std::optional<Tensor>& scale, int64_t k) {
  moe::check_rows(x, "moe_dispatch", "x");
  moe::check_index(perm, x, "moe_dispatch", "perm");
  TORCH_CHECK(k >= 1 && perm.numel() == x.size(0) * k, "moe_dispatch: perm must have T*k=", x.size(0) * k,
              " entries (k=", k, "), got ", perm.numel());
  moe::check_slot_weights(scale, perm.numel(), x, "moe_dispatch");
  const int64_t N = perm.numel(), d = x.size(1);
  Tensor out = at::empty({N, d}, x.options());
  const int64_t* pp = perm.data_ptr<int64_t>();
  const float* sc = scale ? scale->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_dispatch_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        TORCH_CHECK(pp[j] >= 0 && pp[j] < N, "moe_dispatch: perm[", j, "]=", pp[j], " is outside [0, ", N, ")");
        const scalar_t* src = xs + (pp[j] / k) * d;
        scalar_t* dst = o + j * d;
        if (sc) {
          const acc_t w = static_cast<acc_t>(sc[pp[j]]);
          for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) * w);
        } else {
          for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
        }
      }
    });
  });
  return out;
}

Tensor moe_combine_cpu(const Tensor& yp, const Tensor& inv, const std::optional<Tensor>& weights, int64_t k) {
  moe::check_rows(yp, "moe_combine", "yp");
  moe::check_index(inv, yp, "moe_combine", "inv");
  TORCH_CHECK(k >= 1 && inv.numel() == yp.size(0) && inv.numel() % k == 0, "moe_combine: inv must have one entry per "
              "row of yp (", yp.size(0), ") and a multiple of k=", k, ", got ", inv.numel());
  moe::check_slot_weights(weights, inv.numel(), yp, "moe_combine");
  const int64_t N = inv.numel(), T = N / k, d = yp.size(1);
  Tensor out = at::empty({T, d}, yp.options());
  const int64_t* ip = inv.data_ptr<int64_t>();
  const float* w = weights ? weights->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yp.scalar_type(), "moe_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ys = yp.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(d);
      for (int64_t t = b; t < e; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t s = 0; s < k; ++s) {  // fixed order over the k choices: deterministic
          const int64_t row = ip[t * k + s];
          TORCH_CHECK(row >= 0 && row < N, "moe_combine: inv[", t * k + s, "]=", row, " is outside [0, ", N, ")");
          const acc_t ws = w ? static_cast<acc_t>(w[t * k + s]) : acc_t(1);
          const scalar_t* src = ys + row * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += ws * static_cast<acc_t>(src[c]);
        }
        for (int64_t c = 0; c < d; ++c) o[t * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

Tensor moe_combine_weight_grad_cpu(const Tensor& dout, const Tensor& yp, const Tensor& inv, int64_t k) {
  moe::check_rows(dout, "moe_combine_weight_grad", "dout");
  moe::check_rows(yp, "moe_combine_weight_grad", "yp");
  moe::check_index(inv, yp, "moe_combine_weight_grad", "inv");
  TORCH_CHECK(k >= 1 && inv.numel() == dout.size(0) * k && yp.size(0) == inv.numel() && yp.size(1) == dout.size(1) &&
                  yp.scalar_type() == dout.scalar_type(),
              "moe_combine_weight_grad: expected dout [T, d], yp [T*k, d] of one dtype and inv [T*k]; got ",
              dout.sizes(), ", ", yp.sizes(), ", ", inv.sizes());
  const int64_t N = inv.numel(), d = yp.size(1);
  const bool f64 = yp.scalar_type() == at::kDouble;
  Tensor out = at::empty({N}, yp.options().dtype(f64 ? at::kDouble : at::kFloat));
  const int64_t* ip = inv.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yp.scalar_type(), "moe_combine_weight_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *ys = yp.data_ptr<scalar_t>(), *gs = dout.data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* y = ys + ip[i] * d;
        const scalar_t* g = gs + (i / k) * d;
        acc_t acc = 0;
        for (int64_t c = 0; c < d; ++c) acc += static_cast<acc_t>(g[c]) * static_cast<acc_t>(y[c]);
        o[i] = acc;
      }
    });
  });
  return out;
}

// ---- grouped SwiGLU expert MLP --------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> moe_grouped_mlp_cpu(const Tensor& xp, const Tensor& offsets, const Tensor& w_gate,
                                                       const Tensor& w_up, const Tensor& w_down, int64_t act) {
  const auto s = moe::check_grouped_mlp(xp, offsets, w_gate, w_up, w_down, act, "moe_grouped_mlp");
  const auto off = checked_offsets(offsets, s.E, s.N, "moe_grouped_mlp");
  Tensor y = at::empty({s.N, s.d}, xp.options());
  Tensor g = at::empty({s.N, s.f}, xp.options()), u = at::empty({s.N, s.f}, xp.options());
  if (s.N == 0) return {y, g, u};
  // h = act(g) * u lives only per expert segment (a [max n_e, f] scratch), never as a full [N, f] tensor.
  int64_t max_n = 0;
  for (int64_t e = 0; e < s.E; ++e) max_n = std::max(max_n, off[e + 1] - off[e]);
  Tensor h = at::empty({max_n, s.f}, xp.options());
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    const Tensor xe = xp.narrow(0, off[e], n);
    Tensor ge = g.narrow(0, off[e], n), ue = u.narrow(0, off[e], n), he = h.narrow(0, 0, n);
    mm_into(ge, xe, w_gate[e].t());
    mm_into(ue, xe, w_up[e].t());
    const int64_t M = n * s.f;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xp.scalar_type(), "moe_swiglu_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *gp = ge.data_ptr<scalar_t>(), *up = ue.data_ptr<scalar_t>();
      scalar_t* hp = he.data_ptr<scalar_t>();
      at::parallel_for(0, M, 4096, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) {
          hp[i] = static_cast<scalar_t>(act_fwd<acc_t>(static_cast<acc_t>(gp[i]), act) * static_cast<acc_t>(up[i]));
        }
      });
    });
    mm_into(y.narrow(0, off[e], n), he, w_down[e].t());
  }
  return {y, g, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_grouped_mlp_backward_cpu(
    const Tensor& dy, const Tensor& xp, const Tensor& g, const Tensor& u, const Tensor& offsets, const Tensor& w_gate,
    const Tensor& w_up, const Tensor& w_down, const std::optional<Tensor>& train_mask, int64_t act, bool need_dx,
    bool need_dw) {
  const char* op = "moe_grouped_mlp_backward";
  const auto s = moe::check_grouped_mlp(xp, offsets, w_gate, w_up, w_down, act, op);
  TORCH_CHECK(dy.sizes() == xp.sizes() && dy.scalar_type() == xp.scalar_type() && dy.is_contiguous(), op,
              ": dy must be contiguous ", xp.sizes(), " ", xp.scalar_type(), ", got ", dy.sizes(), " ",
              dy.scalar_type());
  for (const Tensor* t : {&g, &u}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == s.N && t->size(1) == s.f && t->is_contiguous() &&
                    t->scalar_type() == xp.scalar_type(),
                op, ": gate/up must be the forward's contiguous [", s.N, ", ", s.f, "] outputs, got ", t->sizes());
  }
  std::vector<bool> train(s.E, true);
  if (train_mask) {
    TORCH_CHECK(train_mask->numel() == s.E, op, ": train_mask must have E=", s.E, " entries, got ",
                train_mask->numel());
    const Tensor m = train_mask->to(at::kCPU, at::kBool).contiguous();
    for (int64_t e = 0; e < s.E; ++e) train[e] = m.data_ptr<bool>()[e];
  }
  const auto off = checked_offsets(offsets, s.E, s.N, op);
  const auto opts = xp.options();
  Tensor dx = need_dx ? at::empty({s.N, s.d}, opts) : at::empty({0}, opts);
  Tensor dwg = need_dw ? at::empty(w_gate.sizes(), opts) : at::empty({0}, opts);
  Tensor dwu = need_dw ? at::empty(w_up.sizes(), opts) : at::empty({0}, opts);
  Tensor dwd = need_dw ? at::empty(w_down.sizes(), opts) : at::empty({0}, opts);
  if (!need_dx && !need_dw) return {dx, dwg, dwu, dwd};
  // Weight gradients are needed only for experts that train and received tokens; the others are zero.
  auto wants_dw = [&](int64_t e) { return need_dw && train[e] && off[e + 1] > off[e]; };
  bool any_dw = false;
  for (int64_t e = 0; e < s.E; ++e) {
    if (wants_dw(e)) {
      any_dw = true;
    } else if (need_dw) {
      dwg[e].zero_();
      dwu[e].zero_();
      dwd[e].zero_();
    }
  }
  if (s.N == 0) return {dx, dwg, dwu, dwd};

  // Per expert segment: dh = dy W_down, then dg = dh * u * act'(g), du = dh * act(g) (and h = act(g) * u
  // for dW_down) in [max n_e, f] scratch buffers reused across experts: no [N, f] temporaries.
  int64_t max_n = 0;
  for (int64_t e = 0; e < s.E; ++e) max_n = std::max(max_n, off[e + 1] - off[e]);
  Tensor dh_buf = at::empty({max_n, s.f}, opts), dg_buf = at::empty({max_n, s.f}, opts);
  Tensor h_buf = any_dw ? at::empty({max_n, s.f}, opts) : Tensor();
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    const bool dw_e = wants_dw(e);
    const Tensor dye = dy.narrow(0, off[e], n), ge = g.narrow(0, off[e], n), ue = u.narrow(0, off[e], n);
    Tensor dh = dh_buf.narrow(0, 0, n), dg = dg_buf.narrow(0, 0, n);
    Tensor h = dw_e ? h_buf.narrow(0, 0, n) : Tensor();
    mm_into(dh, dye, w_down[e]);
    const int64_t M = n * s.f;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xp.scalar_type(), "moe_swiglu_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *gp = ge.data_ptr<scalar_t>(), *up = ue.data_ptr<scalar_t>();
      scalar_t *dhp = dh.data_ptr<scalar_t>(), *dgp = dg.data_ptr<scalar_t>();
      scalar_t* hp = dw_e ? h.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, M, 4096, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) {
          const acc_t gv = static_cast<acc_t>(gp[i]), uv = static_cast<acc_t>(up[i]), dv = static_cast<acc_t>(dhp[i]);
          acc_t a, da;
          act_fwd_bwd<acc_t>(gv, act, a, da);
          if (hp) hp[i] = static_cast<scalar_t>(a * uv);
          dgp[i] = static_cast<scalar_t>(dv * uv * da);
          dhp[i] = static_cast<scalar_t>(dv * a);  // du overwrites dh in place
        }
      });
    });
    const Tensor& du = dh;
    if (need_dx) {
      Tensor dxe = dx.narrow(0, off[e], n);
      mm_into(dxe, dg, w_gate[e]);
      dxe.addmm_(du, w_up[e]);
    }
    if (dw_e) {
      const Tensor xe = xp.narrow(0, off[e], n);
      mm_into(dwd[e], dye.t(), h);
      mm_into(dwg[e], dg.t(), xe);
      mm_into(dwu[e], du.t(), xe);
    }
  }
  return {dx, dwg, dwu, dwd};
}

// ---- FFT features as a DFT GEMM -------------------------------------------------------------

std::tuple<Tensor, Tensor> moe_fft_features_cpu(const Tensor& x, const Tensor& basis) {
  moe::check_rows(x, "moe_fft_features", "x");
  TORCH_CHECK((basis.scalar_type() == at::kFloat || basis.scalar_type() == at::kDouble) && basis.dim() == 2 &&
                  basis.size(0) == x.size(1) && basis.size(1) % 2 == 0 && basis.is_contiguous(),
              "moe_fft_features: basis must be contiguous fp32/fp64 [d=", x.size(1), ", 2F], got ", basis.scalar_type(),
              " ", basis.sizes());
  const int64_t T = x.size(0), F = basis.size(1) / 2;
  const Tensor reim = at::mm(x.to(basis.scalar_type()), basis);
  Tensor feats = at::empty({T, F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "moe_fft_acc", [&] {
    using acc_t = scalar_t;
    const acc_t* ri = reim.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_fft_features_cpu", [&] {
      scalar_t* o = feats.data_ptr<scalar_t>();
      at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const acc_t* r = ri + t * 2 * F;
          for (int64_t j = 0; j < F; ++j) {
            o[t * F + j] = static_cast<scalar_t>(std::log1p(std::sqrt(r[j] * r[j] + r[F + j] * r[F + j])));
          }
        }
      });
    });
  });
  return {feats, reim};
}

Tensor moe_fft_features_backward_cpu(const Tensor& grad, const Tensor& reim, const Tensor& basis) {
  const char* op = "moe_fft_features_backward";
  moe::check_float(grad, op, "grad");
  TORCH_CHECK(grad.dim() == 2 && reim.dim() == 2 && reim.size(0) == grad.size(0) && reim.size(1) == 2 * grad.size(1) &&
                  reim.scalar_type() == basis.scalar_type() && basis.size(1) == reim.size(1) && reim.is_contiguous() &&
                  basis.is_contiguous(),
              op, ": expected grad [T, F], reim [T, 2F] and basis [d, 2F] of reim's dtype; got ", grad.sizes(), ", ",
              reim.sizes(), ", ", basis.sizes());
  const int64_t T = grad.size(0), F = grad.size(1);
  Tensor coef = at::empty({T, 2 * F}, reim.options());
  const Tensor gc = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "moe_fft_bwd_acc", [&] {
    using acc_t = scalar_t;
    const acc_t* ri = reim.data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gc.scalar_type(), "moe_fft_bwd_cpu", [&] {
      const scalar_t* gp = gc.data_ptr<scalar_t>();
      at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const acc_t* r = ri + t * 2 * F;
          acc_t* c = cp + t * 2 * F;
          for (int64_t j = 0; j < F; ++j) {
            const acc_t m = std::sqrt(r[j] * r[j] + r[F + j] * r[F + j]);
            // d log1p(|z|) / dz = z / (|z| (1 + |z|)); at z = 0 the subgradient 0 (torch's sgn(0) = 0).
            const acc_t s = m > 0 ? static_cast<acc_t>(gp[t * F + j]) / (m * (1 + m)) : acc_t(0);
            c[j] = s * r[j];
            c[F + j] = s * r[F + j];
          }
        }
      });
    });
  });
  return at::mm(coef, basis.t()).to(grad.scalar_type());
}

}  // namespace
}  // namespace mmt

TORCH_LIBRARY_IMPL(mmt, CPU, m) {
  m.impl("moe_permute", &mmt::moe_permute_cpu);
  m.impl("moe_dispatch", &mmt::moe_dispatch_cpu);
  m.impl("moe_combine", &mmt::moe_combine_cpu);
  m.impl("moe_combine_weight_grad", &mmt::moe_combine_weight_grad_cpu);
  m.impl("moe_grouped_mlp", &mmt::moe_grouped_mlp_cpu);
  m.impl("moe_grouped_mlp_backward", &mmt::moe_grouped_mlp_backward_cpu);
  m.impl("moe_fft_features", &mmt::moe_fft_features_cpu);
  m.impl("moe_fft_features_backward", &mmt::moe_fft_features_backward_cpu);
}
