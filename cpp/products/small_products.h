// The products of few rows, on weights as they lie: the per-step GEMM of the
// short paths (small_gemm, step_gemm), dot products of rows for calls too short to
// lay a weight out (row_gemm), the weight gradient of a step (weight_gradient_product),
// and the GEMMs outside the time loop (input projection, weight gradients after the
// backward's loop). Included only by the per-ISA kernel units.
#pragma once

#include <type_traits>

#include "products/row_tiles.h"
#include "runtime/gemm.h"
#include "runtime/kernel_unit.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// ---------------------------------------------------------------------------
// The per-step GEMM for few rows.
//
// OpenBLAS packs the whole of B on every call, which for a handful of rows costs
// more than the product itself (and would copy the recurrent weights once per
// step). Here B is used as it lies, row-major [K, cols] (the forward lays W_hh^T
// out once per call, the backward uses W_hh itself), and C is computed in
// register tiles of up to 4 rows x 3 vectors, k innermost. The column loop is
// outermost so a panel of B stays in L1 while the row tiles pass over it.

template <typename Real, int R, int NV>
inline void small_gemm_tile(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                            int64_t ldb, int64_t K, bool accumulate, int64_t keep_from) {
  constexpr int64_t W = kWidth<Real>;
  V<Real> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V<Real>{};
  for (int64_t k = 0; k < K; ++k) {
    V<Real> b[NV];
    for (int v = 0; v < NV; ++v) b[v] = simd::load<Real>(B + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const V<Real> a = splat<Real>(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      Real* c = C + r * ldc + v * W;
      if (keep_from == 0) {  // the whole vector
        st(c, accumulate ? ld(c, W) + acc[r][v] : acc[r][v], W);
      } else {  // only lanes keep_from.. (the others overlap a tile already stored)
        Real lanes[W];
        simd::store<Real>(lanes, acc[r][v]);
        for (int64_t l = keep_from; l < W; ++l) c[l] = accumulate ? c[l] + lanes[l] : lanes[l];
      }
    }
}

template <typename Real, int R>
inline void small_gemm_rows(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                            int64_t ldb, int64_t K, int64_t j, int64_t vectors, bool accumulate,
                            int64_t keep_from) {
  switch (vectors) {
    case 3:
      return small_gemm_tile<Real, R, 3>(C + j, ldc, A, lda, B + j, ldb, K, accumulate, 0);
    case 2:
      return small_gemm_tile<Real, R, 2>(C + j, ldc, A, lda, B + j, ldb, K, accumulate, 0);
    default:
      return small_gemm_tile<Real, R, 1>(C + j, ldc, A, lda, B + j, ldb, K, accumulate,
                                         keep_from);
  }
}

// C[n, cols] = A[n, K] B[K, cols] (+ C when accumulate); all row-major.
template <typename Real>
inline void small_gemm(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                       int64_t ldb, int64_t n, int64_t K, int64_t cols, bool accumulate) {
  constexpr int64_t W = kWidth<Real>;
  if (cols < W) {  // narrower than one vector: plain loops
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        Real sum = accumulate ? C[r * ldc + c] : Real(0);
        for (int64_t k = 0; k < K; ++k) sum += A[r * lda + k] * B[k * ldb + c];
        C[r * ldc + c] = sum;
      }
    return;
  }
  // Column blocks of 3 vectors, then 1-2 vectors, then a last vector ending at
  // cols exactly (overlapping the previous block; only its new lanes are stored).
  auto block = [&](int64_t j, int64_t vectors, int64_t keep_from) {
    for (int64_t r = 0; r < n; r += 4) {
      Real* c = C + r * ldc;
      const Real* a = A + r * lda;
      switch (n - r < 4 ? n - r : 4) {
        case 4:
          small_gemm_rows<Real, 4>(c, ldc, a, lda, B, ldb, K, j, vectors, accumulate, keep_from);
          break;
        case 3:
          small_gemm_rows<Real, 3>(c, ldc, a, lda, B, ldb, K, j, vectors, accumulate, keep_from);
          break;
        case 2:
          small_gemm_rows<Real, 2>(c, ldc, a, lda, B, ldb, K, j, vectors, accumulate, keep_from);
          break;
        default:
          small_gemm_rows<Real, 1>(c, ldc, a, lda, B, ldb, K, j, vectors, accumulate, keep_from);
      }
    }
  };
  int64_t j = 0;
  for (; j + 3 * W <= cols; j += 3 * W) block(j, 3, 0);
  if (j + 2 * W <= cols) {
    block(j, 2, 0);
    j += 2 * W;
  } else if (j + W <= cols) {
    block(j, 1, 0);
    j += W;
  }
  if (j < cols) block(cols - W, 1, W - (cols - j));
}

// C[n, cols] = A[n, K] B[K, cols] (+ C when accumulate) for n <= 4 rows and a B
// too big for cache, read once in its own order: blocks of 8 rows of B, each row
// contiguous, are added into C (which stays in L1). small_gemm's column panels
// instead walk down all K rows of B once per panel, 2 KB apart for B = W_hh at
// H = 512: the backward of an LSTM step at H = 512, N = 1 spent 40% of its time
// there. Each element is summed over k in order.
template <typename Real, int R>
inline void stream_rows_of_b(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                             int64_t ldb, int64_t K, int64_t cols, bool accumulate) {
  constexpr int64_t kRowsOfB = 8;
  if (!accumulate)
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < cols; ++j) C[r * ldc + j] = Real(0);
  for (int64_t k0 = 0; k0 < K; k0 += kRowsOfB) {
    const int64_t rows = K - k0 < kRowsOfB ? K - k0 : kRowsOfB;
    V<Real> a[R][kRowsOfB];
    for (int r = 0; r < R; ++r)
      for (int64_t k = 0; k < rows; ++k) a[r][k] = splat<Real>(A[r * lda + k0 + k]);
    const Real* b = B + k0 * ldb;
    for_lanes<Real>(cols, [&](int64_t j, int64_t n) {
      V<Real> acc[R];
      for (int r = 0; r < R; ++r) acc[r] = ld(C + r * ldc + j, n);
      for (int64_t k = 0; k < rows; ++k) {
        const V<Real> w = ld(b + k * ldb + j, n);
        for (int r = 0; r < R; ++r) acc[r] += a[r][k] * w;
      }
      for (int r = 0; r < R; ++r) st(C + r * ldc + j, acc[r], n);
    });
  }
}

template <typename Real>
inline void small_gemm_streaming(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                                 int64_t ldb, int64_t n, int64_t K, int64_t cols, bool accumulate) {
  for (int64_t r = 0; r < n; r += 4) {
    Real* c = C + r * ldc;
    const Real* a = A + r * lda;
    switch (n - r < 4 ? n - r : 4) {
      case 4:
        stream_rows_of_b<Real, 4>(c, ldc, a, lda, B, ldb, K, cols, accumulate);
        break;
      case 3:
        stream_rows_of_b<Real, 3>(c, ldc, a, lda, B, ldb, K, cols, accumulate);
        break;
      case 2:
        stream_rows_of_b<Real, 2>(c, ldc, a, lda, B, ldb, K, cols, accumulate);
        break;
      default:
        stream_rows_of_b<Real, 1>(c, ldc, a, lda, B, ldb, K, cols, accumulate);
    }
  }
}

// C[n, cols] = A[n, K] B[K, cols] (+ C when accumulate), cols >= the vector width,
// with B as it lies, for the rows of a step (a batch): small_gemm's tiles, as tall
// as the registers allow (6 rows x 4 vectors with AVX-512's 32 registers, 6 x 2
// with 16), column panels outermost. OpenBLAS packs B again at every call, and in
// the GRU's backward B is a thread's columns of W_hh at every step: the GRU's
// backward (T=100, I=H=256) went from 15.1-16.2 to 12.8-13.4 ms at N=8 on one
// thread, 31.5-36.3 to 29.5-33.6 ms at N=32 on two, and T=50 N=16 I=H=1024 on one
// thread from 235 to 210 ms (Zen 4, AVX-512; with the AVX2 kernels 10% at N=8).
// An LSTM's backward reads W_hh packed (pack_column_panels), as fast as these
// tiles at N=8 and 2% faster at N=32 and 64. The portable target (16-byte vectors,
// no FMA) keeps OpenBLAS, whose own kernels for such a CPU were not measured
// against these.
constexpr int64_t kTiledStoredRows = simd::kVectorBytes >= 32 ? 64 : 0;

template <typename Real>
inline void tiled_gemm(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                       int64_t ldb, int64_t n, int64_t K, int64_t cols, bool accumulate) {
  constexpr int64_t W = kWidth<Real>;
  constexpr int NV = simd::kVectorBytes == 64 ? 4 : 2, R = 6;
  auto block = [&](int64_t j, auto vectors, int64_t keep_from) {
    for_row_tiles<R>(n, [&](int64_t b, auto rows) {
      small_gemm_tile<Real, decltype(rows)::value, decltype(vectors)::value>(
          C + b * ldc + j, ldc, A + b * lda, lda, B + j, ldb, K, accumulate, keep_from);
    });
  };
  int64_t j = 0;
  for (; j + NV * W <= cols; j += NV * W) block(j, std::integral_constant<int, NV>{}, 0);
  for (; j + W <= cols; j += W) block(j, std::integral_constant<int, 1>{}, 0);
  // A last vector ending at cols exactly, over the one before it: its new lanes kept.
  if (j < cols) block(cols - W, std::integral_constant<int, 1>{}, W - (cols - j));
}

// C[n, cols] = A[n, K] B[K, cols] (+ C when accumulate) with B as it lies: read
// row by row for few rows of A, in tiles for a batch, through OpenBLAS (which packs
// B) for more (dx of all steps at once). The products of dG with a weight in the
// backward (dh = dG W_hh, dx = dG W_ih).
template <typename Real>
inline void times_stored_matrix(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                                int64_t ldb, int64_t n, int64_t K, int64_t cols, bool accumulate) {
  if (n <= kSmallGemmRows)
    small_gemm_streaming(C, ldc, A, lda, B, ldb, n, K, cols, accumulate);
  else if (n <= kTiledStoredRows && cols >= kWidth<Real>)
    tiled_gemm(C, ldc, A, lda, B, ldb, n, K, cols, accumulate);
  else
    gemm<Real>(false, false, n, cols, K, Real(1), A, lda, B, ldb, accumulate ? Real(1) : Real(0),
               C, ldc);
}

// ---------------------------------------------------------------------------
// The product with a weight as it lies, for calls too short to lay it out.
//
// C[n, M] = A[n, K] W[M, K]^T: every element is the dot product of a row of A and
// a row of W, both contiguous, so W is read in place, once per 4 rows of A. For a
// step or two of a few rows (a cell called once per frame) packing or transposing
// W, as the longer calls do, would cost more than the product itself.

template <typename Real>
inline Real lane_sum(V<Real> v) {
  constexpr int64_t W = kWidth<Real>;
  Real lanes[W];
  simd::store<Real>(lanes, v);
  for (int64_t w = W / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// C[r, m] for R rows of A and RB rows of W (m = 0..RB-1), k in vectors.
template <typename Real, int R, int RB>
inline void row_dot_tile(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* Wm,
                         int64_t K) {
  V<Real> acc[RB][R];
  for (int m = 0; m < RB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = V<Real>{};
  for_lanes<Real>(K, [&](int64_t k, int64_t n) {
    V<Real> a[R];
    for (int r = 0; r < R; ++r) a[r] = ld(A + r * lda + k, n);
    for (int m = 0; m < RB; ++m) {
      const V<Real> w = ld(Wm + m * K + k, n);
      for (int r = 0; r < R; ++r) acc[m][r] += a[r] * w;
    }
  });
  for (int m = 0; m < RB; ++m)
    for (int r = 0; r < R; ++r) C[r * ldc + m] = lane_sum<Real>(acc[m][r]);
}

// Slots per row of W in row_dot_block: R rounded up to a power of two.
template <int R>
constexpr int row_slots() {
  return R <= 1 ? 1 : R <= 2 ? 2 : R <= 4 ? 4 : 8;
}

// C[r, m] for R rows of A and the first `rows` of W/S rows of W (W the vector width,
// S = row_slots<R>): one accumulator a pair, W in all, summed together by
// simd::lane_sums. Summing each alone (row_dot_tile) cost more than the
// multiply-adds at small K: a GRU cell step of I=64, H=128 at N=1 took 7 of its
// 10.6 us in those sums. A block of fewer rows (the last of a weight) repeats its
// last row in the slots past them and keeps only its own sums. The sums come out as
// row_dot_tile's (simd::lane_sums adds in lane_sum's order).
template <typename Real, int R>
inline void row_dot_block(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* Wm,
                          int64_t K, int64_t rows) {
  constexpr int W = static_cast<int>(kWidth<Real>), S = row_slots<R>(), RB = W / S;
  const Real* w_row[RB];
  for (int m = 0; m < RB; ++m) w_row[m] = Wm + (m < rows ? m : rows - 1) * K;
  V<Real> acc[W];
  for (int i = 0; i < W; ++i) acc[i] = V<Real>{};
  for_lanes<Real>(K, [&](int64_t k, int64_t n) {
    V<Real> a[R];
    for (int r = 0; r < R; ++r) a[r] = ld(A + r * lda + k, n);
    for (int m = 0; m < RB; ++m) {
      const V<Real> w = ld(w_row[m] + k, n);
      for (int r = 0; r < R; ++r) acc[m * S + r] += a[r] * w;
    }
  });
  const V<Real> sums = simd::lane_sums<Real>(acc);
  if constexpr (R == 1) {
    st(C, sums, rows);
  } else {
    Real lanes[W];
    simd::store<Real>(lanes, sums);
    for (int64_t m = 0; m < rows; ++m)
      for (int r = 0; r < R; ++r) C[r * ldc + m] = lanes[m * S + r];
  }
}

// R rows of A against every row of W: blocks of rows of W summed together
// (row_dot_block); single rows where the vector is narrower than R's slots (the
// portable build's double).
template <typename Real, int R>
inline void row_dot_rows(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* Wm,
                         int64_t M, int64_t K) {
  constexpr int RB = static_cast<int>(kWidth<Real>) / row_slots<R>();
  if constexpr (RB >= 1) {
    for (int64_t m = 0; m < M; m += RB)
      row_dot_block<Real, R>(C + m, ldc, A, lda, Wm + m * K, K, M - m < RB ? M - m : RB);
  } else {
    for (int64_t m = 0; m < M; ++m) row_dot_tile<Real, R, 1>(C + m, ldc, A, lda, Wm + m * K, K);
  }
}

// C[n, M] = A[n, K] W[M, K]^T, all row-major, C's rows ldc apart, A and W contiguous.
template <typename Real>
inline void row_gemm(Real* C, int64_t ldc, const Real* A, const Real* Wm, int64_t n, int64_t K,
                     int64_t M) {
  for (int64_t r = 0; r < n; r += 4) {
    Real* c = C + r * ldc;
    const Real* a = A + r * K;
    switch (n - r < 4 ? n - r : 4) {
      case 4:
        row_dot_rows<Real, 4>(c, ldc, a, K, Wm, M, K);
        break;
      case 3:
        row_dot_rows<Real, 3>(c, ldc, a, K, Wm, M, K);
        break;
      case 2:
        row_dot_rows<Real, 2>(c, ldc, a, K, Wm, M, K);
        break;
      default:
        row_dot_rows<Real, 1>(c, ldc, a, K, Wm, M, K);
    }
  }
}

// A weight gradient dW[M, cols] = A^T B (+ dW when accumulate), A = dG [K, M] and
// B = h or x [K, cols] (rows lda and ldb apart), summed over its K row-steps.
// For K up to kSmallGemmRows (a cell step's backward), one pass over dW: OpenBLAS
// first scales all of dW by beta in a pass of its own and packs A and B, which at
// K = 1 is most of the work (LSTM H = 512, N = 1: a memset of dW and the packing
// were a third of the step's backward). Each element is summed over k in order,
// so the result does not depend on how the rows of dW are shared out.
template <typename Real>
inline void weight_gradient_product(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                                    int64_t ldb, int64_t M, int64_t K, int64_t cols, Real beta) {
  if (K > kSmallGemmRows) {
    gemm<Real>(true, false, M, cols, K, Real(1), A, lda, B, ldb, beta, C, ldc);
    return;
  }
  constexpr int64_t W = kWidth<Real>;
  const bool accumulate = beta != Real(0);
  for (int64_t m = 0; m < M; ++m) {
    V<Real> a[kSmallGemmRows];
    for (int64_t k = 0; k < K; ++k) a[k] = splat<Real>(A[k * lda + m]);
    Real* c = C + m * ldc;
    int64_t j = 0;
    for (; j + 4 * W <= cols; j += 4 * W) {  // four independent sums in flight
      V<Real> acc[4];
      for (int v = 0; v < 4; ++v) acc[v] = accumulate ? ld(c + j + v * W, W) : V<Real>{};
      for (int64_t k = 0; k < K; ++k)
        for (int v = 0; v < 4; ++v) acc[v] += a[k] * ld(B + k * ldb + j + v * W, W);
      for (int v = 0; v < 4; ++v) st(c + j + v * W, acc[v], W);
    }
    for_lanes<Real>(cols - j, [&](int64_t jj, int64_t n) {
      V<Real> acc = accumulate ? ld(c + j + jj, n) : V<Real>{};
      for (int64_t k = 0; k < K; ++k) acc += a[k] * ld(B + k * ldb + j + jj, n);
      st(c + j + jj, acc, n);
    });
  }
}

// Row-steps (steps x rows) up to which a forward of few rows uses the weights in
// place (row_gemm): no packing, no transposing. Measured with AVX2, float32, LSTM
// H = I = 128: in place about 7 us per step and row, packed 5 us per step plus
// 55 us per call at N = 1, one thread (even near T = 30); at N = 4 even near T = 5
// with one thread or two. Packing reads and writes all of W_hh, which a call of a
// few steps cannot repay at any size.
constexpr int64_t kDirectRowSteps = 20;
constexpr int64_t kDirectRowStepsThreaded = 16;
// Weights (elements of one product's W) from which the direct path cuts each
// product over the pool's threads (direct_gemm); below, the calling thread does it
// alone. Alone, a pool of 2 threads already gains from 2^18 (LSTM H = 256, T = 1,
// N = 1 inference: about 0.2 ms on one thread, 0.11-0.17 ms on two, AVX2), but in
// a torch model the step is called between torch's own parallel ops, whose OpenMP
// workers hold the other core for a while, and there one thread did as well or
// better: a 100-step LSTMCell(256) loop, 2 threads, 14-16 ms at 2^18 and 12-15 ms
// at 2^20 (torch 16-19 ms). From 2^20 (4 MB of float32: LSTMCell(1024)) streaming
// the weights is long enough that two cores win everywhere.
constexpr int64_t kDirectSerialWeights = int64_t(1) << 20;

// Whether a forward multiplies by its weights in place (see row_gemm).
inline bool direct_weights(const LayerShape& s) {
  if (s.N > kSmallGemmRows) return false;
  const int64_t row_steps = steps_of(s) * s.N;
  return row_steps <= (s.threads <= 1 ? kDirectRowSteps : kDirectRowStepsThreaded);
}

// dst[cols, rows] = src[rows, cols]^T (weights laid out once per call), in
// 16 x 16 tiles so that both sides stay in cache lines already loaded.
template <typename Real>
inline void transpose(Real* dst, const Real* src, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows;
      const int64_t c1 = c0 + kTile < cols ? c0 + kTile : cols;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
}

// Whether any step of the walk runs few enough rows for small_gemm (then the
// forward lays out the transposed weights it needs, once per call).
// The per-step product C[n, cols] = A[n, K] op(W) (+ C when accumulate):
//   W: the weight as stored, used by OpenBLAS for many rows; op(W) = W^T when transposed_W
//   B: op(W) laid out row-major [K, cols] for small_gemm (may be W itself when not transposed)
template <typename Real>
inline void step_gemm(Real* C, const Real* A, const Real* W, bool transposed_W, const Real* B,
                      int64_t n, int64_t K, int64_t cols, bool accumulate) {
  if (n <= kSmallGemmRows && B)
    small_gemm(C, cols, A, K, B, cols, n, K, cols, accumulate);
  else
    gemm<Real>(false, transposed_W, n, cols, K, Real(1), A, K, W, transposed_W ? K : cols,
               accumulate ? Real(1) : Real(0), C, cols);
}

// ---------------------------------------------------------------------------
// GEMMs outside the time loop.

// xproj = x W_ih^T for all T*N rows at once (biases are added in the pointwise step).
template <typename Real>
inline void input_projection(Real* xproj, const Real* x, const Real* W_ih, int64_t GH,
                             const LayerShape& s) {
  gemm<Real>(false, true, x_rows(s), GH, s.I, Real(1), x, s.I, W_ih, s.I, Real(0), xproj, GH);
}

// sum[j] = sum over rows of a[r, j], a: [rows, width].
template <typename Real>
inline void column_sums(Real* sum, const Real* a, int64_t rows, int64_t width) {
  for (int64_t j = 0; j < width; ++j) sum[j] = Real(0);
  for (int64_t r = 0; r < rows; ++r) {
    const Real* ar = a + r * width;
    for_lanes<Real>(width, [&](int64_t j, int64_t n) { st(sum + j, ld(sum + j, n) + ld(ar + j, n), n); });
  }
}
template <typename Real>
inline void add_into(Real* acc, const Real* v, int64_t n_total) {
  for_lanes<Real>(n_total, [&](int64_t j, int64_t n) { st(acc + j, ld(acc + j, n) + ld(v + j, n), n); });
}
// acc += v (beta 1) or acc = v (beta 0, acc may hold anything), as LayerGrads::beta says.
template <typename Real>
inline void add_or_assign(Real* acc, const Real* v, int64_t n_total, Real beta) {
  if (beta != Real(0))
    add_into(acc, v, n_total);
  else
    std::copy(v, v + n_total, acc);
}

// Where the backward keeps its per-step gate gradients: when the walk is the
// identity (forward direction, no lengths) steps are times, so the input-side
// gradient goes straight into the caller's dG_x; otherwise into buf and it is
// reordered after the loop.
template <typename Real>
inline Real* input_gate_grads(Real* dG_x, Real* scratch, const LayerShape& s) {
  return Walk(s).identity() ? dG_x : scratch;
}

// After the backward time loop, with dG and dG_in for all S steps (sorted rows,
// zero for rows past their length; dG_in may be dG):
//   dW_hh += dG^T h_prev and db_hh += sum dG    (one GEMM / one pass over all steps)
//   dG_x = dG_in in x's order (a copy unless dG_in already is dG_x),
//   dW_ih += dG_x^T x and db_ih += sum dG_in.
// dG_x[t, rows[b]] = dG_in[k, b] at t = time(k, b), for t in [t_first, t_last);
// zero where a row has no step. Puts per-step gate gradients (sorted rows, step
// order) back in x's time order for the after-loop GEMMs; in x's packed order
// (dG_x[offsets[t] + b], running rows only) when x is packed (LayerShape::offsets).
template <typename Real>
void gate_gradients_to_time_order(Real* dG_x, const Real* dG_in, const Walk& walk, int64_t GH,
                                  const LayerShape& s, int64_t t_first, int64_t t_last) {
  const int64_t N = s.N;
  if (s.offsets) {
    for (int64_t t = t_first; t < t_last; ++t)
      for (int64_t b = 0; b < s.offsets[t + 1] - s.offsets[t]; ++b) {
        const int64_t k = s.reverse ? walk.length(b) - 1 - t : t;
        copy_row(dG_x + (s.offsets[t] + b) * GH, dG_in + (k * N + b) * GH, GH);
      }
    return;
  }
  for (int64_t t = t_first; t < t_last; ++t)
    for (int64_t b = 0; b < N; ++b) {
      Real* dst = dG_x + (t * N + walk.row(b)) * GH;
      if (t < walk.length(b)) {
        const int64_t k = s.reverse ? walk.length(b) - 1 - t : t;
        copy_row(dst, dG_in + (k * N + b) * GH, GH);
      } else {
        zero_row(dst, GH);
      }
    }
}

template <typename Real>
inline void weight_gradients(Real* dG_x, const LayerGrads<Real>& dw, Real* dsum, const Real* dG,
                             const Real* dG_in, const Real* h_prev, const Real* x, int64_t GH,
                             const LayerShape& s) {
  const Walk walk(s);
  const int64_t S = steps_of(s), N = s.N, H_out = h_out(s);
  weight_gradient_product(dw.dW_hh, H_out, dG, GH, h_prev, H_out, GH, S * N, H_out, dw.beta);
  if (dw.db_hh) {
    column_sums(dsum, dG, S * N, GH);
    add_or_assign(dw.db_hh, dsum, GH, dw.beta);
  }
  if (dw.db_ih) {
    if (dG_in != dG) column_sums(dsum, dG_in, S * N, GH);
    add_or_assign(dw.db_ih, dsum, GH, dw.beta);
  }
  if (dG_in != dG_x) {
    gate_gradients_to_time_order(dG_x, dG_in, walk, GH, s, 0, s.T);
  }
  weight_gradient_product(dw.dW_ih, s.I, dG_x, GH, x, s.I, GH, x_rows(s), s.I, dw.beta);
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
