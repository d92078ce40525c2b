// Torch-side helpers shared by the CUDA bindings (*_bind.cpp): dtype mapping for the raw launchers and the
// check of their launch status.
#pragma once
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "dtype.h"

namespace mmt {

inline cuda::DType to_cuda_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, op, ": CUDA kernels take fp32, bf16 or fp16 tensors, got ", t);
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace mmt
