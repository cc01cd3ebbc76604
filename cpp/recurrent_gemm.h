// The forward's per-step recurrent product with the gate math in its epilogue.
//
// W_hh [G*H, K] is packed once per call into panels that interleave the G gates
// of a block of U units (U = the vector width). Panel u is cut into chunks of C
// gates (C = kChunkGates<G>), one after the other; chunk q holds, for k = 0..K-1
// and gate g = q*C .. q*C+C-1, the U weights W_hh[g*H + u*U + l, k], l = 0..U-1
// (zero past H), so a pass over one chunk reads memory in order. One micro-kernel
// then computes all G gate pre-activations of a unit block for R batch rows in
// registers (R x C vector accumulators per pass, k innermost) and hands them to
// the cell's epilogue (add x W_ih^T and bias, activations, state update), so the
// pre-activations never go to memory. Gates of a unit stay together, so a thread
// owning a range of unit blocks does its whole share of a step with no other
// thread's results but h of the step before.
//
// Included only by the per-ISA kernel units (see cell.h).
#pragma once

#include <type_traits>

#include "cell.h"
#include "reduced_products.h"
#include "thread_pool.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// Unit blocks of the panels: ceil(H / U).
template <typename Real>
inline int64_t unit_blocks(int64_t H) {
  return (H + kWidth<Real> - 1) / kWidth<Real>;
}

// Gates interleaved in one chunk of a panel (see above): LSTM panels hold two
// chunks of two gates, each read by its own pass of a tile.
template <int G>
constexpr int kChunkGates = G == 4 ? 2 : G;

// Packs blocks u0..u1-1 of W_hh into panels (see above).
//   panels: [unit_blocks(H), G / C, K, C, U] out with C = kChunkGates<G>;  W_hh: [G*H, K]
template <typename Real, int G>
inline void pack_gate_panels(Real* panels, const Real* W_hh, int64_t H, int64_t K, int64_t u0,
                             int64_t u1) {
  constexpr int64_t U = kWidth<Real>, C = kChunkGates<G>;
  for (int64_t u = u0; u < u1; ++u)
    for (int64_t g = 0; g < G; ++g) {
      Real* chunk = panels + u * K * G * U + (g / C) * K * C * U;
      for (int64_t l = 0; l < U; ++l) {
        const int64_t unit = u * U + l;
        const Real* w = W_hh + (g * H + unit) * K;
        Real* dst = chunk + (g % C) * U + l;
        if (unit < H)
          for (int64_t k = 0; k < K; ++k) dst[k * C * U] = w[k];
        else
          for (int64_t k = 0; k < K; ++k) dst[k * C * U] = Real(0);
      }
    }
}

// acc[r][q * C + c] = sum over k of A[r, k] * chunk_q[k, c, :] for R rows of A
// (lda apart) and NC chunks of C gates each (chunk_q = chunks + q * K * C * U).
// With fewer than 8 accumulators the FMA latency would bound the loop, so even and
// odd k then go to two sets of accumulators, added at the end.
template <typename Real, int R, int C, int NC>
inline void gate_tile(V<Real> (&acc)[R][NC * C], const Real* A, int64_t lda, const Real* chunks,
                      int64_t K) {
  constexpr int64_t U = kWidth<Real>, CU = C * U;
  constexpr int NV = NC * C;  // vectors per row
  const int64_t chunk_stride = K * CU;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V<Real>{};
  int64_t k = 0;
  if constexpr (R * NV < 8) {
    V<Real> odd[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) odd[r][v] = V<Real>{};
    for (; k + 2 <= K; k += 2)
      for (int v = 0; v < NV; ++v) {
        const Real* p = chunks + (v / C) * chunk_stride + k * CU + (v % C) * U;
        const V<Real> b0 = simd::load<Real>(p);
        const V<Real> b1 = simd::load<Real>(p + CU);
        for (int r = 0; r < R; ++r) {
          acc[r][v] += splat<Real>(A[r * lda + k]) * b0;
          odd[r][v] += splat<Real>(A[r * lda + k + 1]) * b1;
        }
      }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += odd[r][v];
  }
  for (; k < K; ++k) {
    V<Real> b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = simd::load<Real>(chunks + (v / C) * chunk_stride + k * CU + (v % C) * U);
    for (int r = 0; r < R; ++r) {
      const V<Real> a = splat<Real>(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
}

// Rows of one register tile. A tile keeps R x (vectors) accumulators, the weight
// vectors of one k and one broadcast row value in the 16 vector registers of AVX2,
// and each weight vector loaded serves R rows. Measured single-threaded (float32,
// AVX2, K = H = 256..1024, N = 8..64): GRU 4 rows x 3 gates runs at the sgemm rate;
// LSTM 6 rows x one chunk of 2 gates, two passes, reaches 92-97% of it at H = 256..512
// (3 rows x 4 gates needed 17 registers: 70-80%).
template <int G>
constexpr int kTileRows = G == 4 ? 6 : 4;
// Accumulators one pass of a tile may keep: with the 32 vector registers of
// AVX-512, a 6-row LSTM tile computes its four gates in one pass (24), each
// broadcast row value serving four weight vectors instead of two.
constexpr int kPassAccumulators = simd::kVectorBytes == 64 ? 24 : 8;

// Tiles of R rows: every chunk in one pass when the accumulators fit (few rows),
// else one pass per chunk.
template <typename Real, int G, int R, typename Epilogue>
inline void gate_rows(const Real* A, int64_t lda, const Real* panel, int64_t K, int64_t b0,
                      int64_t j, int64_t lanes, Epilogue& epilogue) {
  constexpr int64_t U = kWidth<Real>;
  constexpr int C = kChunkGates<G>, chunks_per_pass = R * G <= kPassAccumulators ? G / C : 1;
  V<Real> acc[R][G];
  for (int q = 0; q < G / C; q += chunks_per_pass) {
    V<Real> part[R][chunks_per_pass * C];
    gate_tile<Real, R, C, chunks_per_pass>(part, A + b0 * lda, lda, panel + q * K * C * U, K);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < chunks_per_pass * C; ++v) acc[r][q * C + v] = part[r][v];
  }
  for (int r = 0; r < R; ++r) epilogue(b0 + r, j, lanes, acc[r]);
}

// f(b, rows) for the row tiles of 0..n-1: as few tiles as R rows allow, their
// heights as even as can be (n = 8, R = 6: 4 + 4, not 6 + 2; a tile of few rows
// waits on the FMA latency and reloads the panel for little work); rows is a
// std::integral_constant, so each tile height is a compile-time constant of the
// micro-kernel.
template <int M, typename F>
inline void last_row_tile(int64_t b, int64_t rest, F& f) {
  if constexpr (M > 0) {
    if (rest == M)
      f(b, std::integral_constant<int, M>{});
    else
      last_row_tile<M - 1>(b, rest, f);
  }
}
template <int R, typename F>
inline void for_row_tiles(int64_t n, F&& f) {
  const int64_t tiles = (n + R - 1) / R;
  int64_t b = 0;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t left = tiles - i, rows = (n - b + left - 1) / left;
    if (rows == R)
      f(b, std::integral_constant<int, R>{});
    else
      last_row_tile<R - 1>(b, rows, f);
    b += rows;
  }
}

// Unit blocks u0..u1-1 (units j0..j1-1) of thread tid of nt: the columns of W_hh it
// packs and computes, and of h, c and the gate gradients it alone writes.
// tid and nt also let a cell whose step needs whole rows (LN_LSTM) share the rows.
struct UnitShare {
  int64_t u0, u1, j0, j1;
  int tid, nt;
};
template <typename Real>
inline UnitShare unit_share(int64_t H, int tid, int nt) {
  constexpr int64_t U = kWidth<Real>;
  const int64_t blocks = unit_blocks<Real>(H);
  const int64_t u0 = blocks * tid / nt, u1 = blocks * (tid + 1) / nt;
  return {u0, u1, u0 * U, u1 * U < H ? u1 * U : H, tid, nt};
}

// One step's share of a thread: for unit blocks u0..u1-1 and rows 0..n-1,
// epilogue(b, j, lanes, acc) with acc[g] the pre-activation h_prev[b] W_hh^T of
// gate g at units j..j+lanes-1 (lanes < U only in the last block).
//   h_prev: [n, K] (lda apart);  panels: from pack_gate_panels;  H: hidden units
template <typename Real, int G, typename Epilogue>
inline void recurrent_step(const Real* h_prev, int64_t lda, int64_t n, int64_t K,
                           const Real* panels, int64_t H, int64_t u0, int64_t u1,
                           Epilogue&& epilogue) {
  constexpr int64_t U = kWidth<Real>;
  constexpr int R = kTileRows<G>;
  for (int64_t u = u0; u < u1; ++u) {
    const Real* panel = panels + u * K * G * U;
    const int64_t j = u * U, lanes = H - j < U ? H - j : U;
    for_row_tiles<R>(n, [&](int64_t b, auto rows) {
      gate_rows<Real, G, decltype(rows)::value>(h_prev, lda, panel, K, b, j, lanes, epilogue);
    });
  }
}

// The share of thread tid of nt in count items: [first, last).
inline void share(int64_t count, int tid, int nt, int64_t& first, int64_t& last) {
  first = count * tid / nt;
  last = count * (tid + 1) / nt;
}

// xproj[:, g*H + j0 .. g*H + j1) = x W_ih[g*H + j0 .. g*H + j1)^T for every gate g:
// the input projection of one thread's units (columns), all rows of x, ldx apart.
template <typename Real>
inline void input_projection_units(Real* xproj, int64_t ldx, const Real* x, const Real* W_ih,
                                   int64_t G, int64_t H, int64_t j0, int64_t j1,
                                   const LayerShape& s) {
  if (j1 <= j0) return;
  for (int64_t g = 0; g < G; ++g)
    gemm<Real>(false, true, x_rows(s), j1 - j0, s.I, Real(1), x, s.I, W_ih + (g * H + j0) * s.I,
               s.I, Real(0), xproj + g * H + j0, ldx);
}

// ---------------------------------------------------------------------------
// Backward on the pool: thread tid owns units (columns of dh) j0..j1-1.

// dh = dG W_hh (W_hh [GK, H] as stored) runs on the same tiles as the forward:
// W_hh is packed once per call by column blocks, panel u holding for k = 0..GK-1
// the U weights W_hh[k, u*U + l] (zero past H), and a tile computes 6 rows x 2
// blocks from two panels read in order. OpenBLAS per step packed the thread's
// slice of W_hh again at every step, which for few rows cost as much as the
// product (LSTM N=8 H=256: 1024 x 128 weights per step per thread).
//   panels: [unit_blocks(H), GK, U] out;  W_hh: [GK, H]
template <typename Real>
inline void pack_column_panels(Real* panels, const Real* W_hh, int64_t GK, int64_t H,
                               int64_t u0, int64_t u1) {
  constexpr int64_t U = kWidth<Real>;
  for (int64_t u = u0; u < u1; ++u) {
    Real* panel = panels + u * GK * U;
    const int64_t j = u * U, lanes = H - j < U ? H - j : U;
    for (int64_t k = 0; k < GK; ++k) {
      copy_row(panel + k * U, W_hh + k * H + j, lanes);
      if (lanes < U) zero_row(panel + k * U + lanes, U - lanes);
    }
  }
}

// dh[b, units of blocks u..u+NB-1] = (+= when accumulate) dG[b] W_hh[:, those units]
// for R rows from b = 0 (dh's rows H apart, dG's ldg apart).
template <typename Real, int R, int NB>
inline void dh_tile(Real* dh, int64_t H, const Real* dG, int64_t ldg, const Real* panels,
                    int64_t GK, int64_t u, bool accumulate) {
  constexpr int64_t U = kWidth<Real>;
  V<Real> acc[R][NB];
  gate_tile<Real, R, 1, NB>(acc, dG, ldg, panels + u * GK * U, GK);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NB; ++q) {
      const int64_t j = (u + q) * U, lanes = H - j < U ? H - j : U;
      Real* d = dh + r * H + j;
      st(d, accumulate ? acc[r][q] + ld(d, lanes) : acc[r][q], lanes);
    }
}

template <typename Real, int R>
inline void dh_rows(Real* dh, int64_t H, const Real* dG, int64_t ldg, const Real* panels,
                    int64_t GK, int64_t u, bool pair, bool accumulate) {
  if (pair)
    dh_tile<Real, R, 2>(dh, H, dG, ldg, panels, GK, u, accumulate);
  else
    dh_tile<Real, R, 1>(dh, H, dG, ldg, panels, GK, u, accumulate);
}

// dh[:n, units of blocks u0..u1-1] = (+= when accumulate) dG[:n, :GK] W_hh[:, those units].
//   dh: [n, H];  dG: rows ldg apart;  panels: from pack_column_panels
template <typename Real>
inline void dh_product(Real* dh, const Real* dG, int64_t ldg, const Real* panels, int64_t n,
                       int64_t GK, int64_t H, int64_t u0, int64_t u1, bool accumulate) {
  constexpr int R = 6;  // x 2 blocks: 12 accumulators, as the forward's LSTM tile
  for (int64_t u = u0; u < u1; u += 2) {
    const bool pair = u + 1 < u1;
    for_row_tiles<R>(n, [&](int64_t b, auto rows) {
      dh_rows<Real, decltype(rows)::value>(dh + b * H, H, dG + b * ldg, ldg, panels, GK, u, pair,
                                           accumulate);
    });
  }
}

// dh[:, j0:j1] = dG[n, GK] W_hh[:, j0:j1] (+ dh[:, j0:j1] when accumulate) on W_hh
// as stored (times_stored_matrix), when there is no packed copy
// (LayerBuffers::W_hh_c is null): the GRU's, and any short backward's. With the packed
// copy of W_hh a GRU training step needed more memory than torch's (measured, 2
// threads: N=8 H=256 10.6 against 9.9 MB; T=50 N=16 H=1024, one thread, 37.6
// against 36.2 MB); without it, about 7% slower at N=8.
template <typename Real>
inline void dh_product_stored(Real* dh, const Real* dG, int64_t ldg, const Real* W_hh, int64_t n,
                              int64_t GK, int64_t H, int64_t j0, int64_t j1, bool accumulate) {
  if (n <= 0 || j1 <= j0) return;
  times_stored_matrix(dh + j0, H, dG, ldg, W_hh + j0, H, n, GK, j1 - j0, accumulate);
}

// weight_gradients (cell.h) cut over the pool's threads: the reordering of dG_in
// by times, then (after a barrier) the gate rows r0..r1 of dW_hh, dW_ih and both
// bias gradients by each thread; each element is summed in the same order
// whatever the thread count. dG's rows are ldg apart (GH, or 4H when written over
// the GRU's saved gates), those of dG_in and dG_x GH.
template <typename Real>
inline void weight_gradients_share(int tid, int nt, Real* dG_x, const LayerGrads<Real>& dw,
                                   Real* dsum, const Real* dG, int64_t ldg, const Real* dG_in,
                                   const Real* h_prev, const Real* x, int64_t GH,
                                   const LayerShape& s) {
  const Walk walk(s);
  const int64_t S = steps_of(s), N = s.N, H_out = h_out(s);
  int64_t first, last;
  if (dG_in != dG_x) {
    share(s.T, tid, nt, first, last);
    gate_gradients_to_time_order(dG_x, dG_in, walk, GH, s, first, last);
    pool_barrier();
  }
  share(GH, tid, nt, first, last);
  const int64_t rows = last - first;
  if (rows <= 0) return;
  weight_gradient_product(dw.dW_hh + first * H_out, H_out, dG + first, ldg, h_prev, H_out, rows,
                          S * N, H_out, dw.beta);
  auto bias_sums = [&](Real* db, const Real* a, int64_t lda) {  // db[first:last] += column sums
    Real* sum = dsum + first;
    for (int64_t j = 0; j < rows; ++j) sum[j] = Real(0);
    for (int64_t r = 0; r < S * N; ++r) add_into(sum, a + r * lda + first, rows);
    add_or_assign(db + first, sum, rows, dw.beta);
  };
  if (dw.db_hh) bias_sums(dw.db_hh, dG, ldg);
  if (dw.db_ih) bias_sums(dw.db_ih, dG_in, GH);
  weight_gradient_product(dw.dW_ih + first * s.I, s.I, dG_x + first, GH, x, s.I, rows, x_rows(s),
                          s.I, dw.beta);
}

// Runs body(tid, nt) on s.threads pool threads (fewer when the pool is busy),
// OpenBLAS single-threaded meanwhile.
template <typename F>
inline void run_on_pool(int threads, F& body) {
  struct Call {
    static void task(void* ctx, int tid) { (*static_cast<F*>(ctx))(tid, pool_threads()); }
  };
  if (threads > 1) {
    BlasSingleThreaded single;
    pool_run(threads, &Call::task, &body);
  } else {
    pool_run(1, &Call::task, &body);
  }
}

// The direct path's product C[n, M] = A[n, K] W[M, K]^T (row_gemm): on the
// calling thread, or cut by rows of W over the pool when W is big enough that
// streaming it through one core costs more than waking the others. LSTM I=768
// H=1024 T=1 inference (a decoder's LSTMCell), AVX2, 2 cores: N=1 2.2 ms on one
// thread, 1.7 ms on two; N=4 4.8 and 2.9 ms. The packed pool path took 6.9 and
// 7.8 ms there, as packing reads and writes all of W_hh for one step.
template <typename Real>
inline void direct_gemm(Real* C, int64_t ldc, const Real* A, const Real* Wm, int64_t n, int64_t K,
                        int64_t M, int threads) {
  if (threads <= 1 || M * K < kDirectSerialWeights) return row_gemm(C, ldc, A, Wm, n, K, M);
  auto body = [&](int tid, int nt) {
    constexpr int64_t kRowsOfW = 8;  // whole tiles of row_dot_rows
    const int64_t tiles = (M + kRowsOfW - 1) / kRowsOfW;
    const int64_t m0 = tiles * tid / nt * kRowsOfW, m1 = tiles * (tid + 1) / nt * kRowsOfW;
    const int64_t end = m1 < M ? m1 : M;
    if (end > m0) row_gemm(C + m0, ldc, A, Wm + m0 * K, n, K, end - m0);
  };
  run_on_pool(threads, body);
}

// Products (in multiply-adds) from which a reduced product is cut over the pool,
// as direct_gemm's 2^20 weights.
constexpr int64_t kReducedSerialWork = int64_t(1) << 20;

// C[n, M] = A[n, K] W^T with W reduced (reduced_products.h): each thread prepares
// its share of the rows of A, then, once all have, computes its share of the
// panels for every row. A's rows are K apart.
inline void reduced_product(float* C, int64_t ldc, const float* A, const ReducedMatrix& W,
                            int64_t n, const ReducedProducts& products,
                            const ActivationScratch& act, int threads) {
  auto body = [&](int tid, int nt) {
    products.prepare_rows(act, A, W.K, W, n * tid / nt, n * (tid + 1) / nt);
    if (nt > 1) pool_barrier();
    products.panels(C, ldc, act, n, W, W.panels * tid / nt, W.panels * (tid + 1) / nt);
  };
  if (threads <= 1 || n * W.M * W.K < kReducedSerialWork)
    body(0, 1);
  else
    run_on_pool(threads, body);
}

// The direct path's product C[n, M] = A[n, K] W[M, K]^T, with W's float form
// (direct_gemm) or, when it has one, its reduced form.
template <typename Real>
inline void weight_product(Real* C, int64_t ldc, const Real* A, const Real* Wm,
                           const ReducedMatrix* reduced, int64_t n, int64_t K, int64_t M,
                           const LayerBuffers<Real>& buf, const LayerWeights<Real>& w,
                           int threads) {
  if constexpr (std::is_same<Real, float>::value) {
    if (reduced) return reduced_product(C, ldc, A, *reduced, n, *w.products, *buf.act, threads);
  }
  direct_gemm(C, ldc, A, Wm, n, K, M, threads);
}

// The direct path's input projection xproj = x W_ih^T (rows ldx apart): in place
// for a short call or reduced weights, else one OpenBLAS GEMM over all rows (a
// bfloat16 layer gets W_ih widened to float32 for that: stack.cpp).
template <typename Real>
inline void direct_input_projection(Real* xproj, int64_t ldx, const Real* x,
                                    const LayerWeights<Real>& w, int64_t GH,
                                    const LayerBuffers<Real>& buf, const LayerShape& s) {
  if (w.W_ih_r || direct_weights(s))
    weight_product(xproj, ldx, x, w.W_ih, w.W_ih_r, x_rows(s), s.I, GH, buf, w, s.threads);
  else
    gemm<Real>(false, true, x_rows(s), GH, s.I, Real(1), x, s.I, w.W_ih, s.I, Real(0), xproj, ldx);
}

// ---------------------------------------------------------------------------
// Recurrent dropout (docs/cells.md): one mask per sequence on h where it enters the
// recurrent product, the same for every gate and step. buf.hm holds h times the mask,
// slot by slot like buf.h: the forward's products read it, and so does dW_hh, since
// the weight gradient is taken with the h the product saw. Without the mask buf.hm is
// null and both read buf.h.

// The rows the recurrent product of step k reads (rows h_out(s) apart).
template <typename Real>
inline const Real* product_input(const LayerBuffers<Real>& buf, int64_t k, const LayerShape& s) {
  return (buf.hm ? buf.hm : buf.h) + slot(k, s.training) * s.N * h_out(s);
}

// A bfloat16 layer on widened weights (LayerShape::round_bf16) reads h through hm
// too, rounded to bfloat16 there (recurrent dropout and reduced weights exclude
// each other).

// hm = h times the mask (or h rounded) in slot k, rows b0..b1-1, units j0..j1-1
// (nothing without hm).
template <typename Real>
inline void mask_state(const LayerBuffers<Real>& buf, int64_t k, const LayerShape& s, int64_t b0,
                       int64_t b1, int64_t j0, int64_t j1) {
  if (!buf.hm || j1 <= j0) return;
  const int64_t width = h_out(s), offset = slot(k, s.training) * s.N * width;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = offset + b * width + j0;
    if (s.round_bf16) {
      round_to_bfloat16(buf.hm + row, buf.h + row, j1 - j0);
      continue;
    }
    const Real* mask = buf.mask_sorted + b * width + j0;
    for_lanes<Real>(j1 - j0, [&](int64_t j, int64_t n) {
      st(buf.hm + row + j, ld(buf.h + row + j, n) * ld(mask + j, n), n);
    });
  }
}

// After dh_rec = dG W_hh for rows 0..n-1, units j0..j1-1: dh = dh_rec times the mask,
// added to what dh holds when accumulate (the part of the gradient that bypassed W_hh).
template <typename Real>
inline void masked_dh(const LayerBuffers<Real>& buf, int64_t n, int64_t width, int64_t j0,
                      int64_t j1, bool accumulate) {
  for (int64_t b = 0; b < n; ++b) {
    Real* dh = buf.dh + b * width + j0;
    const Real* rec = buf.dh_rec + b * width + j0;
    const Real* mask = buf.mask_sorted + b * width + j0;
    for_lanes<Real>(j1 - j0, [&](int64_t j, int64_t l) {
      const V<Real> v = ld(rec + j, l) * ld(mask + j, l);
      st(dh + j, accumulate ? ld(dh + j, l) + v : v, l);
    });
  }
}

// ---------------------------------------------------------------------------
// Zoneout (docs/cells.md, ESPnet's convention): after a cell's step, each unit keeps
// its old value with factor m (a mask of 0 and 1 per step in training, the
// probability in eval): h_t = m h_{t-1} + (1 - m) h~_t, the same for c. What is
// output and carried is the zoned h_t, c_t. In backward a step's gradient g of h_t
// splits: (1 - m) g enters the cell, m g goes to h_{t-1} directly.

// Masks drawn inside the kernels (LayerShape::zone_hashed): a counter-based generator,
// so that backward draws again what forward drew and nothing is stored. The mask of
// unit j of (time, row) `at` (at = t N + row, the caller's row) of state `which` (0 h,
// 1 c) of a layer-direction with seed s:
//   key  = low 32 bits of splitmix64(s ^ (which T N + at))
//   hash = fmix32(key + j * 0x9E3779B9)                 (MurmurHash3's finalizer)
//   keep = hash < p 2^32                                 (1: keep the old value)
// All integer arithmetic, so every instruction set and thread count draws the same
// masks; reference.zoneout_masks_from_seed is the same in NumPy.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// 1 where units j..j+lanes-1 keep their old value, else 0 (lanes past n: anything).
template <typename Real>
inline V<Real> zoneout_keep(uint64_t seed, int64_t which, int64_t T, int64_t N, int64_t at,
                            int64_t j, double p) {
  if (p >= 1) return splat<Real>(1);
  if (p <= 0) return splat<Real>(0);
  using U = typename simd::UintOf<Real>::vec;  // unsigned lanes as wide as Real's
  constexpr int64_t W = kWidth<Real>;
  const uint32_t key =
      static_cast<uint32_t>(splitmix64(seed ^ static_cast<uint64_t>(which * T * N + at)));
  const U low = U{} + 0xFFFFFFFFu;  // 32-bit arithmetic in lanes that may be 64-bit wide
  U h;
  for (int64_t l = 0; l < W; ++l) h[l] = static_cast<uint32_t>(j + l);
  h = (h * 0x9E3779B9u + key) & low;
  h ^= h >> 16;
  h = (h * 0x85EBCA6Bu) & low;
  h ^= h >> 13;
  h = (h * 0xC2B2AE35u) & low;
  h ^= h >> 16;
  // below 2^32 as p < 1, so it fits 32-bit lanes
  const auto threshold = static_cast<typename simd::UintOf<Real>::lane>(p * 4294967296.0);
  using I = simd::ivec_t<Real>;
  const I keep = (I)(h < (U{} + threshold));  // -1 where kept, 0 elsewhere
  return __builtin_convertvector(-keep, V<Real>);
}

template <typename Real>
inline bool zoneout_h(const LayerWeights<Real>& w, const LayerShape& s) {
  return w.zone_h || s.zone_p_h != 0;
}
template <typename Real>
inline bool zoneout_c(const LayerWeights<Real>& w, const LayerShape& s) {
  return w.zone_c || s.zone_p_c != 0;
}
template <typename Real>
inline bool zoneout(const LayerWeights<Real>& w, const LayerShape& s) {
  return zoneout_h(w, s) || zoneout_c(w, s);
}

// The keep-old factors of n units from unit j of (time, row) `at` of state `which`: from
// its [T, N, width] mask, drawn from the seed (LayerShape::zone_hashed), or the constant p.
template <typename Real>
inline V<Real> zoneout_factor(const LayerWeights<Real>& w, const LayerShape& s, int which,
                              int64_t at, int64_t width, int64_t j, int64_t n) {
  const Real* mask = which == 0 ? w.zone_h : w.zone_c;
  const double p = which == 0 ? s.zone_p_h : s.zone_p_c;
  if (mask) return ld(mask + at * width + j, n);
  if (s.zone_hashed) return zoneout_keep<Real>(w.zone_seed, which, s.T, s.N, at, j, p);
  return splat<Real>(static_cast<Real>(p));
}

// prev and next rows of state `which`: next = m prev + (1 - m) next, also into out (y)
// when given.
template <typename Real>
inline void zoneout_blend(Real* next, Real* out, const Real* prev, const LayerWeights<Real>& w,
                          const LayerShape& s, int which, int64_t at, int64_t width, int64_t j0,
                          int64_t j1) {
  for_lanes<Real>(j1 - j0, [&](int64_t j, int64_t n) {
    const V<Real> m = zoneout_factor(w, s, which, at, width, j0 + j, n);
    const V<Real> new_value = ld(next + j0 + j, n);
    const V<Real> v = new_value + m * (ld(prev + j0 + j, n) - new_value);
    st(next + j0 + j, v, n);
    if (out) st(out + j0 + j, v, n);
  });
}

// After step k of running rows 0..n-1 wrote h (and c, y): zone out units j0..j1-1 of h
// (of its width h_out(s)) and units c0..c1-1 of c. raw_h: when given (the RNN's
// training), h~ of the step is saved there first ([N, H], rows H apart).
template <typename Real>
inline void zoneout_step(const LayerBuffers<Real>& buf, Real* y, int64_t ldy,
                         const LayerWeights<Real>& w, const LayerShape& s, int64_t k, int64_t n,
                         int64_t j0, int64_t j1, int64_t c0, int64_t c1, Real* raw_h = nullptr) {
  const Walk walk(s);
  const int64_t N = s.N, W = h_out(s), H = s.H;
  const bool on_h = zoneout_h(w, s), on_c = zoneout_c(w, s) && buf.c;
  Real* h_next = buf.h + slot(k + 1, s.training) * N * W;
  const Real* h_prev = buf.h + slot(k, s.training) * N * W;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t at = walk.at(k, b);
    if (on_h) {
      if (raw_h) copy_row(raw_h + b * W + j0, h_next + b * W + j0, j1 - j0);
      zoneout_blend(h_next + b * W, y + at * ldy, h_prev + b * W, w, s, 0, at, W, j0, j1);
    }
    if (on_c) {
      Real* c_next = buf.c + slot(k + 1, s.training) * N * H;
      const Real* c_prev = buf.c + slot(k, s.training) * N * H;
      zoneout_blend<Real>(c_next + b * H, nullptr, c_prev + b * H, w, s, 1, at, H, c0, c1);
    }
  }
}

// Before a step's backward, units j0..j1-1 of running rows: g = dh + dy (dy folded in
// here, so the cell is given none); the cell gets (1 - m) g, zone_dh keeps m g. The
// same for dc (LSTM), without dy.
// Units c0..c1-1 of dc (its width H differs from h's with a projection).
template <typename Real>
inline void zoneout_backward_before(const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                                    const LayerWeights<Real>& w, const LayerShape& s, int64_t k,
                                    int64_t n, int64_t j0, int64_t j1, int64_t c0, int64_t c1) {
  const Walk walk(s);
  const int64_t W = h_out(s), H = s.H;
  const bool on_h = zoneout_h(w, s), on_c = zoneout_c(w, s) && buf.dc;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t at = walk.at(k, b);
    for_lanes<Real>(j1 - j0, [&](int64_t jj, int64_t l) {
      const int64_t j = j0 + jj;
      V<Real> g = ld(buf.dh + b * W + j, l);
      if (dy) g += ld(dy + at * lddy + j, l);
      const V<Real> m = on_h ? zoneout_factor(w, s, 0, at, W, j, l) : splat<Real>(0);
      st(buf.zone_dh + b * W + j, m * g, l);
      st(buf.dh + b * W + j, g - m * g, l);
    });
    if (on_c)
      for_lanes<Real>(c1 - c0, [&](int64_t jj, int64_t l) {
        const int64_t j = c0 + jj;
        const V<Real> g = ld(buf.dc + b * H + j, l);
        const V<Real> m = zoneout_factor(w, s, 1, at, H, j, l);
        st(buf.zone_dc + b * H + j, m * g, l);
        st(buf.dc + b * H + j, g - m * g, l);
      });
  }
}

// After the cell's step backward: dh = (what the cell left there when keep_dh) + zone_dh,
// so that dG W_hh is then added to it; dc += zone_dc.
template <typename Real>
inline void zoneout_backward_after(const LayerBuffers<Real>& buf, const LayerWeights<Real>& w,
                                   const LayerShape& s, int64_t n, int64_t j0, int64_t j1,
                                   int64_t c0, int64_t c1, bool keep_dh) {
  const int64_t W = h_out(s), H = s.H;
  const bool on_c = zoneout_c(w, s) && buf.dc;
  for (int64_t b = 0; b < n; ++b) {
    if (keep_dh)
      add_into(buf.dh + b * W + j0, buf.zone_dh + b * W + j0, j1 - j0);
    else
      copy_row(buf.dh + b * W + j0, buf.zone_dh + b * W + j0, j1 - j0);
    if (on_c) add_into(buf.dc + b * H + c0, buf.zone_dc + b * H + c0, c1 - c0);
  }
}

// The dy a cell's backward reads: none with zoneout (zoneout_backward_before folded it in).
template <typename Real>
inline const Real* zoneout_dy(const Real* dy, const LayerWeights<Real>& w, const LayerShape& s) {
  return zoneout(w, s) ? nullptr : dy;
}

// ---------------------------------------------------------------------------
// What every cell's layer does on the pool; the cells give the per-step part.

// The input projection of a few steps at a time (forward_on_pool): each thread
// projects the rows of the next steps onto its unit blocks, on W_ih packed as
// W_hh is, just before the steps read them. Projected all at once (one OpenBLAS
// GEMM per thread), xproj ([T, N, G*H]: 13 MB for LSTM N=32 H=256) had left the
// caches by the time each step read its rows: a quarter of the gate math's time
// went to those loads (AVX-512, one thread), and OpenBLAS first cleared all of
// xproj in a pass of its own (beta 0).
//
// Bytes of xproj one chunk of steps may fill: they stay in L2 until read.
constexpr int64_t kProjectionChunkBytes = 256 * 1024;

// Whether the steps of a chunk read one contiguous block of rows of x: every walk
// but the reverse one with lengths (each row then starts at its own end).
template <typename Real>
inline bool projection_in_chunks(const LayerShape& s, const LayerBuffers<Real>& buf) {
  return buf.W_ih_p != nullptr && !(s.reverse && s.lengths);
}

// Steps per chunk: at least one.
template <typename Real>
inline int64_t projection_chunk_steps(int64_t ldx, const LayerShape& s) {
  const int64_t step_bytes = s.N * ldx * static_cast<int64_t>(sizeof(Real));
  return step_bytes >= kProjectionChunkBytes ? 1 : kProjectionChunkBytes / step_bytes;
}

// xproj rows of steps k0..k1-1 (rows ldx apart) = x W_ih^T for the units of blocks
// u0..u1-1 (W_ih_p packed by pack_gate_panels): the rows of those steps' times are
// one block of x, in its order, as xproj's (LayerShape::offsets when packed).
template <typename Real, int G>
inline void project_steps(Real* xproj, int64_t ldx, const Real* x, const Real* W_ih_p,
                          const LayerShape& s, int64_t k0, int64_t k1, int64_t u0, int64_t u1) {
  const int64_t t0 = s.reverse ? s.T - k1 : k0, t1 = s.reverse ? s.T - k0 : k1;
  const int64_t r0 = s.offsets ? s.offsets[t0] : t0 * s.N;
  const int64_t r1 = s.offsets ? s.offsets[t1] : t1 * s.N;
  const int64_t H = s.H;
  recurrent_step<Real, G>(x + r0 * s.I, s.I, r1 - r0, s.I, W_ih_p, H, u0, u1,
                          [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
                            Real* out = xproj + (r0 + b) * ldx + j;
                            for (int g = 0; g < G; ++g) st(out + g * H, acc[g], lanes);
                          });
}

// The steps of an inference layer with reduced W_hh and no projection, in one
// pool job (few products per step and a job each, as the direct path has, paid
// a wake-up per step and left the gate math to one thread). Every step:
//   0. every few steps (as forward_on_pool: projection_in_chunks), the input
//      projection of the next steps: the threads prepare their share of those
//      rows of x, and after a barrier each multiplies them by its panels of W_ih
//      into xproj (rows ldx apart);
//   1. each thread multiplies h of the step (prepared: quantized or rounded) by
//      its panels of W_hh for all running rows, into buf.rec;
//   2. after a barrier, each thread takes its share of the N rows: for a running
//      row b (b < n) step_row(k, b, true) does the cell's gate math, writing h of
//      step k + 1 in slot (k + 1) & 1 of buf.h; a finished row keeps its h (copied
//      here) and step_row(k, b, false) keeps the cell's other state; then the
//      thread prepares its rows of the new h;
//   3. a barrier, as h of step k + 1 is read whole by every thread.
// Below kReducedSerialWork multiply-adds per step the calling thread does it all.
// The rows of h are prepared into buf.act_state, those of x into buf.act.
template <typename StepRow>
inline void reduced_steps(const LayerBuffers<float>& buf, const float* x, int64_t ldx,
                          const LayerWeights<float>& w, const LayerShape& s, StepRow&& step_row) {
  const Walk walk(s);
  const ReducedMatrix& W_hh = *w.W_hh_r;
  const ReducedProducts& products = *w.products;
  const int64_t N = s.N, K = W_hh.K, S = steps_of(s);
  // W_ih widened to float32 (a bfloat16 layer without vdpbf16ps) or scattered rows:
  // projected at once.
  const bool chunked = w.W_ih_r && !(s.reverse && s.lengths);
  if (!chunked) direct_input_projection(buf.xproj, ldx, x, w, ldx, buf, s);
  const int64_t chunk = projection_chunk_steps<float>(ldx, s);
  const int threads = s.threads <= 1 || N * W_hh.M * K < kReducedSerialWork ? 1 : s.threads;
  auto body = [&](int tid, int nt) {
    const int64_t p0 = W_hh.panels * tid / nt, p1 = W_hh.panels * (tid + 1) / nt;
    const int64_t b0 = N * tid / nt, b1 = N * (tid + 1) / nt;
    auto barrier = [nt] {
      if (nt > 1) pool_barrier();
    };
    products.prepare_rows(*buf.act_state, buf.h, K, W_hh, b0, b1);
    barrier();
    for (int64_t k = 0; k < S; ++k) {
      if (chunked && k % chunk == 0) {
        const int64_t k1 = k + chunk < S ? k + chunk : S;
        const int64_t t0 = s.reverse ? s.T - k1 : k, t1 = s.reverse ? s.T - k : k1;
        const int64_t r0 = s.offsets ? s.offsets[t0] : t0 * N;
        const int64_t rows = (s.offsets ? s.offsets[t1] : t1 * N) - r0;
        const ReducedMatrix& W_ih = *w.W_ih_r;
        products.prepare_rows(*buf.act, x + r0 * s.I, s.I, W_ih, rows * tid / nt,
                              rows * (tid + 1) / nt);
        barrier();
        products.panels(buf.xproj + r0 * ldx, ldx, *buf.act, rows, W_ih, W_ih.panels * tid / nt,
                        W_ih.panels * (tid + 1) / nt);
      }
      const int64_t n = walk.active(k);
      products.panels(buf.rec, W_hh.M, *buf.act_state, n, W_hh, p0, p1);
      barrier();
      float* h_next = buf.h + ((k + 1) & 1) * N * K;
      for (int64_t b = b0; b < b1; ++b) {
        if (b >= n)  // finished rows keep their state
          copy_row(h_next + b * K, buf.h + (k & 1) * N * K + b * K, K);
        step_row(k, b, b < n);
      }
      products.prepare_rows(*buf.act_state, h_next, K, W_hh, b0, b1);
      barrier();
    }
  };
  if (threads <= 1)
    body(0, 1);
  else
    run_on_pool(threads, body);
}

// The forward: each thread packs the panels and projects the inputs (rows ldx
// apart) of its unit blocks (a few steps ahead, or all at once: see
// projection_in_chunks), then runs step(k, n, mine) for every step k with n rows
// running, a barrier after each (the next step needs all of h).
template <typename Real, int G, typename Step>
inline void forward_on_pool(const LayerBuffers<Real>& buf, const Real* x, int64_t ldx,
                            const LayerWeights<Real>& w, const LayerShape& s, Step&& step) {
  const Walk walk(s);
  const int64_t H = s.H, S = steps_of(s);
  const bool chunked = projection_in_chunks(s, buf);
  const int64_t chunk = projection_chunk_steps<Real>(ldx, s);
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    pack_gate_panels<Real, G>(buf.W_hh_p, w.W_hh, H, H, mine.u0, mine.u1);
    if (chunked)
      pack_gate_panels<Real, G>(buf.W_ih_p, w.W_ih, H, s.I, mine.u0, mine.u1);
    else
      input_projection_units(buf.xproj, ldx, x, w.W_ih, G, H, mine.j0, mine.j1, s);
    if (buf.hm) {  // recurrent dropout: each thread masks its units of h, all rows
      mask_state(buf, 0, s, 0, s.N, mine.j0, mine.j1);
      pool_barrier();
    }
    for (int64_t k = 0; k < S; ++k) {
      if (chunked && k % chunk == 0)
        project_steps<Real, G>(buf.xproj, ldx, x, buf.W_ih_p, s, k, k + chunk < S ? k + chunk : S,
                               mine.u0, mine.u1);
      step(k, walk.active(k), mine);
      mask_state(buf, k + 1, s, 0, s.N, mine.j0, mine.j1);
      pool_barrier();
    }
  };
  run_on_pool(s.threads, body);
}

// The backward. A thread owns units j0..j1-1: at every step, last to first,
// pointwise(k, n, mine) writes its units' gate gradients into dG (GK columns, rows
// ldg apart) and leaves in dh the part of its gradient that bypasses W_hh; after a
// barrier (dh needs every unit's dG) the thread computes its columns of
// dh = dG W_hh (added to what pointwise left when accumulate_dh), which only its own
// next step reads. After the loop, a barrier and its share of the weight gradients.
//
// With zoneout (zoneout_step) the cell's pointwise is wrapped: it is given (1 - m) of
// the step's gradient (dy folded in, so the cell must read no dy: see zoneout_dy), and
// m of it is added to dh (and dc) after, before dh = dG W_hh is added.
template <typename Real, typename Pointwise>
inline void backward_on_pool(Real* dG_x, const LayerGrads<Real>& dw, const LayerBuffers<Real>& buf,
                             Real* dG, int64_t ldg, const Real* dG_in, int64_t GK,
                             bool accumulate_dh, const Real* x, const LayerWeights<Real>& w,
                             const LayerShape& s, Pointwise&& pointwise,
                             const Real* dy = nullptr, int64_t lddy = 0) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  const bool zoned = zoneout(w, s);
  const bool cell_leaves_dh = accumulate_dh;  // the cell writes a bypass into dh itself
  accumulate_dh = accumulate_dh || zoned;
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    if (buf.W_hh_c) pack_column_panels(buf.W_hh_c, w.W_hh, GK, H, mine.u0, mine.u1);
    for (int64_t k = S - 1; k >= 0; --k) {
      const int64_t n = walk.active(k);
      if (mine.j1 > mine.j0) {
        if (zoned)
          zoneout_backward_before(buf, dy, lddy, w, s, k, n, mine.j0, mine.j1, mine.j0, mine.j1);
        pointwise(k, n, mine);
        if (zoned)
          zoneout_backward_after(buf, w, s, n, mine.j0, mine.j1, mine.j0, mine.j1, cell_leaves_dh);
      }
      pool_barrier();
      const Real* dG_step = dG + k * N * ldg;
      // With recurrent dropout the product goes to dh_rec first: the mask applies to it alone.
      Real* dh = buf.hm ? buf.dh_rec : buf.dh;
      const bool accumulate = accumulate_dh && !buf.hm;
      if (buf.W_hh_c)
        dh_product(dh, dG_step, ldg, buf.W_hh_c, n, GK, H, mine.u0, mine.u1, accumulate);
      else
        dh_product_stored(dh, dG_step, ldg, w.W_hh, n, GK, H, mine.j0, mine.j1, accumulate);
      if (buf.hm) masked_dh(buf, n, H, mine.j0, mine.j1, accumulate_dh);
    }
    pool_barrier();
    weight_gradients_share(tid, nt, dG_x, dw, buf.dsum, dG, ldg, dG_in, buf.hm ? buf.hm : buf.h, x,
                           GK, s);
  };
  run_on_pool(s.threads, body);
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
