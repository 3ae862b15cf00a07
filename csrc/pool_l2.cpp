// pool_l2 on CPU: weighted sum over the sequence fused with L2 normalisation, and colbert
// (per-token normalisation). Weights come from the Python layer (see embedcore/ops/pool_l2.py);
// zero weights skip their token entirely, so padding costs no memory traffic.
//
// Normalisation y = x / max(|x|, eps); its backward:
//   |x| > eps:  dx = (dy - y <y, dy>) / |x|
//   otherwise:  dx = dy / eps
#include "common.h"
#include <cmath>
#include <vector>

namespace embedcore {

template <typename A>
static A l2_scale_backward(const A* y_or_x, const A* dy, A* dx, int64_t D, A norm, A eps, bool normalize) {
  // Writes dx for one vector; y_or_x holds the normalised output y. Returns nothing useful.
  if (!normalize) {
    for (int64_t d = 0; d < D; ++d) dx[d] = dy[d];
    return A(0);
  }
  if (norm > eps) {
    A dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += y_or_x[d] * dy[d];
    for (int64_t d = 0; d < D; ++d) dx[d] = (dy[d] - y_or_x[d] * dot) / norm;
  } else {
    for (int64_t d = 0; d < D; ++d) dx[d] = dy[d] / eps;
  }
  return A(0);
}

std::vector<at::Tensor> pool_l2_forward(const at::Tensor& hidden, const at::Tensor& weights, bool normalize, double eps) {
  check_cpu_contiguous(hidden, "hidden");
  check_cpu_contiguous(weights, "weights");
  EC_CHECK(hidden.dim() == 3, "hidden must be [B, S, D], got ", hidden.sizes());
  const int64_t B = hidden.size(0), S = hidden.size(1), D = hidden.size(2);
  EC_CHECK(weights.sizes() == at::IntArrayRef({B, S}), "weights must be [B, S] = [", B, ", ", S, "], got ", weights.sizes());
  EC_CHECK(weights.scalar_type() == acc_scalar_type(hidden.scalar_type()), "weights must be of the accumulation dtype");
  auto out = at::empty({B, D}, hidden.options());
  auto pooled = at::empty({B, D}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "pool_l2_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    const A* w = weights.data_ptr<A>();
    A* p = pooled.data_ptr<A>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        A* acc = p + b * D;
        for (int64_t d = 0; d < D; ++d) acc[d] = 0;
        for (int64_t s = 0; s < S; ++s) {
          const A ws = w[b * S + s];
          if (ws == A(0)) continue;
          const scalar_t* row = h + (b * S + s) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += ws * static_cast<A>(row[d]);
        }
        A scale = 1;
        if (normalize) {
          A sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += acc[d] * acc[d];
          scale = A(1) / std::max(std::sqrt(sq), static_cast<A>(eps));
        }
        for (int64_t d = 0; d < D; ++d) o[b * D + d] = static_cast<scalar_t>(acc[d] * scale);
      }
    });
  });
  return {out, pooled};
}

at::Tensor pool_l2_backward(const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& pooled,
                            bool normalize, double eps, int64_t S, at::ScalarType dtype) {
  check_cpu_contiguous(grad_out, "grad_out");
  check_cpu_contiguous(weights, "weights");
  check_cpu_contiguous(pooled, "pooled");
  const int64_t B = pooled.size(0), D = pooled.size(1);
  auto grad_hidden = at::empty({B, S, D}, pooled.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pool_l2_backward", [&] {
    using A = acc_t<scalar_t>;
    const A* w = weights.data_ptr<A>();
    const A* p = pooled.data_ptr<A>();
    scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
    // dpooled for every row first (B x D, small), then the outer product w[b, s] * dpooled[b].
    std::vector<A> dp(B * D);
    auto go_acc = grad_out.to(acc_scalar_type(dtype)).contiguous();
    const A* go = go_acc.data_ptr<A>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> y(D);
      for (int64_t b = b0; b < b1; ++b) {
        const A* x = p + b * D;
        A sq = 0;
        for (int64_t d = 0; d < D; ++d) sq += x[d] * x[d];
        const A norm = std::sqrt(sq);
        const A inv = A(1) / std::max(norm, static_cast<A>(eps));
        for (int64_t d = 0; d < D; ++d) y[d] = x[d] * inv;
        l2_scale_backward<A>(y.data(), go + b * D, dp.data() + b * D, D, norm, static_cast<A>(eps), normalize);
      }
    });
    at::parallel_for(0, B * S, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const A ws = w[r];
        scalar_t* row = gh + r * D;
        if (ws == A(0)) {
          std::fill(row, row + D, scalar_t(0));
          continue;
        }
        const A* g = dp.data() + (r / S) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<scalar_t>(ws * g[d]);
      }
    });
  });
  return grad_hidden;
}

at::Tensor colbert_l2_forward(const at::Tensor& hidden, const at::Tensor& token_mask, bool normalize, double eps) {
  check_cpu_contiguous(hidden, "hidden");
  check_cpu_contiguous(token_mask, "token_mask");
  const int64_t R = hidden.size(0) * hidden.size(1), D = hidden.size(2);
  auto out = at::empty_like(hidden);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "colbert_l2_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    const A* m = token_mask.data_ptr<A>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = h + r * D;
        scalar_t* y = o + r * D;
        if (m[r] == A(0)) {
          std::fill(y, y + D, scalar_t(0));
          continue;
        }
        A scale = 1;
        if (normalize) {
          A sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += static_cast<A>(x[d]) * static_cast<A>(x[d]);
          scale = A(1) / std::max(std::sqrt(sq), static_cast<A>(eps));
        }
        for (int64_t d = 0; d < D; ++d) y[d] = static_cast<scalar_t>(static_cast<A>(x[d]) * scale);
      }
    });
  });
  return out;
}

at::Tensor colbert_l2_backward(const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& token_mask,
                               bool normalize, double eps) {
  check_cpu_contiguous(grad_out, "grad_out");
  check_cpu_contiguous(hidden, "hidden");
  const int64_t R = hidden.size(0) * hidden.size(1), D = hidden.size(2);
  auto grad_hidden = at::empty_like(hidden);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "colbert_l2_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const A* m = token_mask.data_ptr<A>();
    scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      std::vector<A> y(D), dy(D), dx(D);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* out = gh + r * D;
        if (m[r] == A(0)) {
          std::fill(out, out + D, scalar_t(0));
          continue;
        }
        A sq = 0;
        for (int64_t d = 0; d < D; ++d) {
          const A v = static_cast<A>(h[r * D + d]);
          sq += v * v;
          dy[d] = static_cast<A>(go[r * D + d]);
        }
        const A norm = std::sqrt(sq);
        const A inv = A(1) / std::max(norm, static_cast<A>(eps));
        for (int64_t d = 0; d < D; ++d) y[d] = static_cast<A>(h[r * D + d]) * inv;
        l2_scale_backward<A>(y.data(), dy.data(), dx.data(), D, norm, static_cast<A>(eps), normalize);
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(dx[d]);
      }
    });
  });
  return grad_hidden;
}

}  // namespace embedcore

TORCH_LIBRARY_FRAGMENT(embedcore, m) {
  m.def("pool_l2_forward(Tensor hidden, Tensor weights, bool normalize, float eps) -> Tensor[]");
  m.def("pool_l2_backward(Tensor grad_out, Tensor weights, Tensor pooled, bool normalize, float eps, int S, ScalarType dtype) -> Tensor");
  m.def("colbert_l2_forward(Tensor hidden, Tensor token_mask, bool normalize, float eps) -> Tensor");
  m.def("colbert_l2_backward(Tensor grad_out, Tensor hidden, Tensor token_mask, bool normalize, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(embedcore, CPU, m) {
  m.impl("pool_l2_forward", &embedcore::pool_l2_forward);
  m.impl("pool_l2_backward", &embedcore::pool_l2_backward);
  m.impl("colbert_l2_forward", &embedcore::colbert_l2_forward);
  m.impl("colbert_l2_backward", &embedcore::colbert_l2_backward);
}
