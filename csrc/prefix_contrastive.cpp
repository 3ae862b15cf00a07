// prefix_contrastive on CPU: InfoNCE over K nested prefixes of D in one pass, with per-row and
// per-column score scales, id masking and false-negative filtering (see
// embedcore/ops/prefix_contrastive.py for the maths). Never a [B, P] tensor: the same tiling as
// csrc/contrastive.cpp (threads own query blocks in the forward, passage blocks in the backward;
// <= 256 x 1024 score tiles through single-threaded GEMMs into per-worker buffers).
//
// One pass over the prefixes: the score GEMM of a tile is cut at the prefix boundaries
// d_1 < ... < d_K, each segment added onto the running dot product (addmm_), so after segment k
// the tile holds the prefix-k dot products and prefix k's scores, masks and online log-sum-exp
// are taken from it right there. The K prefixes cost one full-width GEMM, not K.
//
// Forward, per prefix k: s = dot_k * alpha[i, k] * beta[j, k]; columns that are copies of the
// positive (by id) or false negatives (s > thr_ik = min(margin * s_pos, s_pos - delta)) are left
// out; online (max, sum) per row; ranks and the count of filtered columns per row.
// Backward, per prefix k: dS^k = coef_k * (softmax^k - onehot(pos)) and A^k = dS^k alpha_k beta_k.
// Segment c of dq / dp gets (sum_{k >= c} A^k) times the segment of p / q: the K tiles A^k are
// kept per worker and summed from the last prefix backwards, so the gradient GEMMs are also one
// full width in all. Also the reductions sum_j dS s (per row and prefix, for d alpha) and
// sum_i dS s (per column and prefix, for d beta).
// dq and dp come back in the accumulation dtype (the launch helper rounds them).
// Extra memory: per worker (K + 2) tiles (<= 1 MiB fp32 each), a [B, D] dq partial and [B, K]
// row sums; O(B K + P K) state.
#include "common.h"
#include <cmath>
#include <limits>
#include <vector>

namespace embedcore {

namespace {

constexpr int64_t kTileQ = 256;
constexpr int64_t kTileP = 1024;

struct Filter {
  bool has_margin, has_delta;
  double margin, delta;
  bool on() const { return has_margin || has_delta; }
  // The score above which a candidate counts as a false negative of a row whose positive scores sp.
  template <typename A>
  A threshold(A sp) const {
    A thr = std::numeric_limits<A>::infinity();
    if (has_margin) thr = std::min(thr, static_cast<A>(margin) * sp);
    if (has_delta) thr = std::min(thr, sp - static_cast<A>(delta));
    return thr;
  }
};

void check_inputs(const at::Tensor& q, const at::Tensor& p, const at::Tensor& alpha, const at::Tensor& beta,
                  const at::Tensor& pos, const c10::optional<at::Tensor>& ids, at::IntArrayRef dims) {
  check_cpu_contiguous(q, "q");
  check_cpu_contiguous(p, "p");
  check_cpu_contiguous(alpha, "alpha");
  check_cpu_contiguous(beta, "beta");
  EC_CHECK(q.dim() == 2 && p.dim() == 2 && q.size(1) == p.size(1), "q must be [B, D] and p [P, D], got ",
           q.sizes(), " and ", p.sizes());
  EC_CHECK(q.scalar_type() == p.scalar_type(), "q and p must share a dtype, got ", q.scalar_type(), " and ",
           p.scalar_type());
  const int64_t K = static_cast<int64_t>(dims.size()), D = q.size(1);
  EC_CHECK(K >= 1, "dims must hold at least one prefix length");
  for (int64_t k = 0; k < K; ++k)
    EC_CHECK(dims[k] >= 1 && dims[k] <= D && (k == 0 || dims[k] > dims[k - 1]),
             "dims must be strictly increasing in [1, D = ", D, "], got ", dims);
  const auto acc = acc_scalar_type(q.scalar_type());
  EC_CHECK(alpha.scalar_type() == acc && alpha.dim() == 2 && alpha.size(0) == q.size(0) && alpha.size(1) == K,
           "alpha must be [B, K] = [", q.size(0), ", ", K, "] of the accumulation dtype, got ", alpha.scalar_type(),
           " ", alpha.sizes());
  EC_CHECK(beta.scalar_type() == acc && beta.dim() == 2 && beta.size(0) == p.size(0) && beta.size(1) == K,
           "beta must be [P, K] = [", p.size(0), ", ", K, "] of the accumulation dtype, got ", beta.scalar_type(),
           " ", beta.sizes());
  check_layout(pos, ids, q.size(0), p.size(0));
}

// s_pos[i, k] = <q_i, p_pos(i)>_{d_k} * alpha[i, k] * beta[pos(i), k], one sweep over d per row.
template <typename scalar_t, typename A>
std::vector<A> positive_scores(const at::Tensor& q, const at::Tensor& p, const int64_t* pos, const A* alpha,
                               const A* beta, const std::vector<int64_t>& dims) {
  const int64_t B = q.size(0), D = q.size(1), K = static_cast<int64_t>(dims.size());
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* pd = p.data_ptr<scalar_t>();
  std::vector<A> s_pos(B * K);
  at::parallel_for(0, B, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      A acc = 0;
      int64_t d = 0;
      const scalar_t* qr = qd + i * D;
      const scalar_t* pr = pd + pos[i] * D;
      for (int64_t k = 0; k < K; ++k) {
        for (; d < dims[k]; ++d) acc += static_cast<A>(qr[d]) * static_cast<A>(pr[d]);
        s_pos[i * K + k] = acc * alpha[i * K + k] * beta[pos[i] * K + k];
      }
    }
  });
  return s_pos;
}

// Add segment k of the score GEMM onto the running dot tile (the first segment overwrites it).
void add_segment(at::Tensor& dot, const at::Tensor& qb, const at::Tensor& pb, int64_t lo, int64_t hi) {
  auto qs = qb.narrow(1, lo, hi - lo), ps = pb.narrow(1, lo, hi - lo);
  if (lo == 0) {
    at::mm_out(dot, qs, ps.t());
  } else {
    dot.addmm_(qs, ps.t());
  }
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& p, const at::Tensor& alpha_t,
                                     const at::Tensor& beta_t, const at::Tensor& pos_t,
                                     const c10::optional<at::Tensor>& ids_t, const std::vector<int64_t>& dims,
                                     const Filter& filt) {
  using A = acc_t<scalar_t>;
  const int64_t B = q.size(0), P = p.size(0), D = q.size(1), K = static_cast<int64_t>(dims.size());
  const auto acc_opts = q.options().dtype(acc_scalar_type(q.scalar_type()));
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* ids = ids_t.has_value() ? ids_t->data_ptr<int64_t>() : nullptr;
  const A* alpha = alpha_t.data_ptr<A>();
  const A* beta = beta_t.data_ptr<A>();
  const A neg_inf = -std::numeric_limits<A>::infinity();

  const std::vector<A> s_pos = positive_scores<scalar_t, A>(q, p, pos, alpha, beta, dims);
  std::vector<A> run_max(B * K, neg_inf), run_sum(B * K, A(0));
  std::vector<int64_t> beaten(B * K, 0), masked(B * K, 0);

  const int64_t bq = std::max<int64_t>(1, std::min(kTileQ, ceil_div(B, at::get_num_threads())));
  at::parallel_for(0, ceil_div(B, bq), 1, [&](int64_t blk0, int64_t blk1) {
    at::NoGradGuard no_grad;
    const int64_t tp = std::min(P, kTileP);
    auto dot_buf = at::empty({bq * tp}, acc_opts);
    auto s_buf = at::empty({bq * tp}, acc_opts);
    auto q_buf = conversion_buffer(q, bq * D, acc_opts);
    auto p_buf = conversion_buffer(p, tp * D, acc_opts);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * bq, ni = std::min(bq, B - i0);
      auto qb = rows_in_acc(q, i0, ni, q_buf);
      for (int64_t j0 = 0; j0 < P; j0 += kTileP) {
        const int64_t nj = std::min(kTileP, P - j0);
        auto pb = rows_in_acc(p, j0, nj, p_buf);
        auto DOT = tile_view(dot_buf, ni, nj);
        auto S = tile_view(s_buf, ni, nj);
        const A* dt = DOT.data_ptr<A>();
        A* s = S.data_ptr<A>();
        for (int64_t k = 0; k < K; ++k) {
          add_segment(DOT, qb, pb, k == 0 ? 0 : dims[k - 1], dims[k]);
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t i = i0 + r, pi = pos[i], ik = i * K + k;
            const int64_t pid = ids ? ids[pi] : 0;
            const A a = alpha[ik], sp = s_pos[ik], thr = filt.threshold(sp);
            const A* drow = dt + r * nj;
            A* row = s + r * nj;
            A tmax = neg_inf;
            int64_t count = 0, dropped = 0;
            for (int64_t c = 0; c < nj; ++c) {
              const int64_t j = j0 + c;
              if (j != pi && ids && ids[j] == pid) {  // a copy of the positive: not a negative
                row[c] = neg_inf;
                continue;
              }
              const A v = drow[c] * a * beta[j * K + k];
              if (j != pi && filt.on() && v > thr) {  // a likely false negative: left out, counted
                row[c] = neg_inf;
                ++dropped;
                continue;
              }
              row[c] = v;
              tmax = std::max(tmax, v);
              count += (v > sp && j != pi);
            }
            beaten[ik] += count;
            masked[ik] += dropped;
            const A m_new = std::max(run_max[ik], tmax);
            if (m_new == neg_inf) {  // nothing counted yet in this row: exp(-inf) adds 0
              continue;
            }
            run_sum[ik] *= std::exp(run_max[ik] - m_new);
            run_max[ik] = m_new;
            for (int64_t c = 0; c < nj; ++c) row[c] -= m_new;
          }
          at::exp_(S);
          auto tile_sums = S.sum(1);
          const A* ts = tile_sums.data_ptr<A>();
          for (int64_t r = 0; r < ni; ++r) run_sum[(i0 + r) * K + k] += ts[r];
        }
      }
    }
  });

  auto lse = at::empty({B, K}, acc_opts);
  auto spos = at::empty({B, K}, acc_opts);
  auto ranks = at::empty({B, K}, q.options().dtype(at::kLong));
  auto masked_t = at::empty({B, K}, q.options().dtype(at::kLong));
  A* l = lse.data_ptr<A>();
  A* sp = spos.data_ptr<A>();
  int64_t* rk = ranks.data_ptr<int64_t>();
  int64_t* mk = masked_t.data_ptr<int64_t>();
  for (int64_t ik = 0; ik < B * K; ++ik) {
    l[ik] = run_max[ik] + std::log(run_sum[ik]);  // the positive is never left out: run_sum >= its term
    sp[ik] = s_pos[ik];
    rk[ik] = 1 + beaten[ik];
    mk[ik] = masked[ik];
  }
  return {lse, spos, ranks, masked_t};
}

template <typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& p, const at::Tensor& alpha_t,
                                      const at::Tensor& beta_t, const at::Tensor& pos_t,
                                      const c10::optional<at::Tensor>& ids_t, const at::Tensor& lse_t,
                                      const at::Tensor& spos_t, const at::Tensor& coef_t,
                                      const std::vector<int64_t>& dims, const Filter& filt, bool need_q,
                                      bool need_p, bool need_alpha, bool need_beta) {
  using A = acc_t<scalar_t>;
  const int64_t B = q.size(0), P = p.size(0), D = q.size(1), K = static_cast<int64_t>(dims.size());
  const auto acc_opts = q.options().dtype(acc_scalar_type(q.scalar_type()));
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* ids = ids_t.has_value() ? ids_t->data_ptr<int64_t>() : nullptr;
  const A* alpha = alpha_t.data_ptr<A>();
  const A* beta = beta_t.data_ptr<A>();
  const A* lse = lse_t.data_ptr<A>();
  const A* spos = spos_t.data_ptr<A>();
  const A* coef = coef_t.data_ptr<A>();
  const A neg_inf = -std::numeric_limits<A>::infinity();

  const int64_t bp = std::max<int64_t>(1, std::min(kTileP, ceil_div(P, at::get_num_threads())));
  const int64_t n_pblocks = ceil_div(P, bp);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_pblocks);
  auto dq_parts = need_q ? at::zeros({workers, B, D}, acc_opts) : at::empty({0}, acc_opts);
  auto dp = need_p ? at::zeros({P, D}, acc_opts) : at::empty({0}, acc_opts);
  auto row_parts = at::zeros({workers, B, K}, acc_opts);  // sum_j dS s per worker
  auto col_sds = at::zeros({P, K}, acc_opts);              // sum_i dS s (rows owned by one worker)

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::NoGradGuard no_grad;
    const int64_t tq = std::min(B, kTileQ);
    auto dot_buf = at::empty({tq * bp}, acc_opts);
    auto s_buf = at::empty({tq * bp}, acc_opts);
    auto a_buf = at::empty({K, tq * bp}, acc_opts);  // A^k, then their suffix sums
    auto q_buf = conversion_buffer(q, tq * D, acc_opts);
    auto p_buf = conversion_buffer(p, bp * D, acc_opts);
    A* csds = col_sds.data_ptr<A>();
    for (int64_t w = w0; w < w1; ++w) {
      A* rsds = row_parts[w].data_ptr<A>();
      for (int64_t blk = w; blk < n_pblocks; blk += workers) {
        const int64_t j0 = blk * bp, nj = std::min(bp, P - j0);
        auto pb = rows_in_acc(p, j0, nj, p_buf);
        for (int64_t i0 = 0; i0 < B; i0 += kTileQ) {
          const int64_t ni = std::min(kTileQ, B - i0);
          auto qb = rows_in_acc(q, i0, ni, q_buf);
          auto DOT = tile_view(dot_buf, ni, nj);
          auto S = tile_view(s_buf, ni, nj);
          const A* dt = DOT.data_ptr<A>();
          A* s = S.data_ptr<A>();
          for (int64_t k = 0; k < K; ++k) {
            add_segment(DOT, qb, pb, k == 0 ? 0 : dims[k - 1], dims[k]);
            for (int64_t r = 0; r < ni; ++r) {  // log-softmax, -inf where left out
              const int64_t i = i0 + r, pi = pos[i], ik = i * K + k;
              const int64_t pid = ids ? ids[pi] : 0;
              const A a = alpha[ik], li = lse[ik], thr = filt.threshold(spos[ik]);
              const A* drow = dt + r * nj;
              A* row = s + r * nj;
              for (int64_t c = 0; c < nj; ++c) {
                const int64_t j = j0 + c;
                const A v = drow[c] * a * beta[j * K + k];
                const bool out = j != pi && ((ids && ids[j] == pid) || (filt.on() && v > thr));
                row[c] = out ? neg_inf : v - li;
              }
            }
            at::exp_(S);  // softmax, 0 where left out
            A* ak = a_buf[k].data_ptr<A>();
            for (int64_t r = 0; r < ni; ++r) {
              const int64_t i = i0 + r, pi = pos[i], ik = i * K + k;
              const A a = alpha[ik];
              const A* drow = dt + r * nj;
              const A* prow = s + r * nj;
              A* arow = ak + r * nj;
              A row_acc = 0;
              for (int64_t c = 0; c < nj; ++c) {
                const int64_t j = j0 + c;
                const A b = beta[j * K + k];
                const A ds = coef[k] * (prow[c] - (j == pi ? A(1) : A(0)));
                const A sds = ds * (drow[c] * a * b);  // dS * s (0 where left out: ds = 0 there)
                row_acc += sds;
                csds[j * K + k] += sds;
                arow[c] = ds * a * b;
              }
              rsds[i * K + k] += row_acc;
            }
          }
          // Segment c of the gradients takes sum_{k >= c} A^k: suffix sums, last prefix first.
          for (int64_t k = K - 2; k >= 0; --k) {
            tile_view(a_buf[k], ni, nj).add_(tile_view(a_buf[k + 1], ni, nj));
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t lo = k == 0 ? 0 : dims[k - 1], width = dims[k] - lo;
            auto W = a_buf[k].narrow(0, 0, ni * nj).view({ni, nj});
            if (need_q) dq_parts[w].narrow(0, i0, ni).narrow(1, lo, width).addmm_(W, pb.narrow(1, lo, width));
            if (need_p) dp.narrow(0, j0, nj).narrow(1, lo, width).addmm_(W.t(), qb.narrow(1, lo, width));
          }
        }
      }
    }
  });
  // dq and dp stay in the accumulation dtype: the caller rounds them to the input dtype once, after
  // adding any further term (Matryoshka's chain rule through the prefix norms) in that precision.
  at::Tensor dq = need_q ? (workers == 1 ? dq_parts[0] : dq_parts.sum(0)) : at::empty({0}, acc_opts);
  if (!need_p) dp = at::empty({0}, acc_opts);
  at::Tensor row_sds = need_alpha ? (workers == 1 ? row_parts[0] : row_parts.sum(0)) : at::empty({0}, acc_opts);
  at::Tensor col_out = need_beta ? col_sds : at::empty({0}, acc_opts);
  return {dq, dp, row_sds, col_out};
}

Filter make_filter(c10::optional<double> margin, c10::optional<double> delta) {
  Filter f{margin.has_value(), delta.has_value(), margin.value_or(0.0), delta.value_or(0.0)};
  EC_CHECK(!f.has_margin || std::isfinite(f.margin), "false-negative margin must be finite, got ", f.margin);
  EC_CHECK(!f.has_delta || std::isfinite(f.delta), "false-negative delta must be finite, got ", f.delta);
  return f;
}

}  // namespace

std::vector<at::Tensor> prefix_contrastive_forward(const at::Tensor& q, const at::Tensor& p, const at::Tensor& alpha,
                                                   const at::Tensor& beta, const at::Tensor& positive_index,
                                                   const c10::optional<at::Tensor>& passage_ids, at::IntArrayRef dims,
                                                   c10::optional<double> margin, c10::optional<double> delta) {
  check_inputs(q, p, alpha, beta, positive_index, passage_ids, dims);
  const Filter filt = make_filter(margin, delta);
  const std::vector<int64_t> d(dims.begin(), dims.end());
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_contrastive_forward", [&] {
    out = forward_impl<scalar_t>(q, p, alpha, beta, positive_index, passage_ids, d, filt);
  });
  return out;
}

std::vector<at::Tensor> prefix_contrastive_backward(const at::Tensor& q, const at::Tensor& p, const at::Tensor& alpha,
                                                    const at::Tensor& beta, const at::Tensor& positive_index,
                                                    const c10::optional<at::Tensor>& passage_ids, const at::Tensor& lse,
                                                    const at::Tensor& s_pos, const at::Tensor& coef,
                                                    at::IntArrayRef dims, c10::optional<double> margin,
                                                    c10::optional<double> delta, bool need_q, bool need_p,
                                                    bool need_alpha, bool need_beta) {
  check_inputs(q, p, alpha, beta, positive_index, passage_ids, dims);
  const int64_t K = static_cast<int64_t>(dims.size());
  const auto acc = acc_scalar_type(q.scalar_type());
  auto check_row_state = [&](const at::Tensor& t, const char* name) {
    check_cpu_contiguous(t, name);
    EC_CHECK(t.scalar_type() == acc && t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == K, name,
             " must be [B, K] of the accumulation dtype, got ", t.scalar_type(), " ", t.sizes());
  };
  check_row_state(lse, "lse");
  check_row_state(s_pos, "s_pos");
  check_cpu_contiguous(coef, "coef");
  EC_CHECK(coef.scalar_type() == acc && coef.dim() == 1 && coef.size(0) == K,
           "coef must be [K] of the accumulation dtype, got ", coef.scalar_type(), " ", coef.sizes());
  const Filter filt = make_filter(margin, delta);
  const std::vector<int64_t> d(dims.begin(), dims.end());
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_contrastive_backward", [&] {
    out = backward_impl<scalar_t>(q, p, alpha, beta, positive_index, passage_ids, lse, s_pos, coef, d, filt, need_q,
                                  need_p, need_alpha, need_beta);
  });
  return out;
}

}  // namespace embedcore

TORCH_LIBRARY_FRAGMENT(embedcore, m) {
  m.def("prefix_contrastive_forward(Tensor q, Tensor p, Tensor alpha, Tensor beta, Tensor positive_index, "
        "Tensor? passage_ids, int[] dims, float? margin, float? delta) -> Tensor[]");
  m.def("prefix_contrastive_backward(Tensor q, Tensor p, Tensor alpha, Tensor beta, Tensor positive_index, "
        "Tensor? passage_ids, Tensor lse, Tensor s_pos, Tensor coef, int[] dims, float? margin, float? delta, "
        "bool need_q, bool need_p, bool need_alpha, bool need_beta) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(embedcore, CPU, m) {
  m.impl("prefix_contrastive_forward", &embedcore::prefix_contrastive_forward);
  m.impl("prefix_contrastive_backward", &embedcore::prefix_contrastive_backward);
}
