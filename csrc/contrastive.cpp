// contrastive_loss on CPU: InfoNCE tile by tile, never a [B, P] tensor (see
// embedcore/ops/contrastive.py for the maths). One at::parallel_for per pass: each worker
// owns whole blocks (query blocks in the forward, passage blocks in the backward) and pushes
// its [<=256, <=1024] score tiles through a single-threaded GEMM (at::mm_out) into its own
// reusable buffer. The per-row work (scale, mask, online log-sum-exp, rank counts) is a plain
// loop; exp runs as at::exp_ on the whole tile (ATen's runtime-dispatched vectorised kernel:
// this file is compiled without -mavx2, so a hand loop would stay scalar).
// Extra memory: one tile (<= 1 MiB fp32) per worker (plus two block buffers for bf16/fp16), O(B) row state,
// and in the backward one [B, D] fp32 dq partial per worker.
//
// Forward:  s = q p^T / T per tile; per row i an online lse over the non-excluded columns
//           (m_i = running max, l_i = sum exp(s - m_i)) and the count of columns beating s_pos.
// Backward: dS = scale * (exp(s - lse_i) [j not excluded] - [j == pos(i)]), scale = g / (B T);
//           dq += dS p_blk, dp_blk += dS^T q_blk (addmm_ into fp32 accumulators).
// bf16/fp16 inputs: each block is converted to fp32 into a small buffer before its GEMM.
#include "common.h"
#include <cmath>
#include <limits>
#include <vector>

namespace embedcore {

namespace {

constexpr int64_t kTileQ = 256;   // query rows per tile
constexpr int64_t kTileP = 1024;  // passage columns per tile: 256 x 1024 fp32 = 1 MiB, about one L2

void check_inputs(const at::Tensor& q, const at::Tensor& p, const at::Tensor& pos,
                  const c10::optional<at::Tensor>& ids) {
  check_cpu_contiguous(q, "q");
  check_cpu_contiguous(p, "p");
  EC_CHECK(q.dim() == 2 && p.dim() == 2 && q.size(1) == p.size(1), "q must be [B, D] and p [P, D], got ",
           q.sizes(), " and ", p.sizes());
  EC_CHECK(q.scalar_type() == p.scalar_type(), "q and p must share a dtype, got ", q.scalar_type(), " and ",
           p.scalar_type());
  check_layout(pos, ids, q.size(0), p.size(0));
}

// s_pos[i] = <q_i, p_pos(i)> / T in the accumulation dtype.
template <typename scalar_t, typename A>
std::vector<A> positive_scores(const at::Tensor& q, const at::Tensor& p, const int64_t* pos, A inv_t) {
  const int64_t B = q.size(0), D = q.size(1);
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* pd = p.data_ptr<scalar_t>();
  std::vector<A> s_pos(B);
  at::parallel_for(0, B, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      A acc = 0;
      const scalar_t* qr = qd + i * D;
      const scalar_t* pr = pd + pos[i] * D;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<A>(qr[d]) * static_cast<A>(pr[d]);
      s_pos[i] = acc * inv_t;
    }
  });
  return s_pos;
}

// One row of a fresh score tile in the forward: scale by 1/T, mask copies of the positive
// (-inf), count the columns beating the positive, fold the tile max into the running max and
// shift the row by it (so that exp(row) adds straight onto the rescaled running sum).
template <typename A>
void forward_row(A* row, int64_t nj, int64_t j0, int64_t pi, const int64_t* ids, int64_t pid, A sp, A inv_t,
                 A& run_max, A& run_sum, int64_t& beaten) {
  const A neg_inf = -std::numeric_limits<A>::infinity();
  A tmax = neg_inf;
  int64_t count = 0;
  for (int64_t c = 0; c < nj; ++c) {
    const int64_t j = j0 + c;
    if (ids && j != pi && ids[j] == pid) {  // a copy of the positive: not a negative
      row[c] = neg_inf;
      continue;
    }
    const A v = row[c] * inv_t;
    row[c] = v;
    tmax = std::max(tmax, v);
    count += (v > sp && j != pi);
  }
  beaten += count;
  const A m_new = std::max(run_max, tmax);
  if (m_new == neg_inf) return;  // nothing counted yet for this row: its exp(-inf) adds 0
  run_sum *= std::exp(run_max - m_new);
  run_max = m_new;
  for (int64_t c = 0; c < nj; ++c) row[c] -= m_new;
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& p, const at::Tensor& pos_t,
                                     const c10::optional<at::Tensor>& ids_t, double inv_temperature) {
  using A = acc_t<scalar_t>;
  const int64_t B = q.size(0), P = p.size(0), D = q.size(1);
  const auto acc_opts = q.options().dtype(acc_scalar_type(q.scalar_type()));
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* ids = ids_t.has_value() ? ids_t->data_ptr<int64_t>() : nullptr;
  const A inv_t = static_cast<A>(inv_temperature);

  const std::vector<A> s_pos = positive_scores<scalar_t, A>(q, p, pos, inv_t);
  std::vector<A> run_max(B, -std::numeric_limits<A>::infinity()), run_sum(B, A(0));
  std::vector<int64_t> beaten(B, 0);  // columns scoring strictly above the positive

  // Threads own query blocks (rows of the online state), so one parallel region covers the
  // whole pass and nothing is shared: no per-tile barriers (which cost dearly on a busy CPU).
  const int64_t bq = std::max<int64_t>(1, std::min(kTileQ, ceil_div(B, at::get_num_threads())));
  at::parallel_for(0, ceil_div(B, bq), 1, [&](int64_t blk0, int64_t blk1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: OpenMP workers do not inherit the caller's
    auto tile_buf = at::empty({bq * std::min(P, kTileP)}, acc_opts);
    auto q_buf = conversion_buffer(q, bq * D, acc_opts);
    auto p_buf = conversion_buffer(p, std::min(P, kTileP) * D, acc_opts);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * bq, ni = std::min(bq, B - i0);
      auto qb = rows_in_acc(q, i0, ni, q_buf);
      for (int64_t j0 = 0; j0 < P; j0 += kTileP) {
        const int64_t nj = std::min(kTileP, P - j0);
        auto pb = rows_in_acc(p, j0, nj, p_buf);
        auto S = tile_view(tile_buf, ni, nj);
        at::mm_out(S, qb, pb.t());  // single-threaded inside the parallel region
        A* s = S.data_ptr<A>();
        for (int64_t r = 0; r < ni; ++r) {
          const int64_t i = i0 + r;
          forward_row<A>(s + r * nj, nj, j0, pos[i], ids, ids ? ids[pos[i]] : 0, s_pos[i], inv_t, run_max[i],
                         run_sum[i], beaten[i]);
        }
        at::exp_(S);
        auto tile_sums = S.sum(1);
        const A* ts = tile_sums.data_ptr<A>();
        for (int64_t r = 0; r < ni; ++r) run_sum[i0 + r] += ts[r];
      }
    }
  });

  auto lse = at::empty({B}, acc_opts);
  auto row_loss = at::empty({B}, acc_opts);
  auto ranks = at::empty({B}, q.options().dtype(at::kLong));
  A* l = lse.data_ptr<A>();
  A* rl = row_loss.data_ptr<A>();
  int64_t* rk = ranks.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    l[i] = run_max[i] + std::log(run_sum[i]);  // the positive is never masked: run_sum >= its term
    rl[i] = l[i] - s_pos[i];
    rk[i] = 1 + beaten[i];
  }
  return {lse, row_loss, ranks};
}

template <typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& p, const at::Tensor& pos_t,
                                      const c10::optional<at::Tensor>& ids_t, const at::Tensor& lse_t,
                                      double scale, double inv_temperature, bool need_q, bool need_p) {
  using A = acc_t<scalar_t>;
  const int64_t B = q.size(0), P = p.size(0), D = q.size(1);
  const auto acc_opts = q.options().dtype(acc_scalar_type(q.scalar_type()));
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* ids = ids_t.has_value() ? ids_t->data_ptr<int64_t>() : nullptr;
  const A* lse = lse_t.data_ptr<A>();
  const A inv_t = static_cast<A>(inv_temperature);
  const A neg_inf = -std::numeric_limits<A>::infinity();

  // Threads own passage blocks (rows of dp, written without sharing); dq, whose rows every
  // passage block touches, goes to one [B, D] fp32 partial per worker, summed at the end:
  // workers x B x D extra, small next to B x P since P = B x (1 + negatives). 4 GEMM-sized
  // passes in all (forward S; backward S, dS p, dS^T q), one parallel region per pass.
  const int64_t bp = std::max<int64_t>(1, std::min(kTileP, ceil_div(P, at::get_num_threads())));
  const int64_t n_pblocks = ceil_div(P, bp);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_pblocks);
  auto dq_parts = need_q ? at::zeros({workers, B, D}, acc_opts) : at::empty({0}, acc_opts);
  auto dp = need_p ? at::zeros({P, D}, acc_opts) : at::empty({0}, acc_opts);

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::NoGradGuard no_grad;
    auto tile_buf = at::empty({std::min(B, kTileQ) * bp}, acc_opts);
    auto q_buf = conversion_buffer(q, std::min(B, kTileQ) * D, acc_opts);
    auto p_buf = conversion_buffer(p, bp * D, acc_opts);
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t blk = w; blk < n_pblocks; blk += workers) {  // strided: balanced ragged ends
        const int64_t j0 = blk * bp, nj = std::min(bp, P - j0);
        auto pb = rows_in_acc(p, j0, nj, p_buf);
        for (int64_t i0 = 0; i0 < B; i0 += kTileQ) {
          const int64_t ni = std::min(kTileQ, B - i0);
          auto qb = rows_in_acc(q, i0, ni, q_buf);
          auto S = tile_view(tile_buf, ni, nj);
          at::mm_out(S, qb, pb.t());
          A* s = S.data_ptr<A>();
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t i = i0 + r, pi = pos[i];
            const int64_t pid = ids ? ids[pi] : 0;
            const A li = lse[i];
            A* row = s + r * nj;
            for (int64_t c = 0; c < nj; ++c) {
              const int64_t j = j0 + c;
              row[c] = (ids && j != pi && ids[j] == pid) ? neg_inf : row[c] * inv_t - li;
            }
          }
          at::exp_(S);  // softmax, 0 on excluded columns
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t c = pos[i0 + r] - j0;
            if (c >= 0 && c < nj) s[r * nj + c] -= A(1);  // minus the one-hot of the positive
          }
          if (need_q) dq_parts[w].narrow(0, i0, ni).addmm_(S, pb, 1, scale);
          if (need_p) dp.narrow(0, j0, nj).addmm_(S.t(), qb, 1, scale);
        }
      }
    }
  });
  at::Tensor dq = need_q ? (workers == 1 ? dq_parts[0] : dq_parts.sum(0)) : at::empty({0}, q.options());
  if (need_q && dq.scalar_type() != q.scalar_type()) dq = dq.to(q.scalar_type());
  if (need_p && dp.scalar_type() != p.scalar_type()) dp = dp.to(p.scalar_type());
  if (!need_p) dp = at::empty({0}, p.options());
  return {dq, dp};
}

}  // namespace

std::vector<at::Tensor> contrastive_forward(const at::Tensor& q, const at::Tensor& p, const at::Tensor& positive_index,
                                            const c10::optional<at::Tensor>& passage_ids, double inv_temperature) {
  check_inputs(q, p, positive_index, passage_ids);
  EC_CHECK(inv_temperature > 0 && std::isfinite(inv_temperature), "1 / temperature must be finite and > 0, got ",
           inv_temperature);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "contrastive_forward", [&] {
    out = forward_impl<scalar_t>(q, p, positive_index, passage_ids, inv_temperature);
  });
  return out;
}

std::vector<at::Tensor> contrastive_backward(const at::Tensor& q, const at::Tensor& p, const at::Tensor& positive_index,
                                             const c10::optional<at::Tensor>& passage_ids, const at::Tensor& lse,
                                             double scale, double inv_temperature, bool need_q, bool need_p) {
  check_inputs(q, p, positive_index, passage_ids);
  check_cpu_contiguous(lse, "lse");
  EC_CHECK(lse.dim() == 1 && lse.size(0) == q.size(0) && lse.scalar_type() == acc_scalar_type(q.scalar_type()),
           "lse must be [B] of the accumulation dtype, got ", lse.scalar_type(), " ", lse.sizes());
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "contrastive_backward", [&] {
    out = backward_impl<scalar_t>(q, p, positive_index, passage_ids, lse, scale, inv_temperature, need_q, need_p);
  });
  return out;
}

}  // namespace embedcore

TORCH_LIBRARY_FRAGMENT(embedcore, m) {
  m.def("contrastive_forward(Tensor q, Tensor p, Tensor positive_index, Tensor? passage_ids, float inv_temperature) -> Tensor[]");
  m.def("contrastive_backward(Tensor q, Tensor p, Tensor positive_index, Tensor? passage_ids, Tensor lse, float scale, "
        "float inv_temperature, bool need_q, bool need_p) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(embedcore, CPU, m) {
  m.impl("contrastive_forward", &embedcore::contrastive_forward);
  m.impl("contrastive_backward", &embedcore::contrastive_backward);
}
