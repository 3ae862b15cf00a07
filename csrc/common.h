// Shared helpers for the CPU kernels: input checks with readable messages, the accumulation type
// (fp32 for fp32/bf16/fp16, fp64 for fp64), and the block buffers of the tiled score kernels
// (contrastive, prefix_contrastive, maxsim), so that each kernel file holds only its own maths.
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows [r0, r0 + n) of the 2-D t in the accumulation dtype: a view when t already is, else a copy
// into `buf` (a flat reusable buffer of at least n * t.size(1) elements).
inline at::Tensor rows_in_acc(const at::Tensor& t, int64_t r0, int64_t n, at::Tensor& buf) {
  auto rows = t.narrow(0, r0, n);
  if (rows.scalar_type() == buf.scalar_type()) return rows;
  auto out = buf.narrow(0, 0, n * t.size(1)).view({n, t.size(1)});
  out.copy_(rows);
  return out;
}

// Room for one block converted to the accumulation dtype; empty when t needs no conversion.
inline at::Tensor conversion_buffer(const at::Tensor& t, int64_t numel, const at::TensorOptions& acc_opts) {
  const bool converts = t.scalar_type() != acc_opts.dtype().toScalarType();
  return at::empty({converts ? numel : 0}, acc_opts);
}

// The first rows * cols elements of a flat buffer as a [rows, cols] tile.
inline at::Tensor tile_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// The InfoNCE layout of B queries over P passages: positive_index int64 [B] in [0, P), passage_ids
// int64 [P] or none (the Python ops check this too; these ops are reachable as torch.ops.embedcore).
inline void check_layout(const at::Tensor& pos, const c10::optional<at::Tensor>& ids, int64_t B, int64_t P) {
  check_cpu_contiguous(pos, "positive_index");
  EC_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == B, "positive_index must be int64 [B] = [",
           B, "], got ", pos.scalar_type(), " ", pos.sizes());
  if (ids.has_value()) {
    check_cpu_contiguous(*ids, "passage_ids");
    EC_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->size(0) == P, "passage_ids must be int64 [P] = [",
             P, "], got ", ids->scalar_type(), " ", ids->sizes());
  }
  const int64_t* pi = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i)
    EC_CHECK(pi[i] >= 0 && pi[i] < P, "positive_index[", i, "] = ", pi[i], " is out of range for P = ", P);
}

}  // namespace embedcore
