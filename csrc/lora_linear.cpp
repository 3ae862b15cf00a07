// lora_linear on CPU: y = x W^T + b + s' (mask * x) A^T B^T, maths and mask hash in
// embedcore/ops/lora_linear.py (s' = scaling / (1 - p) already folded in by the caller).
//
// The two big products (x W^T forward, dy W backward) go to BLAS (addmm) straight into the one
// output buffer; every rank-r product is a loop here that accumulates in fp32 (fp64 for fp64)
// and adds into that buffer with a single rounding. No full-size temporary is made: the
// dropout mask is regenerated from its counter hash wherever it is needed, never stored.
//
//   forward:  xa = (mask * x) A^T [M, r] (kept for backward); out = addmm(b, x, W^T); out += xa (s' B^T)
//   backward: g = dy (s' B) [M, r]; dB = s' dy^T xa; dA = g^T (mask * x); dx = dy W; dx += mask * (g A)
#include "common.h"
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

// Keep-mask of element i of the flattened x (the same hash as keep_mask() in Python).
struct Dropout {
  bool on;
  uint32_t k1, k2, thr;
  inline bool keep(int64_t i) const {
    return !on || (mix32(mix32(static_cast<uint32_t>(i) ^ k1) ^ k2) >> 8) >= thr;
  }
};

// out[m, :R] = sum_l keep(m, l) * big[m, l] * small[l, :R]      big [M, L], small [L, R] (acc)
template <typename T, typename A>
void rows_times_small(const T* big, const A* small, A* out, int64_t M, int64_t L, int64_t R, const Dropout& drop) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      A* o = out + m * R;
      for (int64_t j = 0; j < R; ++j) o[j] = 0;
      const T* row = big + m * L;
      for (int64_t l = 0; l < L; ++l) {
        if (!drop.keep(m * L + l)) continue;
        const A v = static_cast<A>(row[l]);
        const A* s = small + l * R;
        for (int64_t j = 0; j < R; ++j) o[j] += v * s[j];
      }
    }
  });
}

// out[l, :R] = sum_m keep(m, l) * big[m, l] * rank[m, :R]       big [M, L], rank [M, R] (acc)
// Each thread owns a block of output rows and walks all of M, so no reduction across threads.
template <typename T, typename A>
void rank_reduce(const T* big, const A* rank, A* out, int64_t M, int64_t L, int64_t R, const Dropout& drop) {
  at::parallel_for(0, L, 64, [&](int64_t l0, int64_t l1) {
    for (int64_t i = l0 * R; i < l1 * R; ++i) out[i] = 0;
    for (int64_t m = 0; m < M; ++m) {
      const T* row = big + m * L;
      const A* rk = rank + m * R;
      for (int64_t l = l0; l < l1; ++l) {
        if (!drop.keep(m * L + l)) continue;
        const A v = static_cast<A>(row[l]);
        A* o = out + l * R;
        for (int64_t j = 0; j < R; ++j) o[j] += v * rk[j];
      }
    }
  });
}

// out[m, l] += keep(m, l) * sum_j rank[m, j] * small[j, l]     out [M, L], rank [M, R], small [R, L]
// One fp32 row buffer per thread; each output element is rounded once.
template <typename T, typename A>
void add_rank_product(T* out, const A* rank, const A* small, int64_t M, int64_t L, int64_t R, const Dropout& drop) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<A> tmp(L);
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(tmp.begin(), tmp.end(), A(0));
      for (int64_t j = 0; j < R; ++j) {
        const A c = rank[m * R + j];
        const A* s = small + j * L;
        for (int64_t l = 0; l < L; ++l) tmp[l] += c * s[l];
      }
      T* o = out + m * L;
      for (int64_t l = 0; l < L; ++l) {
        if (drop.keep(m * L + l)) o[l] = static_cast<T>(static_cast<A>(o[l]) + tmp[l]);
      }
    }
  });
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
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const auto acc = acc_scalar_type(x.scalar_type());
  auto xa = at::empty({M, R}, x.options().dtype(acc));
  at::Tensor out;
  if (bias.has_value() && bias->defined()) {
    EC_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [out] = [", N, "], got ", bias->sizes());
    out = at::addmm(*bias, x, weight.t());
  } else {
    out = at::mm(x, weight.t());
  }
  const auto a_t = lora_a.t().to(acc).contiguous();                 // [K, R], small
  const auto b_t = (lora_b.t().to(acc) * s_eff).contiguous();       // [R, N], small
  const Dropout drop = make_dropout(dropout, k1, k2, thr);
  const Dropout none = make_dropout(false, 0, 0, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_linear_forward", [&] {
    using A = acc_t<scalar_t>;
    rows_times_small<scalar_t, A>(x.data_ptr<scalar_t>(), a_t.data_ptr<A>(), xa.data_ptr<A>(), M, K, R, drop);
    add_rank_product<scalar_t, A>(out.data_ptr<scalar_t>(), xa.data_ptr<A>(), b_t.data_ptr<A>(), M, N, R, none);
  });
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
  auto g = at::empty({M, R}, xa.options());
  auto db = at::empty({N, R}, xa.options());
  auto da_t = at::empty({K, R}, xa.options());
  const auto b_s = (lora_b.to(acc) * s_eff).contiguous();          // [N, R], small
  const auto a_acc = lora_a.to(acc).contiguous();                   // [R, K], small
  at::Tensor dx = need_dx ? at::mm(grad_out, weight) : at::empty({0}, x.options());
  const Dropout drop = make_dropout(dropout, k1, k2, thr);
  const Dropout none = make_dropout(false, 0, 0, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_linear_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* dy = grad_out.data_ptr<scalar_t>();
    rows_times_small<scalar_t, A>(dy, b_s.data_ptr<A>(), g.data_ptr<A>(), M, N, R, none);
    rank_reduce<scalar_t, A>(dy, xa.data_ptr<A>(), db.data_ptr<A>(), M, N, R, none);
    rank_reduce<scalar_t, A>(x.data_ptr<scalar_t>(), g.data_ptr<A>(), da_t.data_ptr<A>(), M, K, R, drop);
    if (need_dx) add_rank_product<scalar_t, A>(dx.data_ptr<scalar_t>(), g.data_ptr<A>(), a_acc.data_ptr<A>(), M, K, R, drop);
  });
  db.mul_(s_eff);
  return {dx, da_t.t().to(x.scalar_type()).contiguous(), db.to(x.scalar_type())};
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
