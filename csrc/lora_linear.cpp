// lora_linear on CPU: y = x W^T + b + s' (mask * x) A^T B^T, maths in embedcore/ops/lora_linear.py,
// mask hash in embedcore/ops/dropout_hash.py (s' = scaling / (1 - p) already folded in by the caller).
//
// Every product goes to BLAS. The big ones (x W^T forward, dy W backward) are written straight
// into the one output buffer, and the rank-r update is added into that buffer in place:
//   - fp32/fp64 without dropout: addmm_ on the inputs themselves, no temporary at all;
//   - bf16/fp16 or dropout: rows are processed in chunks of ~2^20 elements, each converted to
//     fp32 and masked (the dropout mask regenerated from its counter hash, never stored), so
//     accumulation is fp32 and each output element is rounded once. No full-size temporary.
//
//   forward:  xa = (mask * x) A^T [M, r] (kept for backward); out = addmm(b, x, W^T); out += xa (s' B^T)
//   backward: g = dy (s' B) [M, r]; dB = s' dy^T xa; dA = g^T (mask * x); dx = dy W; dx += mask * (g A)
#include "common.h"
#include <algorithm>
#include <cstdint>
#include <vector>

namespace embedcore {
namespace {

inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x21F0AAADu;
  h ^= h >> 15;
  h *= 0x735A2D97u;
  h ^= h >> 15;
  return h;
}

// Keep-mask of element i of the flattened x: dropout_hash.keep_mask's hash (mix32 above repeats its
// constants, which C++ cannot import; tests/test_lora_linear.py reads the mask back).
struct Dropout {
  bool on;
  uint32_t k1, k2, thr;
  inline bool keep(int64_t i) const {
    return !on || (mix32(mix32(static_cast<uint32_t>(i) ^ k1) ^ k2) >> 8) >= thr;
  }
};

// Rows per chunk on the chunked paths (bf16/fp16 inputs or dropout): chunk buffers of about
// 2^20 elements, far below the full [M, in] / [M, out] sizes.
int64_t chunk_rows(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(width, 1)); }

// Zero the dropped elements of t [rows, L] (acc dtype), rows r0.. of the flattened x.
template <typename A>
void apply_mask_(at::Tensor& t, int64_t r0, int64_t L, const Dropout& drop) {
  if (!drop.on) return;
  A* p = t.data_ptr<A>();
  const int64_t rows = t.size(0);
  at::parallel_for(0, rows, 8, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t base = (r0 + i) * L;
      for (int64_t l = 0; l < L; ++l)
        if (!drop.keep(base + l)) p[i * L + l] = A(0);
    }
  });
}

// (mask * x)[r0:r1] in the accumulation dtype: a chunk-sized copy.
at::Tensor masked_chunk(const at::Tensor& x, int64_t r0, int64_t r1, const Dropout& drop, at::ScalarType acc) {
  at::Tensor c = x.slice(0, r0, r1).to(acc, /*non_blocking=*/false, /*copy=*/true);
  AT_DISPATCH_FLOATING_TYPES(acc, "lora_mask", [&] { apply_mask_<scalar_t>(c, r0, x.size(1), drop); });
  return c;
}

Dropout make_dropout(bool on, int64_t k1, int64_t k2, int64_t thr) {
  return Dropout{on, static_cast<uint32_t>(k1), static_cast<uint32_t>(k2), static_cast<uint32_t>(thr)};
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  check_cpu_contiguous(lora_a, "lora_a");
  check_cpu_contiguous(lora_b, "lora_b");
  EC_CHECK(x.dim() == 2, "x must be [M, in], got ", x.sizes());
  EC_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be [out, in] with in=", x.size(1), ", got ", weight.sizes());
  EC_CHECK(lora_a.dim() == 2 && lora_a.size(1) == x.size(1), "lora_a must be [r, in] with in=", x.size(1), ", got ", lora_a.sizes());
  EC_CHECK(lora_b.dim() == 2 && lora_b.size(0) == weight.size(0) && lora_b.size(1) == lora_a.size(0),
           "lora_b must be [out, r] = [", weight.size(0), ", ", lora_a.size(0), "], got ", lora_b.sizes());
  for (const at::Tensor* t : {&weight, &lora_a, &lora_b}) {
    EC_CHECK(t->scalar_type() == x.scalar_type(), "all inputs must share x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  }
}

}  // namespace

std::vector<at::Tensor> lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_a, const at::Tensor& lora_b, double s_eff,
                                            bool dropout, int64_t k1, int64_t k2, int64_t thr) {
  check_inputs(x, weight, lora_a, lora_b);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto acc = acc_scalar_type(x.scalar_type());
  const bool exact = x.scalar_type() == acc;  // BLAS on x itself accumulates in acc already
  const Dropout drop = make_dropout(dropout, k1, k2, thr);
  at::Tensor out;
  if (bias.has_value() && bias->defined()) {
    EC_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [out] = [", N, "], got ", bias->sizes());
    out = at::addmm(*bias, x, weight.t());
  } else {
    out = at::mm(x, weight.t());
  }
  const auto a_t = lora_a.t().to(acc);                  // [K, r], small
  const auto b_t = lora_b.t().to(acc) * s_eff;          // [r, N], small
  at::Tensor xa;
  if (exact && !dropout) {
    xa = at::mm(x, a_t);
  } else {
    xa = at::empty({M, lora_a.size(0)}, x.options().dtype(acc));
    for (int64_t r0 = 0, C = chunk_rows(K); r0 < M; r0 += C) {
      const int64_t r1 = std::min(M, r0 + C);
      auto xa_c = xa.slice(0, r0, r1);
      at::mm_out(xa_c, masked_chunk(x, r0, r1, drop, acc), a_t);
    }
  }
  if (exact) {
    out.addmm_(xa, b_t);  // in place: out += xa (s' B^T)
  } else {                // acc-dtype chunk, added with one rounding per element
    for (int64_t r0 = 0, C = chunk_rows(N); r0 < M; r0 += C) {
      const int64_t r1 = std::min(M, r0 + C);
      out.slice(0, r0, r1).add_(at::mm(xa.slice(0, r0, r1), b_t));
    }
  }
  return {out, xa};
}

std::vector<at::Tensor> lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& xa,
                                             double s_eff, bool dropout, int64_t k1, int64_t k2, int64_t thr, bool need_dx) {
  check_inputs(x, weight, lora_a, lora_b);
  check_cpu_contiguous(grad_out, "grad_out");
  check_cpu_contiguous(xa, "xa");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  EC_CHECK(grad_out.sizes() == at::IntArrayRef({M, N}), "grad_out must be [M, out] = [", M, ", ", N, "], got ", grad_out.sizes());
  EC_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out must have x's dtype");
  const auto acc = acc_scalar_type(x.scalar_type());
  EC_CHECK(xa.sizes() == at::IntArrayRef({M, R}) && xa.scalar_type() == acc, "xa must be the forward's [M, r] accumulation-dtype intermediate");
  const bool exact = x.scalar_type() == acc;
  const Dropout drop = make_dropout(dropout, k1, k2, thr);
  const Dropout none = make_dropout(false, 0, 0, 0);
  const auto b_s = lora_b.to(acc) * s_eff;   // [N, r], small
  const auto a_acc = lora_a.to(acc);         // [r, K], small
  at::Tensor g, db, da;
  if (exact) {
    g = at::mm(grad_out, b_s);                 // [M, r]
    db = at::mm(grad_out.t(), xa).mul_(s_eff); // [N, r]
  } else {
    g = at::empty({M, R}, xa.options());
    db = at::zeros({N, R}, xa.options());
    for (int64_t r0 = 0, C = chunk_rows(N); r0 < M; r0 += C) {
      const int64_t r1 = std::min(M, r0 + C);
      const auto dy_c = masked_chunk(grad_out, r0, r1, none, acc);
      auto g_c = g.slice(0, r0, r1);
      at::mm_out(g_c, dy_c, b_s);
      db.addmm_(dy_c.t(), xa.slice(0, r0, r1), 1.0, s_eff);
    }
  }
  if (exact && !dropout) {
    da = at::mm(g.t(), x);                     // [r, K]
  } else {
    da = at::zeros({R, K}, xa.options());
    for (int64_t r0 = 0, C = chunk_rows(K); r0 < M; r0 += C) {
      const int64_t r1 = std::min(M, r0 + C);
      da.addmm_(g.slice(0, r0, r1).t(), masked_chunk(x, r0, r1, drop, acc));
    }
  }
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = at::mm(grad_out, weight);
    if (exact && !dropout) {
      dx.addmm_(g, a_acc);                     // in place: dx += g A
    } else {
      for (int64_t r0 = 0, C = chunk_rows(K); r0 < M; r0 += C) {
        const int64_t r1 = std::min(M, r0 + C);
        auto t = at::mm(g.slice(0, r0, r1), a_acc);  // [chunk, K] acc
        AT_DISPATCH_FLOATING_TYPES(acc, "lora_mask", [&] { apply_mask_<scalar_t>(t, r0, K, drop); });
        dx.slice(0, r0, r1).add_(t);
      }
    }
  }
  return {dx, da.to(x.scalar_type()), db.to(x.scalar_type())};
}

}  // namespace embedcore

TORCH_LIBRARY_FRAGMENT(embedcore, m) {
  m.def("lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float s_eff, "
        "bool dropout, int k1, int k2, int thr) -> Tensor[]");
  m.def("lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor xa, "
        "float s_eff, bool dropout, int k1, int k2, int thr, bool need_dx) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(embedcore, CPU, m) {
  m.impl("lora_linear_forward", &embedcore::lora_linear_forward);
  m.impl("lora_linear_backward", &embedcore::lora_linear_backward);
}
