// The products of a layer call besides the per-step micro-kernel
// (recurrent_product.h): the short calls' products on the weights as they lie
// (direct_gemm, weight_product, direct_input_projection) and with reduced weights
// (reduced_product), the weight gradients after the backward's time loop cut over
// the pool (weight_gradients_share), and run_on_pool, which runs a body on the pool
// with OpenBLAS single-threaded meanwhile. Included only by the per-ISA kernel units.
#pragma once

#include "products/small_products.h"
#include "products/recurrent_product.h"
#include "products/reduced_products.h"
#include "runtime/thread_pool.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// weight_gradients (small_products.h) cut over the pool's threads: the reordering of dG_in
// by times, then (after a barrier) the gate rows r0..r1 of dW_hh, dW_ih and both
// bias gradients by each thread; each element is summed in the same order
// whatever the thread count. dG's rows are ldg apart (GH, or 4H when written over
// the GRU's saved gates), those of dG_in and dG_x GH. Rows u_from.. of dW_hh take u
// ([S, N, H]: a second product's input, CellInfo::second_product) in place of h.
// With dw.deferred (GateGrads) the thread copies its gate columns of dG to dw.dG_rec
// instead (when dG is not dG_in) and multiplies nothing.
template <typename Real>
inline void weight_gradients_share(int tid, int nt, Real* dG_x, const LayerGrads<Real>& dw,
                                   Real* dsum, const Real* dG, int64_t ldg, const Real* dG_in,
                                   const Real* h_prev, const Real* x, int64_t GH,
                                   const LayerShape& s, const Real* u = nullptr,
                                   int64_t u_from = -1) {
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
  if (dw.deferred) {  // the caller multiplies (GateGrads): the recurrent side's, where distinct
    if (dw.dG_rec && dG != dG_in)
      for (int64_t r = 0; r < S * N; ++r) copy_row(dw.dG_rec + r * GH + first, dG + r * ldg + first, rows);
    return;
  }
  const int64_t split = u && u_from >= 0 && u_from < GH ? u_from : GH;
  if (first < split)
    weight_gradient_product(dw.dW_hh + first * H_out, H_out, dG + first, ldg, h_prev, H_out,
                            (last < split ? last : split) - first, S * N, H_out, dw.beta);
  if (last > split) {
    const int64_t from = first > split ? first : split;
    weight_gradient_product(dw.dW_hh + from * H_out, H_out, dG + from, ldg, u, H_out, last - from,
                            S * N, H_out, dw.beta);
  }
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
    constexpr int64_t kRowsOfW = kWidth<Real>;  // whole blocks of row_dot_rows at every R
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

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
