// maxsim_contrastive_loss and maxsim_scores on CPU: late-interaction (ColBERT) InfoNCE tile by
// tile, never a [B, P, Lq, Lp] tensor (see embedcore/ops/maxsim.py for the maths and the tie rule).
//
// A tile is a block of whole queries (rows: their Lq tokens) against a block of whole passages
// (columns: their Lp tokens), at most about 256 x 1024 fp32 = 1 MiB, filled by a single-threaded
// GEMM (at::mm_out) into a reusable per-worker buffer. Per (query token, passage) the masked max
// over the passage's Lp contiguous columns (AVX2 when the CPU has it: this file is compiled without
// -mavx2, so the SIMD paths carry a target attribute and are picked at run time), summed over the
// real query tokens, gives S[b, j].
//
// Forward (threads own query blocks): each worker keeps the S rows of its current query block
// ([<=256 / Lq, P] fp32), then per query: lse over the non-excluded passages, the row loss and the
// rank, read off that row (so the rank compares exactly the values the lse used).
// Backward (threads own passage blocks, so dp rows are written without sharing; dq goes to one
// [B, Lq, D] fp32 partial per worker, summed at the end): recompute the tile, the first argmax
// t* per (query token, passage) and S, form dS = scale * (exp(S/T - lse) [kept] - [j == pos]),
// then dq[b, i] += dS p[j, t*] and dp[j, t*] += dS q[b, i]: D-long axpys, no second GEMM (the
// scatter is Lp times cheaper than the dense product with a one-hot matrix).
// Extra memory: one tile, the block buffers (for bf16/fp16 inputs: the block converted to fp32),
// a [<=256/Lq, P] score block per worker in the forward; in the backward one dq partial per worker
// (and, for bf16/fp16 inputs, the fp32 dp accumulator before its conversion).
#include "common.h"
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

namespace embedcore {

namespace {

constexpr int64_t kTileRows = 256;   // query tokens per tile (at least one whole query)
constexpr int64_t kTileCols = 1024;  // passage tokens per tile (at least one whole passage)

// ---- masked max / first argmax over one passage's Lp similarities ------------------------------
// keep[t] is -1 (all bits) for a real token, 0 for padding: padding never reaches the max, whatever
// its value. A passage without real tokens gives -inf and index -1.

template <typename A>
A masked_max_scalar(const A* x, const int32_t* keep, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t t = 0; t < n; ++t)
    if (keep[t] && x[t] > m) m = x[t];
  return m;
}

template <typename A>
int64_t masked_argmax_scalar(const A* x, const int32_t* keep, int64_t n, A* max_out) {
  A m = -std::numeric_limits<A>::infinity();
  int64_t best = -1;
  for (int64_t t = 0; t < n; ++t)
    if (keep[t] && (best < 0 || x[t] > m)) { m = x[t]; best = t; }  // strict >: the first max wins
  *max_out = m;
  return best;
}

__attribute__((target("avx2"))) float masked_max_avx2(const float* x, const int32_t* keep, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = ninf;
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 k = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + t)));
    m = _mm256_max_ps(m, _mm256_blendv_ps(ninf, _mm256_loadu_ps(x + t), k));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int l = 1; l < 8; ++l) r = std::max(r, lanes[l]);
  for (; t < n; ++t)
    if (keep[t] && x[t] > r) r = x[t];
  return r;
}

// Per lane: the running max and the index of its first occurrence (strict >); across lanes the
// smallest index among those holding the max, so the overall first max in token order.
__attribute__((target("avx2"))) int64_t masked_argmax_avx2(const float* x, const int32_t* keep, int64_t n,
                                                            float* max_out) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = ninf;
  __m256i idx = _mm256_set1_epi32(-1);
  __m256i cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 k = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + t)));
    const __m256 v = _mm256_loadu_ps(x + t);
    // a real token beats the lane when it is greater, or when the lane has none yet
    const __m256i none = _mm256_cmpeq_epi32(idx, _mm256_set1_epi32(-1));
    const __m256 gt = _mm256_and_ps(k, _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_castsi256_ps(none)));
    m = _mm256_blendv_ps(m, v, gt);
    idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(cur), gt));
    cur = _mm256_add_epi32(cur, step);
  }
  alignas(32) float lm[8];
  alignas(32) int32_t li[8];
  _mm256_store_ps(lm, m);
  _mm256_store_si256(reinterpret_cast<__m256i*>(li), idx);
  float r = -std::numeric_limits<float>::infinity();
  int64_t best = -1;
  for (int l = 0; l < 8; ++l) {
    if (li[l] < 0) continue;
    if (best < 0 || lm[l] > r || (lm[l] == r && li[l] < best)) { r = lm[l]; best = li[l]; }
  }
  for (; t < n; ++t)
    if (keep[t] && (best < 0 || x[t] > r)) { r = x[t]; best = t; }
  *max_out = r;
  return best;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");

template <typename A>
A masked_max(const A* x, const int32_t* keep, int64_t n) {
  if constexpr (std::is_same_v<A, float>)
    if (kHasAvx2) return masked_max_avx2(x, keep, n);
  return masked_max_scalar(x, keep, n);
}

template <typename A>
int64_t masked_argmax(const A* x, const int32_t* keep, int64_t n, A* max_out) {
  if constexpr (std::is_same_v<A, float>)
    if (kHasAvx2) return masked_argmax_avx2(x, keep, n, max_out);
  return masked_argmax_scalar(x, keep, n, max_out);
}

// ---- shared pieces ------------------------------------------------------------------------------

struct Shapes {
  int64_t B, Lq, P, Lp, D;
};

Shapes check_tokens(const at::Tensor& q, const at::Tensor& qm, const at::Tensor& p, const at::Tensor& pm) {
  check_cpu_contiguous(q, "q_tok");
  check_cpu_contiguous(p, "p_tok");
  check_cpu_contiguous(qm, "q_mask");
  check_cpu_contiguous(pm, "p_mask");
  EC_CHECK(q.dim() == 3 && p.dim() == 3 && q.size(2) == p.size(2), "q_tok must be [B, Lq, D] and p_tok [P, Lp, D], got ",
           q.sizes(), " and ", p.sizes());
  EC_CHECK(q.scalar_type() == p.scalar_type(), "q_tok and p_tok must share a dtype, got ", q.scalar_type(), " and ",
           p.scalar_type());
  EC_CHECK(qm.scalar_type() == at::kBool && qm.dim() == 2 && qm.size(0) == q.size(0) && qm.size(1) == q.size(1),
           "q_mask must be bool [B, Lq] = ", q.sizes().slice(0, 2), ", got ", qm.scalar_type(), " ", qm.sizes());
  EC_CHECK(pm.scalar_type() == at::kBool && pm.dim() == 2 && pm.size(0) == p.size(0) && pm.size(1) == p.size(1),
           "p_mask must be bool [P, Lp] = ", p.sizes().slice(0, 2), ", got ", pm.scalar_type(), " ", pm.sizes());
  EC_CHECK(q.numel() > 0 && p.numel() > 0, "q_tok and p_tok must be non-empty, got ", q.sizes(), " and ", p.sizes());
  return {q.size(0), q.size(1), p.size(0), p.size(1), q.size(2)};
}

// The keep mask (0 / -1 per token) of passages [j0, j0 + nj), and whether each has a real token.
void passage_block_mask(const bool* pm, int64_t j0, int64_t nj, int64_t Lp, std::vector<int32_t>& keep,
                        std::vector<char>& has) {
  for (int64_t c = 0; c < nj; ++c) {
    bool any = false;
    for (int64_t t = 0; t < Lp; ++t) {
      const bool real = pm[(j0 + c) * Lp + t];
      keep[c * Lp + t] = real ? -1 : 0;
      any |= real;
    }
    has[c] = any;
  }
}

// Per-worker buffers of the tile loops.
struct Work {
  at::Tensor tile, q_buf, p_buf;
  std::vector<int32_t> keep;
  std::vector<char> has;
  Work(const at::Tensor& q, const at::Tensor& p, const at::TensorOptions& acc, int64_t rows, int64_t cols, int64_t D)
      : tile(at::empty({rows * cols}, acc)), q_buf(conversion_buffer(q, rows * D, acc)),
        p_buf(conversion_buffer(p, cols * D, acc)), keep(cols), has(cols) {}
};

// Tile sizes: whole queries and whole passages, about kTileRows x kTileCols tokens.
int64_t queries_per_tile(const Shapes& s) { return std::max<int64_t>(1, std::min(s.B, kTileRows / s.Lq)); }
int64_t passages_per_tile(const Shapes& s) { return std::max<int64_t>(1, std::min(s.P, kTileCols / s.Lp)); }

// S[b, j] for queries [i0, i0 + ni) against every passage, into out (row stride P).
template <typename A>
void score_rows(const at::Tensor& q2d, const bool* qm, const at::Tensor& p2d, const bool* pm, const Shapes& s,
                int64_t i0, int64_t ni, int64_t bp, Work& w, A* out) {
  const int64_t Lq = s.Lq, Lp = s.Lp;
  auto qb = rows_in_acc(q2d, i0 * Lq, ni * Lq, w.q_buf);
  for (int64_t j0 = 0; j0 < s.P; j0 += bp) {
    const int64_t nj = std::min(bp, s.P - j0), cols = nj * Lp;
    auto pb = rows_in_acc(p2d, j0 * Lp, cols, w.p_buf);
    auto S = w.tile.narrow(0, 0, ni * Lq * cols).view({ni * Lq, cols});
    at::mm_out(S, qb, pb.t());  // single-threaded inside the parallel region
    passage_block_mask(pm, j0, nj, Lp, w.keep, w.has);
    const A* sim = S.data_ptr<A>();
    for (int64_t r = 0; r < ni; ++r) {
      const bool* qmr = qm + (i0 + r) * Lq;
      for (int64_t c = 0; c < nj; ++c) {
        A score = 0;
        if (w.has[c])
          for (int64_t i = 0; i < Lq; ++i)
            if (qmr[i]) score += masked_max<A>(sim + (r * Lq + i) * cols + c * Lp, w.keep.data() + c * Lp, Lp);
        out[r * s.P + j0 + c] = score;
      }
    }
  }
}

template <typename scalar_t>
at::Tensor scores_impl(const at::Tensor& q, const at::Tensor& qm, const at::Tensor& p, const at::Tensor& pm,
                       const Shapes& s) {
  using A = acc_t<scalar_t>;
  const auto acc = q.options().dtype(acc_scalar_type(q.scalar_type()));
  auto out = at::empty({s.B, s.P}, acc);
  const auto q2d = q.view({s.B * s.Lq, s.D}), p2d = p.view({s.P * s.Lp, s.D});
  const int64_t bq = std::max<int64_t>(1, std::min(queries_per_tile(s), ceil_div(s.B, at::get_num_threads())));
  const int64_t bp = passages_per_tile(s);
  A* o = out.data_ptr<A>();
  at::parallel_for(0, ceil_div(s.B, bq), 1, [&](int64_t blk0, int64_t blk1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: OpenMP workers do not inherit the caller's
    Work w(q, p, acc, bq * s.Lq, bp * s.Lp, s.D);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * bq;
      score_rows<A>(q2d, qm.data_ptr<bool>(), p2d, pm.data_ptr<bool>(), s, i0, std::min(bq, s.B - i0), bp, w,
                    o + i0 * s.P);
    }
  });
  return out;
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& qm, const at::Tensor& p,
                                     const at::Tensor& pm, const Shapes& s, const at::Tensor& pos_t,
                                     const c10::optional<at::Tensor>& ids_t, double inv_temperature) {
  using A = acc_t<scalar_t>;
  const auto acc = q.options().dtype(acc_scalar_type(q.scalar_type()));
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* ids = ids_t.has_value() ? ids_t->data_ptr<int64_t>() : nullptr;
  const A inv_t = static_cast<A>(inv_temperature);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  auto lse = at::empty({s.B}, acc), row_loss = at::empty({s.B}, acc);
  auto ranks = at::empty({s.B}, q.options().dtype(at::kLong));
  A* l = lse.data_ptr<A>();
  A* rl = row_loss.data_ptr<A>();
  int64_t* rk = ranks.data_ptr<int64_t>();
  const auto q2d = q.view({s.B * s.Lq, s.D}), p2d = p.view({s.P * s.Lp, s.D});
  const int64_t bq = std::max<int64_t>(1, std::min(queries_per_tile(s), ceil_div(s.B, at::get_num_threads())));
  const int64_t bp = passages_per_tile(s);

  at::parallel_for(0, ceil_div(s.B, bq), 1, [&](int64_t blk0, int64_t blk1) {
    at::NoGradGuard no_grad;
    Work w(q, p, acc, bq * s.Lq, bp * s.Lp, s.D);
    std::vector<A> rows(bq * s.P);  // the S rows of the current query block
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * bq, ni = std::min(bq, s.B - i0);
      score_rows<A>(q2d, qm.data_ptr<bool>(), p2d, pm.data_ptr<bool>(), s, i0, ni, bp, w, rows.data());
      for (int64_t r = 0; r < ni; ++r) {
        const int64_t b = i0 + r, pb = pos[b];
        const int64_t pid = ids ? ids[pb] : 0;
        A* row = rows.data() + r * s.P;
        const A sp = row[pb] * inv_t;
        A m = neg_inf;
        int64_t beaten = 0;
        for (int64_t j = 0; j < s.P; ++j) {
          if (ids && j != pb && ids[j] == pid) {  // a copy of the positive: not a negative
            row[j] = neg_inf;
            continue;
          }
          const A v = row[j] * inv_t;
          row[j] = v;
          m = std::max(m, v);
          beaten += (v > sp && j != pb);
        }
        A sum = 0;
        for (int64_t j = 0; j < s.P; ++j) sum += std::exp(row[j] - m);  // exp(-inf) = 0 for excluded
        l[b] = m + std::log(sum);  // the positive is never excluded: sum >= its term
        rl[b] = l[b] - sp;
        rk[b] = 1 + beaten;
      }
    }
  });
  return {lse, row_loss, ranks};
}

template <typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& qm_t, const at::Tensor& p,
                                      const at::Tensor& pm_t, const Shapes& s, const at::Tensor& pos_t,
                                      const c10::optional<at::Tensor>& ids_t, const at::Tensor& lse_t, double scale_d,
                                      double inv_temperature, bool need_q, bool need_p) {
  using A = acc_t<scalar_t>;
  const auto acc = q.options().dtype(acc_scalar_type(q.scalar_type()));
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* ids = ids_t.has_value() ? ids_t->data_ptr<int64_t>() : nullptr;
  const A* lse = lse_t.data_ptr<A>();
  const bool* qm = qm_t.data_ptr<bool>();
  const bool* pm = pm_t.data_ptr<bool>();
  const A inv_t = static_cast<A>(inv_temperature), scale = static_cast<A>(scale_d);
  const int64_t Lq = s.Lq, Lp = s.Lp, D = s.D;
  const auto q2d = q.view({s.B * Lq, D}), p2d = p.view({s.P * Lp, D});

  const int64_t bq = queries_per_tile(s);
  const int64_t bp = std::max<int64_t>(1, std::min(passages_per_tile(s), ceil_div(s.P, at::get_num_threads())));
  const int64_t n_pblocks = ceil_div(s.P, bp);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_pblocks);
  auto dq_parts = need_q ? at::zeros({workers, s.B * Lq, D}, acc) : at::empty({0}, acc);
  auto dp = need_p ? at::zeros({s.P * Lp, D}, acc) : at::empty({0}, acc);
  A* dpd = need_p ? dp.data_ptr<A>() : nullptr;

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::NoGradGuard no_grad;
    Work w(q, p, acc, bq * Lq, bp * Lp, D);
    std::vector<int64_t> targ(Lq);  // t* of each query token, for the current (query, passage)
    for (int64_t wk = w0; wk < w1; ++wk) {
      A* dqd = need_q ? dq_parts[wk].data_ptr<A>() : nullptr;
      for (int64_t blk = wk; blk < n_pblocks; blk += workers) {  // strided: balanced ragged ends
        const int64_t j0 = blk * bp, nj = std::min(bp, s.P - j0), cols = nj * Lp;
        auto pb = rows_in_acc(p2d, j0 * Lp, cols, w.p_buf);
        const A* pbd = pb.data_ptr<A>();
        passage_block_mask(pm, j0, nj, Lp, w.keep, w.has);
        for (int64_t i0 = 0; i0 < s.B; i0 += bq) {
          const int64_t ni = std::min(bq, s.B - i0);
          auto qb = rows_in_acc(q2d, i0 * Lq, ni * Lq, w.q_buf);
          const A* qbd = qb.data_ptr<A>();
          auto S = w.tile.narrow(0, 0, ni * Lq * cols).view({ni * Lq, cols});
          at::mm_out(S, qb, pb.t());
          const A* sim = S.data_ptr<A>();
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t b = i0 + r, pi = pos[b];
            const int64_t pid = ids ? ids[pi] : 0;
            const bool* qmr = qm + b * Lq;
            for (int64_t c = 0; c < nj; ++c) {
              const int64_t j = j0 + c;
              if (!w.has[c]) continue;                          // S[b, j] = 0 whatever the inputs
              if (ids && j != pi && ids[j] == pid) continue;    // excluded: dS = 0
              A score = 0;
              for (int64_t i = 0; i < Lq; ++i) {
                if (!qmr[i]) continue;
                A mx;
                targ[i] = masked_argmax<A>(sim + (r * Lq + i) * cols + c * Lp, w.keep.data() + c * Lp, Lp, &mx);
                score += mx;
              }
              const A ds = scale * (std::exp(score * inv_t - lse[b]) - (j == pi ? A(1) : A(0)));
              if (ds == A(0)) continue;
              for (int64_t i = 0; i < Lq; ++i) {
                if (!qmr[i]) continue;
                const int64_t t = c * Lp + targ[i];  // column of t* within the block
                if (need_q) {
                  A* dst = dqd + (b * Lq + i) * D;
                  const A* src = pbd + t * D;
                  for (int64_t d = 0; d < D; ++d) dst[d] += ds * src[d];
                }
                if (need_p) {
                  A* dst = dpd + (j0 * Lp + t) * D;
                  const A* src = qbd + (r * Lq + i) * D;
                  for (int64_t d = 0; d < D; ++d) dst[d] += ds * src[d];
                }
              }
            }
          }
        }
      }
    }
  });
  at::Tensor dq = at::empty({0}, q.options()), dpo = at::empty({0}, p.options());
  if (need_q) {
    dq = (workers == 1 ? dq_parts[0] : dq_parts.sum(0)).view({s.B, Lq, D});
    if (dq.scalar_type() != q.scalar_type()) dq = dq.to(q.scalar_type());
  }
  if (need_p) {
    dpo = dp.view({s.P, Lp, D});
    if (dpo.scalar_type() != p.scalar_type()) dpo = dpo.to(p.scalar_type());
  }
  return {dq, dpo};
}

}  // namespace

at::Tensor maxsim_scores(const at::Tensor& q, const at::Tensor& q_mask, const at::Tensor& p, const at::Tensor& p_mask) {
  const Shapes s = check_tokens(q, q_mask, p, p_mask);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "maxsim_scores", [&] {
    out = scores_impl<scalar_t>(q, q_mask, p, p_mask, s);
  });
  return out;
}

std::vector<at::Tensor> maxsim_forward(const at::Tensor& q, const at::Tensor& q_mask, const at::Tensor& p,
                                       const at::Tensor& p_mask, const at::Tensor& positive_index,
                                       const c10::optional<at::Tensor>& passage_ids, double inv_temperature) {
  const Shapes s = check_tokens(q, q_mask, p, p_mask);
  check_layout(positive_index, passage_ids, s.B, s.P);
  EC_CHECK(inv_temperature > 0 && std::isfinite(inv_temperature), "1 / temperature must be finite and > 0, got ",
           inv_temperature);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "maxsim_forward", [&] {
    out = forward_impl<scalar_t>(q, q_mask, p, p_mask, s, positive_index, passage_ids, inv_temperature);
  });
  return out;
}

std::vector<at::Tensor> maxsim_backward(const at::Tensor& q, const at::Tensor& q_mask, const at::Tensor& p,
                                        const at::Tensor& p_mask, const at::Tensor& positive_index,
                                        const c10::optional<at::Tensor>& passage_ids, const at::Tensor& lse,
                                        double scale, double inv_temperature, bool need_q, bool need_p) {
  const Shapes s = check_tokens(q, q_mask, p, p_mask);
  check_layout(positive_index, passage_ids, s.B, s.P);
  check_cpu_contiguous(lse, "lse");
  EC_CHECK(lse.dim() == 1 && lse.size(0) == s.B && lse.scalar_type() == acc_scalar_type(q.scalar_type()),
           "lse must be [B] of the accumulation dtype, got ", lse.scalar_type(), " ", lse.sizes());
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "maxsim_backward", [&] {
    out = backward_impl<scalar_t>(q, q_mask, p, p_mask, s, positive_index, passage_ids, lse, scale, inv_temperature,
                                  need_q, need_p);
  });
  return out;
}

}  // namespace embedcore

TORCH_LIBRARY_FRAGMENT(embedcore, m) {
  m.def("maxsim_scores(Tensor q_tok, Tensor q_mask, Tensor p_tok, Tensor p_mask) -> Tensor");
  m.def("maxsim_forward(Tensor q_tok, Tensor q_mask, Tensor p_tok, Tensor p_mask, Tensor positive_index, "
        "Tensor? passage_ids, float inv_temperature) -> Tensor[]");
  m.def("maxsim_backward(Tensor q_tok, Tensor q_mask, Tensor p_tok, Tensor p_mask, Tensor positive_index, "
        "Tensor? passage_ids, Tensor lse, float scale, float inv_temperature, bool need_q, bool need_p) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(embedcore, CPU, m) {
  m.impl("maxsim_scores", &embedcore::maxsim_scores);
  m.impl("maxsim_forward", &embedcore::maxsim_forward);
  m.impl("maxsim_backward", &embedcore::maxsim_backward);
}
