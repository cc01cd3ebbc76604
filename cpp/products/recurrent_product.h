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
// The backward's dh = dG W_hh runs on the same kind of tiles (pack_column_panels,
// dh_product). Included only by the per-ISA kernel units (see kernel_unit.h).
#pragma once

#include <type_traits>

#include "products/small_products.h"

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
// Each gate's U rows are moved U columns at a time as a U x U block transposed in
// registers (simd::transpose); columns past the last whole block one by one.
template <typename Real, int G>
inline void pack_gate_panels(Real* panels, const Real* W_hh, int64_t H, int64_t K, int64_t u0,
                             int64_t u1) {
  constexpr int64_t U = kWidth<Real>, C = kChunkGates<G>;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t rows = H - u * U < U ? H - u * U : U;  // units of this block (zero past H)
    for (int64_t g = 0; g < G; ++g) {
      Real* dst = panels + u * K * G * U + (g / C) * K * C * U + (g % C) * U;
      const Real* w = W_hh + (g * H + u * U) * K;
      int64_t k = 0;
      for (; k + U <= K; k += U) {
        V<Real> block[U];
        for (int64_t l = 0; l < U; ++l)
          block[l] = l < rows ? simd::load<Real>(w + l * K + k) : V<Real>{};
        simd::transpose<Real>(block);
        for (int64_t kk = 0; kk < U; ++kk) simd::store<Real>(dst + (k + kk) * C * U, block[kk]);
      }
      for (; k < K; ++k)
        for (int64_t l = 0; l < U; ++l) dst[k * C * U + l] = l < rows ? w[l * K + k] : Real(0);
    }
  }
}

// acc[r][q * C + c] = sum over k of A[r, k] * chunk_q[k, c, :] for R rows of A
// (lda apart) and NC chunks of C gates each (chunk_q = chunks + q * K * C * U).
// With fewer than 8 accumulators the FMA latency would bound the loop, so even and
// odd k then go to two sets of accumulators, added at the end. That is decided on
// R x kSplitNV vectors when given: a caller whose tiles' widths depend on how the
// work is shared among threads (dh_tile: one unit block or two) gives the widest,
// so that each element is summed the same way whatever the thread count. Always
// inlined: out of line, the accumulators go through memory (an Elman RNN's step,
// whose tile GCC once chose not to inline when its caller grew, ran 15% slower).
template <typename Real, int R, int C, int NC, int kSplitNV = 0>
LSTMFAST_ALWAYS_INLINE void gate_tile(V<Real> (&acc)[R][NC * C], const Real* A, int64_t lda,
                                      const Real* chunks, int64_t K) {
  constexpr int64_t U = kWidth<Real>, CU = C * U;
  constexpr int NV = NC * C;  // vectors per row
  const int64_t chunk_stride = K * CU;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V<Real>{};
  int64_t k = 0;
  if constexpr (R * (kSplitNV > 0 ? kSplitNV : NV) < 8) {
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
// (3 rows x 4 gates needed 17 registers: 70-80%). With the 32 registers of
// AVX-512 a GRU tile takes 8 rows x 3 gates (24 accumulators), each weight vector
// then serving twice the rows: GRU T=50 N=16 I=H=1024 inference, two threads, went
// from 0.85x to 1.02x ONNX Runtime (five pairs of processes, each process timing
// lstmfast against ONNX Runtime); N=8..32 H=256 gained 0-10%, N=1 within the noise.
template <int G>
constexpr int kTileRows = G == 4 ? 6 : (G == 3 && simd::kVectorBytes == 64 ? 8 : 4);
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

// ---------------------------------------------------------------------------
// A step of one row that carries part of the input projection along.
//
// With one row, a step's product reads all of W_hh from L2 for one multiply-add per
// weight: the loads set its pace and the FMA units idle more than half the time,
// while the input projection, run apart a chunk of steps at a time, is the
// opposite (LSTM T=100 N=1 I=H=128, one thread, Zen 4: about 2.8 us a step for the
// product, 1.1 for the projection). So while one chunk of kCarriedRows steps runs,
// each step adds a slice of the inputs (columns k0..k1-1 of x) into the next
// chunk's rows of xproj, its multiply-adds interleaved with the product's in one
// loop: 401 -> 368 us for that layer (I=256: 516 -> 456). Each element of xproj
// is still summed over k in order (kept in xproj between slices), as project_steps'
// tiles of several rows sum it.
constexpr int64_t kCarriedRows = 8;

template <typename Real>
struct CarriedProjection {
  const Real* x;       // the first row of x to project (rows I apart)
  Real* xproj;         // its row of xproj (rows ldx apart)
  const Real* W_ih_p;  // W_ih packed as W_hh (pack_gate_panels, K = I)
  int64_t rows, I, H, ldx;
  int64_t k0, k1;  // the inputs this step adds in
};

// Gates of the carried projection per pass: 8 rows of 2 gates keep 16
// accumulators beside the product's 2 x G (4 rows of 4 gates, or 16 rows of 1,
// measured slower: more xproj traffic, or spills). A gate a pass for an odd G.
template <int G>
constexpr int kCarriedGates = G % 2 == 0 ? 2 : 1;

// Whether this target's kernels carry at all: with AVX-512's 32 vector registers.
// In 16 the carried rows' 16 accumulators and the product's 2 x G spill (LSTM T=100
// N=1 I=H=128, one thread, the AVX2 kernels on a Zen 4: 410 -> 535 us carried; the
// portable ones 940 -> 1100-1130).
constexpr bool kCarryingFits = simd::kVectorBytes == 64;

// acc[v] = h W_hh^T of gate v for unit block u (one row: gate_tile<Real, 1, C, G / C>'s
// sums, even and odd k apart), while rows CR of the carried projection get
// x[:, k0:k1] W_ih[:, k0:k1]^T of the block's gates added in.
template <typename Real, int G, int CR>
LSTMFAST_ALWAYS_INLINE void carrying_gate_block(V<Real> (&acc)[G], const Real* h,
                                                const Real* chunks, int64_t K,
                                                const CarriedProjection<Real>& cp, int64_t u,
                                                int64_t j, int64_t lanes) {
  constexpr int64_t U = kWidth<Real>;
  constexpr int C = kChunkGates<G>, CG = kCarriedGates<G>;
  constexpr int64_t CU = C * U;
  const int64_t chunk_stride = K * CU;
  // Kept apart from acc until the end: the stores into xproj could alias acc (the
  // caller's), which would then go through memory at every one of them.
  V<Real> even[G], odd[G];
  for (int v = 0; v < G; ++v) even[v] = odd[v] = V<Real>{};
  int64_t kh = 0;
  auto product_pair = [&]() LSTMFAST_LAMBDA_INLINE {
    const V<Real> h0 = splat<Real>(h[kh]), h1 = splat<Real>(h[kh + 1]);
    for (int v = 0; v < G; ++v) {
      const Real* p = chunks + (v / C) * chunk_stride + kh * CU + (v % C) * U;
      even[v] += h0 * simd::load<Real>(p);
      odd[v] += h1 * simd::load<Real>(p + CU);
    }
    kh += 2;
  };
  const int64_t slice = cp.k1 - cp.k0;
  if (slice > 0) {
    constexpr int passes = G / CG;
    // The product's K / 2 pairs of k spread evenly over the projection's passes x
    // slice iterations, as a line is drawn on a grid (more pairs than iterations, or
    // fewer).
    const int64_t iterations = passes * slice, pairs = K / 2;
    int64_t owed = 0;
    for (int q = 0; q < passes; ++q) {
      const Real* w[CG];
      Real* out[CG];
      for (int c = 0; c < CG; ++c) {
        const int g = q * CG + c;
        w[c] = cp.W_ih_p + u * cp.I * G * U + (g / C) * cp.I * CU + (g % C) * U;
        out[c] = cp.xproj + g * cp.H + j;
      }
      V<Real> sum[CR][CG];
      for (int r = 0; r < CR; ++r)
        for (int c = 0; c < CG; ++c)
          sum[r][c] = cp.k0 == 0 ? V<Real>{} : ld(out[c] + r * cp.ldx, lanes);
      for (int64_t k = cp.k0; k < cp.k1; ++k) {
        V<Real> wk[CG];
        for (int c = 0; c < CG; ++c) wk[c] = simd::load<Real>(w[c] + k * CU);
        for (int r = 0; r < CR; ++r) {
          const V<Real> a = splat<Real>(cp.x[r * cp.I + k]);
          for (int c = 0; c < CG; ++c) sum[r][c] += a * wk[c];
        }
        for (owed += pairs; owed >= iterations; owed -= iterations) product_pair();
      }
      for (int r = 0; r < CR; ++r)
        for (int c = 0; c < CG; ++c) st(out[c] + r * cp.ldx, sum[r][c], lanes);
    }
  }
  while (kh + 2 <= K) product_pair();
  for (int v = 0; v < G; ++v) even[v] += odd[v];
  if (kh < K) {
    const V<Real> a = splat<Real>(h[kh]);
    for (int v = 0; v < G; ++v)
      even[v] += a * simd::load<Real>(chunks + (v / C) * chunk_stride + kh * CU + (v % C) * U);
  }
  for (int v = 0; v < G; ++v) acc[v] = even[v];
}

// carrying_gate_block for cp.rows (1..CR) rows, chosen in line: through
// last_row_tile, called out of line, acc went through memory.
template <typename Real, int G, int CR>
LSTMFAST_ALWAYS_INLINE void carrying_gate_rows(V<Real> (&acc)[G], const Real* h, const Real* chunks,
                                               int64_t K, const CarriedProjection<Real>& cp,
                                               int64_t u, int64_t j, int64_t lanes) {
  if constexpr (CR > 1) {
    if (cp.rows < CR) return carrying_gate_rows<Real, G, CR - 1>(acc, h, chunks, K, cp, u, j, lanes);
  }
  carrying_gate_block<Real, G, CR>(acc, h, chunks, K, cp, u, j, lanes);
}

// recurrent_step for one row (n = 1) carrying cp (rows 1..kCarriedRows).
template <typename Real, int G, typename Epilogue>
inline void recurrent_row_step_carrying(const Real* h_prev, int64_t K, const Real* panels,
                                        int64_t H, int64_t u0, int64_t u1,
                                        const CarriedProjection<Real>& cp, Epilogue&& epilogue) {
  constexpr int64_t U = kWidth<Real>;
  for (int64_t u = u0; u < u1; ++u) {
    const Real* panel = panels + u * K * G * U;
    const int64_t j = u * U, lanes = H - j < U ? H - j : U;
    V<Real> acc[G];
    carrying_gate_rows<Real, G, kCarriedRows>(acc, h_prev, panel, K, cp, u, j, lanes);
    epilogue(0, j, lanes, acc);
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
  gate_tile<Real, R, 1, NB, 2>(acc, dG, ldg, panels + u * GK * U, GK);
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
// against 36.2 MB); without it, through OpenBLAS, about 7% slower at N=8 (see
// tiled_gemm, which since reads it as stored).
template <typename Real>
inline void dh_product_stored(Real* dh, const Real* dG, int64_t ldg, const Real* W_hh, int64_t n,
                              int64_t GK, int64_t H, int64_t j0, int64_t j1, bool accumulate) {
  if (n <= 0 || j1 <= j0) return;
  times_stored_matrix(dh + j0, H, dG, ldg, W_hh + j0, H, n, GK, j1 - j0, accumulate);
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
