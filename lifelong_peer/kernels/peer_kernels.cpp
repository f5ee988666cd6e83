// Native CPU kernels for the PEER layer (issue 8); loaded by lifelong_peer/kernels/__init__.py and
// wrapped in autograd Functions by lifelong_peer/peer_ops.py, which documents the maths. fp32 and fp64.
//
// * pk_topk / pk_topk_backward: product-key top-k. Sub-key scores are computed per block of rows
//   (a GEMM into a buffer that stays in cache) and each row's top-k is found by *filtering* (row_topk):
//   block maxima give a lower bound of the k-th best score, and only the few scores above it are
//   sorted — about n compares per row instead of torch.topk's selection.
//   Then the pruned grid ((a+1)(b+1) <= k) gives the exact top-k of the n² sums. pk_topk_shell does the
//   same over a grown generation's experts (two rectangular grids), with the same backward.
// * mix_forward / mix_backward: y_t = Σ_s g_ts σ(u_e · x_t) v_e over (token, slot) entries sorted by
//   expert id e, so each retrieved row of U and V is read once per pass (x, y, dy, dx — T × dim — stay
//   in cache). The backward is one fused pass producing dx, dgates and compact dU/dV rows.
//
// Threads: work is split into a fixed number of chunks (one per thread) whose partial sums are added in
// chunk order, so results are deterministic for a given thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <type_traits>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

template <typename T>
struct Item {
  T v;
  int64_t i;
};

// "a before b": higher score first, ties to the lower index.
struct Better {
  template <typename T>
  bool operator()(const Item<T>& a, const Item<T>& b) const {
    return a.v > b.v || (a.v == b.v && a.i < b.i);
  }
};

// Candidates (values cv, indices ci) → the k best into out[0..k), best first; out[k] is scratch. Up to
// kRankMax candidates by rank counting: each candidate's rank is the number of candidates better than
// it (branch-free compares the compiler vectorises; ranks are distinct through the index tie-break),
// and it is stored at out[min(rank, k)] — a sort without the mispredicted branches of a comparison
// sort (2.6 → 1.0 µs per row of 256 scores, k = 16, including the grid).
constexpr int64_t kRankMax = 128;

template <typename T>
void best_k(const T* cv, const int32_t* ci, int64_t c, int64_t k, Item<T>* out) {
  if (c > kRankMax) {  // degenerate rows (many equal scores): a plain partial sort
    std::vector<Item<T>> all(c);
    for (int64_t a = 0; a < c; ++a) all[a] = {cv[a], ci[a]};
    std::partial_sort(all.begin(), all.begin() + k, all.end(), Better());
    std::copy(all.begin(), all.begin() + k, out);
    return;
  }
  // NaN scores compare false both ways, so their ranks collide and leave slots unwritten: start every
  // slot at a real candidate, so that ids stay valid (and the output NaN) instead of garbage
  std::fill(out, out + k + 1, Item<T>{cv[0], ci[0]});
  for (int64_t a = 0; a < c; ++a) {
    const T va = cv[a];
    const int32_t ia = ci[a];
    int32_t rank = 0;
    for (int64_t b = 0; b < c; ++b) rank += (cv[b] > va) | ((cv[b] == va) & (ci[b] < ia));
    out[std::min<int64_t>(rank, k)] = {va, ia};  // the losers all land in out[k]
  }
}

// Per-thread buffers of row_topk for rows of n scores, k best.
template <typename T>
struct TopkScratch {
  std::vector<T> cv, lane;
  std::vector<int32_t> ci, lane_i;
  std::vector<Item<T>> kth;
  TopkScratch(int64_t n, int64_t k) : cv(n + 16), lane(2 * k), ci(n + 16), lane_i(2 * k), kth(k + 1) {}
};

// The k best of s[0..n) into out[0..k), best first (k <= n); out[k] is scratch.
// Filtering: the maxima of L = 2k strided lanes (lane l: s[l], s[l + L], ...) are L distinct scores, so
// the k-th best of them, `thr`, is a lower bound of the row's k-th best score: only scores ≥ thr can
// win — about 20 of them for random rows (k = 16), whatever n. Every step is branch-free.
template <typename T>
void row_topk(const T* s, int64_t n, int64_t k, TopkScratch<T>& w, Item<T>* out) {
  const int64_t L = std::min<int64_t>(n, 2 * k);
  T* lane = w.lane.data();
  int32_t* lane_i = w.lane_i.data();
  T* cv = w.cv.data();
  int32_t* ci = w.ci.data();
  std::copy(s, s + L, lane);
  int64_t i = L;
  for (; i + L <= n; i += L)
    for (int64_t l = 0; l < L; ++l) lane[l] = std::max(lane[l], s[i + l]);
  for (int64_t l = 0; i + l < n; ++l) lane[l] = std::max(lane[l], s[i + l]);
  for (int64_t l = 0; l < L; ++l) lane_i[l] = static_cast<int32_t>(l);
  best_k(lane, lane_i, L, k, w.kth.data());
  const T thr = w.kth[k - 1].v;
  int64_t c = 0, j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {  // 16 scores per compare; survivors compressed in a register
    const __m512 vthr = _mm512_set1_ps(thr);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
      const __m512 v = _mm512_loadu_ps(s + j);
      const __mmask16 m = _mm512_cmp_ps_mask(v, vthr, _CMP_GE_OQ);
      if (m == 0) continue;  // most blocks: ~20 survivors in a row of n
      // compress in a register and store all 16 lanes (cv, ci have 16 spare slots): a compressing
      // store to memory is microcoded and slow on some CPUs
      _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(m, v));
      _mm512_storeu_si512(ci + c, _mm512_maskz_compress_epi32(m, idx));
      c += __builtin_popcount(m);
    }
  }
#endif
  for (; j < n; ++j) {
    cv[c] = s[j];
    ci[c] = static_cast<int32_t>(j);
    c += s[j] >= thr;
  }
  if (c < k) {  // only with NaN scores: rank everything, as torch.topk would return something
    for (int64_t j = 0; j < n; ++j) cv[j] = s[j], ci[j] = static_cast<int32_t>(j);
    c = n;
  }
  best_k(cv, ci, c, k, out);
}

// A dot product in one order of additions whatever the vector width of the build (issue 25): kLanes partial
// sums, lane l taking elements l, l + kLanes, ..., then halved pairwise. A compiler may vectorise the lanes
// 4, 8 or 16 wide without reordering any sum, and -ffp-contract=off keeps fused multiply-adds out, so an
// SSE2, AVX2 or AVX-512 build gives the same bits (tests/test_native.py builds one for baseline x86-64).
constexpr int64_t kLanes = 16;

template <typename T>
inline T dot(const T* a, const T* b, int64_t D) {
  T acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[d + l] * b[d + l];
  }
  for (int64_t l = 0; d + l < D; ++l) acc[l] += a[d + l] * b[d + l];
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <typename T>
inline void axpy(T* y, T w, const T* x, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += w * x[d];
}

// Rows ahead whose cache lines are requested before use: enough misses in flight to cover the
// latency of random rows in tables bigger than the caches (1 → 4: see BENCHMARKS.md).
constexpr int64_t kRowsAhead = 4;

template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / sizeof(T)) __builtin_prefetch(p + d);
}

// activation: 0 = gelu (exact, erf), 1 = relu. Applied to the whole (T, S) hidden tensor by ATen's
// vectorised ops, not per entry inside the loops (three libm calls per entry cost ~20% of a pass).
at::Tensor activation(const at::Tensor& hidden, int64_t act) { return act == 1 ? at::relu(hidden) : at::gelu(hidden); }

// σ'(hidden) · gates
at::Tensor activation_grad(const at::Tensor& gates, const at::Tensor& hidden, int64_t act) {
  return act == 1 ? gates * (hidden > 0).to(gates.scalar_type()) : at::gelu_backward(gates, hidden);
}

// Chunk boundaries over [0, n) for `chunks` threads: chunk c covers [bounds[c], bounds[c+1]).
// With `starts` (prefix sums of entries per item) the split balances entries, not items.
std::vector<int64_t> split(int64_t n, int64_t chunks, const int64_t* starts = nullptr) {
  std::vector<int64_t> bounds(chunks + 1, n);
  bounds[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    if (starts == nullptr) {
      bounds[c] = n * c / chunks;
    } else {
      const int64_t target = starts[n] * c / chunks;
      bounds[c] = std::lower_bound(starts, starts + n, target) - starts;
    }
    bounds[c] = std::max(bounds[c], bounds[c - 1]);
  }
  return bounds;
}

int64_t num_chunks(int64_t work) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work)); }

}  // namespace

namespace {

// A product-key grid: the pairs (i, j) with i in [r0, r0 + rows), j in [c0, c0 + cols).
struct Grid {
  int64_t r0, rows, c0, cols;
};

// The exact top-k of q1 · c_i + q2 · c'_j over the union of `grids` (sub-keys n = subkeys.size(0)): per block
// of rows, sub-key scores by GEMM; per row, each grid's halves' top-k by filtering (row_topk, min(k, length)
// each) and the grid's pruned candidates (a+1)(b+1) <= k, then the k best of all grids' candidates.
// q (R, dk), subkeys (n, 2, dk/2) → scores (R, k) descending, i (R, k), j (R, k) sub-key indices.
std::vector<at::Tensor> grids_topk(at::Tensor q, at::Tensor subkeys, int64_t k, const std::vector<Grid>& grids) {
  q = q.contiguous();
  subkeys = subkeys.contiguous();
  const int64_t R = q.size(0), dk = q.size(1), half = dk / 2, n = subkeys.size(0), G = grids.size();
  auto scores = at::empty({R, k}, q.options());
  auto ii = at::empty({R, k}, q.options().dtype(at::kLong));
  auto jj = at::empty({R, k}, q.options().dtype(at::kLong));
  std::vector<int64_t> ka(G), kb(G);
  std::vector<std::array<int64_t, 3>> cand;  // (grid, rank a, rank b), a-major within each grid
  for (int64_t g = 0; g < G; ++g) {
    ka[g] = std::min(k, grids[g].rows);
    kb[g] = std::min(k, grids[g].cols);
    for (int64_t a = 0; a < ka[g]; ++a)
      for (int64_t b = 0; b < std::min(kb[g], k / (a + 1)); ++b) cand.push_back({g, a, b});
  }
  const int64_t P = cand.size();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "grids_topk", [&] {
    const at::Tensor c1t = subkeys.select(1, 0).t(), c2t = subkeys.select(1, 1).t();  // (half, n)
    // rows per block: C × n scores per half (512 KB) stay in L2; bigger blocks keep the GEMMs efficient
    const int64_t C = std::max<int64_t>(32, 131072 / n);
    const int64_t blocks = (R + C - 1) / C;
    auto* out_s = scores.data_ptr<scalar_t>();
    auto* out_i = ii.data_ptr<int64_t>();
    auto* out_j = jj.data_ptr<int64_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      // h[2g], h[2g + 1]: grid g's row and column halves' top-k of the current row
      std::vector<std::vector<Item<scalar_t>>> h(2 * G, std::vector<Item<scalar_t>>(k + 1));
      std::vector<Item<scalar_t>> best(k + 1);
      TopkScratch<scalar_t> w(std::max(n, P), k);
      scalar_t* cv = w.cv.data();
      int32_t* ci = w.ci.data();
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * C, rows = std::min(R, r0 + C) - r0;
        const at::Tensor qb = q.narrow(0, r0, rows);
        const at::Tensor s1 = at::mm(qb.narrow(1, 0, half), c1t).contiguous();  // (rows, n)
        const at::Tensor s2 = at::mm(qb.narrow(1, half, half), c2t).contiguous();
        const scalar_t* p1 = s1.data_ptr<scalar_t>();
        const scalar_t* p2 = s2.data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t g = 0; g < G; ++g) {
            row_topk(p1 + r * n + grids[g].r0, grids[g].rows, ka[g], w, h[2 * g].data());
            row_topk(p2 + r * n + grids[g].c0, grids[g].cols, kb[g], w, h[2 * g + 1].data());
          }
          for (int64_t p = 0; p < P; ++p) {  // row_topk is done with w's buffers: they take the candidates
            const auto& c = cand[p];
            cv[p] = h[2 * c[0]][c[1]].v + h[2 * c[0] + 1][c[2]].v;
            ci[p] = static_cast<int32_t>(p);
          }
          best_k(cv, ci, P, k, best.data());
          const int64_t o = (r0 + r) * k;
          for (int64_t t = 0; t < k; ++t) {
            const auto& c = cand[best[t].i];
            out_s[o + t] = best[t].v;
            out_i[o + t] = h[2 * c[0]][c[1]].i + grids[c[0]].r0;
            out_j[o + t] = h[2 * c[0] + 1][c[2]].i + grids[c[0]].c0;
          }
        }
      }
    });
  });
  return {scores, ii, jj};
}

}  // namespace

// q (R, dk), subkeys (n, 2, dk/2) → scores (R, k) descending, i (R, k), j (R, k): all n² experts.
std::vector<at::Tensor> pk_topk(at::Tensor q, at::Tensor subkeys, int64_t k) {
  const int64_t n = subkeys.size(0);
  TORCH_CHECK(subkeys.size(2) == q.size(1) / 2 && k >= 1 && k <= n, "pk_topk: bad shapes or k");
  return grids_topk(q, subkeys, k, {{0, n, 0, n}});
}

// A grown generation's retrieval (issue 16): the experts (i, j) with lo <= max(i, j) < n, the "shell" of
// sub-keys [lo, n), as two grids — rows [lo, n) x columns [0, n) and rows [0, lo) x columns [lo, n).
// The gradients are pk_topk_backward's.
std::vector<at::Tensor> pk_topk_shell(at::Tensor q, at::Tensor subkeys, int64_t lo, int64_t k) {
  const int64_t n = subkeys.size(0);
  TORCH_CHECK(subkeys.size(2) == q.size(1) / 2 && lo > 0 && lo < n && k >= 1 && k <= n * n - lo * lo,
              "pk_topk_shell: bad shapes, lo or k");
  return grids_topk(q, subkeys, k, {{lo, n - lo, 0, n}, {0, lo, lo, n - lo}});
}

// Gradients of scores[r, t] = q1_r · c_{i[r,t]} + q2_r · c'_{j[r,t]}: dq (R, dk), dsubkeys (n, 2, dk/2).
std::vector<at::Tensor> pk_topk_backward(at::Tensor ds, at::Tensor q, at::Tensor subkeys, at::Tensor ii, at::Tensor jj,
                                         bool need_q, bool need_subkeys) {
  ds = ds.contiguous();
  q = q.contiguous();
  subkeys = subkeys.contiguous();
  ii = ii.contiguous();
  jj = jj.contiguous();
  const int64_t R = q.size(0), dk = q.size(1), half = dk / 2, n = subkeys.size(0), k = ds.size(1);
  at::Tensor dq, dsub;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pk_topk_backward", [&] {
    const scalar_t* pds = ds.data_ptr<scalar_t>();
    const scalar_t* pq = q.data_ptr<scalar_t>();
    const scalar_t* pc = subkeys.data_ptr<scalar_t>();  // row i: [c_i (half) ; c'_i (half)]
    const int64_t* pi = ii.data_ptr<int64_t>();
    const int64_t* pj = jj.data_ptr<int64_t>();
    if (need_q) {
      dq = at::zeros({R, dk}, q.options());
      scalar_t* pdq = dq.data_ptr<scalar_t>();
      at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t t = 0; t < k; ++t) {
            const scalar_t w = pds[r * k + t];
            axpy(pdq + r * dk, w, pc + pi[r * k + t] * dk, half);
            axpy(pdq + r * dk + half, w, pc + pj[r * k + t] * dk + half, half);
          }
      });
    }
    if (need_subkeys) {
      const int64_t chunks = num_chunks(R / 256 + 1);
      const auto bounds = split(R, chunks);
      std::vector<at::Tensor> parts(chunks);
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          parts[c] = at::zeros({n, 2, half}, q.options());
          scalar_t* acc = parts[c].data_ptr<scalar_t>();
          for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r)
            for (int64_t t = 0; t < k; ++t) {
              const scalar_t w = pds[r * k + t];
              axpy(acc + pi[r * k + t] * dk, w, pq + r * dk, half);
              axpy(acc + pj[r * k + t] * dk + half, w, pq + r * dk + half, half);
            }
        }
      });
      dsub = parts[0];
      for (int64_t c = 1; c < chunks; ++c) dsub.add_(parts[c]);
    }
  });
  return {dq, dsub};
}

// x (T, D), ids (T, S), gates (T, S), U/V (N, D) →
// y (T, D), hidden (T, S), order (T·S,) entries sorted by id, rows (r,) distinct ids, starts (r + 1,).
std::vector<at::Tensor> mix_forward(at::Tensor x, at::Tensor ids, at::Tensor gates, at::Tensor U, at::Tensor V,
                                    int64_t act) {
  x = x.contiguous();
  ids = ids.contiguous();
  gates = gates.contiguous();
  U = U.contiguous();
  V = V.contiguous();
  const int64_t T = x.size(0), D = x.size(1), S = ids.size(1), E = T * S;
  auto y = at::zeros({T, D}, x.options());
  auto hidden = at::empty({T, S}, x.options());
  // stable sort: entries of one expert keep token order, so sums are deterministic
  auto sorted = at::sort(ids.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_ids = std::get<0>(sorted), order = std::get<1>(sorted);
  std::vector<int64_t> rows_v, starts_v;
  rows_v.reserve(E);
  starts_v.reserve(E + 1);
  const int64_t* ps = sorted_ids.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    if (e == 0 || ps[e] != ps[e - 1]) {
      rows_v.push_back(ps[e]);
      starts_v.push_back(e);
    }
  starts_v.push_back(E);
  const int64_t nrows = rows_v.size();
  auto rows = at::from_blob(rows_v.data(), {nrows}, at::kLong).clone();
  auto starts = at::from_blob(starts_v.data(), {nrows + 1}, at::kLong).clone();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mix_forward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pU = U.data_ptr<scalar_t>();
    const scalar_t* pV = V.data_ptr<scalar_t>();
    const int64_t* po = order.data_ptr<int64_t>();
    const int64_t* pst = starts_v.data();
    scalar_t* ph = hidden.data_ptr<scalar_t>();
    const int64_t chunks = num_chunks(nrows / 1024 + 1);
    const auto bounds = split(nrows, chunks, pst);
    // pass 1: hidden = u_e · x_t for every entry
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          const scalar_t* u = pU + rows_v[r] * D;
          if (r + kRowsAhead < bounds[c + 1]) prefetch_row(pU + rows_v[r + kRowsAhead] * D, D);
          for (int64_t e = pst[r]; e < pst[r + 1]; ++e) ph[po[e]] = dot(u, px + (po[e] / S) * D, D);
        }
    });
    const at::Tensor weights = activation(hidden, act).mul_(gates);  // (T, S)
    const scalar_t* pw = weights.data_ptr<scalar_t>();
    // pass 2: y_t += w_ts v_e, a partial y per chunk added in chunk order (deterministic)
    std::vector<at::Tensor> parts(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        parts[c] = c == 0 ? y : at::zeros({T, D}, x.options());
        scalar_t* py = parts[c].data_ptr<scalar_t>();
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          const scalar_t* v = pV + rows_v[r] * D;
          if (r + kRowsAhead < bounds[c + 1]) prefetch_row(pV + rows_v[r + kRowsAhead] * D, D);
          for (int64_t e = pst[r]; e < pst[r + 1]; ++e) axpy(py + (po[e] / S) * D, pw[po[e]], v, D);
        }
      }
    });
    for (int64_t c = 1; c < chunks; ++c) y.add_(parts[c]);
  });
  return {y, hidden, order, rows, starts};
}

// dx (T, D), dgates (T, S), dU and dV compact (r, D) in `rows` order, in two passes over the rows
// retrieved, each touching one table and two token arrays (V with dy; U with x and dx) so that the
// token rows, visited in scattered order, stay in L2 (A/B in BENCHMARKS.md).
std::vector<at::Tensor> mix_backward(at::Tensor dy, at::Tensor x, at::Tensor gates, at::Tensor hidden, at::Tensor U,
                                     at::Tensor V, at::Tensor order, at::Tensor rows, at::Tensor starts, int64_t act) {
  dy = dy.contiguous();
  x = x.contiguous();
  gates = gates.contiguous();
  U = U.contiguous();
  V = V.contiguous();
  const int64_t T = x.size(0), D = x.size(1), S = gates.size(1), nrows = rows.size(0);
  auto dx = at::zeros({T, D}, x.options());
  auto dw = at::empty({T, S}, x.options());  // ∂L/∂(weight of each entry) = v_e · dy_t
  auto dU = at::empty({nrows, D}, x.options());
  auto dV = at::empty({nrows, D}, x.options());
  const at::Tensor acts = activation(hidden, act).contiguous();  // σ(h)  (T, S)
  const at::Tensor weights = acts * gates;                       // σ(h) g
  at::Tensor dgates, dh;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mix_backward", [&] {
    const scalar_t* pdy = dy.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pw = weights.data_ptr<scalar_t>();
    const scalar_t* pU = U.data_ptr<scalar_t>();
    const scalar_t* pV = V.data_ptr<scalar_t>();
    const int64_t* po = order.data_ptr<int64_t>();
    const int64_t* prow = rows.data_ptr<int64_t>();
    const int64_t* pst = starts.data_ptr<int64_t>();
    scalar_t* pdw = dw.data_ptr<scalar_t>();
    scalar_t* pdU = dU.data_ptr<scalar_t>();
    scalar_t* pdV = dV.data_ptr<scalar_t>();
    const int64_t chunks = num_chunks(nrows / 1024 + 1);
    const auto bounds = split(nrows, chunks, pst);
    // pass 1, V and dy: dw_e = v_e · dy_t and dV_e = Σ w_e dy_t
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          const scalar_t* v = pV + prow[r] * D;
          if (r + kRowsAhead < bounds[c + 1]) prefetch_row(pV + prow[r + kRowsAhead] * D, D);
          scalar_t* dv = pdV + r * D;
          std::fill(dv, dv + D, scalar_t(0));
          for (int64_t e = pst[r]; e < pst[r + 1]; ++e) {
            const int64_t ent = po[e];
            const scalar_t* g = pdy + (ent / S) * D;
            pdw[ent] = dot(v, g, D);
            axpy(dv, pw[ent], g, D);
          }
        }
    });
    dgates = dw * acts;                                 // ∂L/∂gate
    dh = (dw * activation_grad(gates, hidden, act)).contiguous();  // ∂L/∂hidden = dw σ'(h) g
    const scalar_t* pdh = dh.data_ptr<scalar_t>();
    // pass 2, U with x and dx: dx_t = Σ dh_e u_e (a partial dx per chunk, added in chunk order) and
    // dU_e = Σ dh_e x_t
    std::vector<at::Tensor> parts(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        parts[c] = c == 0 ? dx : at::zeros({T, D}, x.options());
        scalar_t* pdx = parts[c].data_ptr<scalar_t>();
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          const scalar_t* u = pU + prow[r] * D;
          if (r + kRowsAhead < bounds[c + 1]) prefetch_row(pU + prow[r + kRowsAhead] * D, D);
          scalar_t* du = pdU + r * D;
          std::fill(du, du + D, scalar_t(0));
          for (int64_t e = pst[r]; e < pst[r + 1]; ++e) {
            const int64_t ent = po[e], t = ent / S;
            axpy(pdx + t * D, pdh[ent], u, D);
            axpy(du, pdh[ent], px + t * D, D);
          }
        }
      }
    });
    for (int64_t c = 1; c < chunks; ++c) dx.add_(parts[c]);
  });
  return {dx, dgates, dU, dV};
}

// Lazy row-sparse AdamW (lifelong_peer/optim.py, fp32 moments) fused into one pass over the touched rows:
// for each row, read its gradient, weights, m and v once and write them back — instead of ~20 passes
// over (r, D) temporaries (gathers, scatters, masked fills) that each go to memory. `rows` (r,) distinct
// ids into w (R, D), m and v (R, D), step (R,) int32; grad (r, D). A row's first update (step 0 → 1)
// starts from zero moments whatever is stored. Rows are independent, so any thread count gives the
// same bits; the arithmetic follows torch.optim.AdamW's order (up to fused multiply-adds).
void row_adamw_(at::Tensor w, at::Tensor m, at::Tensor v, at::Tensor step, at::Tensor rows, at::Tensor grad,
                double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK(w.is_contiguous() && m.is_contiguous() && v.is_contiguous() && step.is_contiguous(),
              "row_adamw_: state must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  step.scalar_type() == at::kInt,
              "row_adamw_: fp32 weights and moments, int32 steps");
  rows = rows.contiguous();
  grad = grad.contiguous().to(at::kFloat);
  const int64_t r = rows.size(0), D = grad.size(1);
  float* pw = w.data_ptr<float>();
  float* pm = m.data_ptr<float>();
  float* pv = v.data_ptr<float>();
  int32_t* ps = step.data_ptr<int32_t>();
  const int64_t* prow = rows.data_ptr<int64_t>();
  const float* pg = grad.data_ptr<float>();
  const float b1 = beta1, b2 = beta2, one_b1 = 1 - beta1, one_b2 = 1 - beta2, decay = 1 - lr * weight_decay;
  const float neg_lr = -lr, feps = eps;
  at::parallel_for(0, r, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = prow[i];
      if (i + kRowsAhead < i1) {
        const int64_t next = prow[i + kRowsAhead];
        prefetch_row(pw + next * D, D);
        prefetch_row(pm + next * D, D);
        prefetch_row(pv + next * D, D);
        __builtin_prefetch(ps + next);
      }
      const int32_t t = ++ps[row];
      const bool first = t == 1;  // stored moments are not read (growth leaves them unwritten: any bits)
      // bias corrections in double, as optim.py (1 - 0.999**t loses ~1e-5 in float)
      const float bc1 = 1 - std::pow(beta1, double(t)), bc2 = std::sqrt(1 - std::pow(beta2, double(t)));
      float* wr = pw + row * D;
      float* mr = pm + row * D;
      float* vr = pv + row * D;
      const float* g = pg + i * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float mm = (first ? 0.0f : mr[d]) * b1 + one_b1 * g[d];
        const float vv = (first ? 0.0f : vr[d]) * b2 + one_b2 * g[d] * g[d];
        mr[d] = mm;
        vr[d] = vv;
        const float denom = std::sqrt(vv) / bc2 + feps;
        wr[d] = wr[d] * decay + neg_lr * ((mm / bc1) / denom);
      }
    }
  });
}

// The instruction sets this build targets (the compiler's macros), for results records (kernels.build_info).
std::string build_isa() {
  std::string isa = "";
#if defined(__SSE4_2__)
  isa += "sse4_2 ";
#endif
#if defined(__AVX2__)
  isa += "avx2 ";
#endif
#if defined(__FMA__)
  isa += "fma ";
#endif
#if defined(__AVX512F__)
  isa += "avx512f ";
#endif
#if defined(__AVX512BW__)
  isa += "avx512bw ";
#endif
#if defined(__ARM_NEON)
  isa += "neon ";
#endif
#if defined(__ARM_FEATURE_SVE)
  isa += "sve ";
#endif
  return isa.empty() ? "baseline" : isa.substr(0, isa.size() - 1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_isa", &build_isa, "the instruction sets this build targets");
  m.def("pk_topk", &pk_topk, "product-key top-k by filtering");
  m.def("pk_topk_shell", &pk_topk_shell, "a grown generation's product-key top-k");
  m.def("pk_topk_backward", &pk_topk_backward, "gradients of the product-key scores");
  m.def("mix_forward", &mix_forward, "experts' mix over entries sorted by expert id");
  m.def("mix_backward", &mix_backward, "fused backward: dx, dgates, compact dU/dV rows");
  m.def("row_adamw_", &row_adamw_, "lazy row-sparse AdamW over the touched rows, in place");
}
