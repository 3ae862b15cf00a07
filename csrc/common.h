// Shared helpers for the CPU kernels: input checks with readable messages and the
// accumulation type (fp32 for fp32/bf16/fp16, fp64 for fp64).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define EC_CHECK(cond, ...) TORCH_CHECK(cond, "embedcore: ", __VA_ARGS__)

namespace embedcore {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

inline void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  EC_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  EC_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace embedcore
