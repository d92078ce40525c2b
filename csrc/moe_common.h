// Argument checks shared by the CPU and CUDA bindings of the MoE ops (family 2).
#pragma once
#include <torch/torch.h>

namespace mmt {
namespace moe {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, op, ": ", name,
              " must be fp32, bf16, fp16 (or fp64), got ", s);
}

inline void check_index(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D int64 tensor, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", data on ", like.device());
}

inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, op, name);
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous 2-D [rows, d] tensor, got ",
              t.sizes());
}

inline void check_slot_weights(const std::optional<at::Tensor>& w, int64_t n, const at::Tensor& like, const char* op) {
  if (!w) return;
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == n, op,
              ": weights/scale must be contiguous fp32 with T*k=", n, " elements, got ", w->scalar_type(), " ",
              w->sizes());
  TORCH_CHECK(w->device() == like.device(), op, ": weights on ", w->device(), ", data on ", like.device());
}

struct MlpShape {
  int64_t N, d, f, E;
};

inline MlpShape check_grouped_mlp(const at::Tensor& xp, const at::Tensor& offsets, const at::Tensor& w_gate,
                                  const at::Tensor& w_up, const at::Tensor& w_down, int64_t act, const char* op) {
  check_rows(xp, op, "xp");
  TORCH_CHECK(act == 0 || act == 1, op, ": act must be 0 (silu) or 1 (gelu tanh), got ", act);
  TORCH_CHECK(w_gate.dim() == 3 && w_gate.is_contiguous(), op, ": w_gate must be contiguous [E, f, d], got ",
              w_gate.sizes());
  MlpShape s{xp.size(0), xp.size(1), w_gate.size(1), w_gate.size(0)};
  TORCH_CHECK(w_gate.size(2) == s.d, op, ": w_gate is ", w_gate.sizes(), " but xp has d=", s.d);
  TORCH_CHECK(w_up.sizes() == w_gate.sizes() && w_up.is_contiguous(), op, ": w_up ", w_up.sizes(),
              " must match w_gate ", w_gate.sizes());
  TORCH_CHECK(w_down.dim() == 3 && w_down.size(0) == s.E && w_down.size(1) == s.d && w_down.size(2) == s.f &&
                  w_down.is_contiguous(),
              op, ": w_down must be contiguous [E, d, f] = [", s.E, ", ", s.d, ", ", s.f, "], got ", w_down.sizes());
  for (const at::Tensor* w : {&w_gate, &w_up, &w_down}) {
    TORCH_CHECK(w->scalar_type() == xp.scalar_type() && w->device() == xp.device(), op,
                ": expert weights must have xp's dtype and device (", xp.scalar_type(), ", ", xp.device(), "), got ",
                w->scalar_type(), ", ", w->device());
  }
  check_index(offsets, xp, op, "offsets");
  TORCH_CHECK(offsets.numel() == s.E + 1, op, ": offsets must have E+1=", s.E + 1, " entries, got ", offsets.numel());
  return s;
}

}  // namespace moe
}  // namespace mmt
