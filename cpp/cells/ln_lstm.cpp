// Layer-normalized LSTM (torchaudio's RNN-T form, docs/cells.md), one layer in one
// direction: forward, then backward (BPTT). Compiled once per instruction set (see
// cell.h); arguments are documented in lstmfast.h.
//
//   a     = x W_ih^T + h W_hh^T                      blocks i, f, g, o of H; no biases
//   gates = LN_g(a) = z_g gamma_g + beta_g,  z_g = (a - mean(a)) r_g,  r_g = 1 / sqrt(var(a) + eps)
//   i, f, o = sigmoid(gates)   g = tanh(gates)
//   c'    = LN_c(f c + i g)                          (what is carried)
//   h'    = o tanh(c')
//
// A layer norm needs a whole row, while the recurrent product is shared by units
// (recurrent_product.h). So a step has two phases with a barrier between them: each
// thread computes a for its unit blocks, all rows; then each thread takes its share
// of the rows for the two layer norms, the activations and the state update.
// Backward likewise: the row phase (through both layer norms) and, after a barrier,
// dh = dG W_hh by unit blocks, and a barrier again, as the next row phase reads whole
// rows of dh. The layer norms' parameter gradients are one reduction after the loop.
#include <math.h>

#include <type_traits>

#include "cells/cell.h"
#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// Saved per row-step (LayerBuffers::ln): z_g [4H], z_c [H], r_g, r_c.
inline int64_t ln_stride(int64_t H) { return 5 * H + 2; }

// mean and 1 / sqrt(var + eps) of n values: the variance of centered values (a
// second pass), as nn.LayerNorm, not E[a^2] - mean^2, which cancels.
template <typename Real>
inline void moments(const Real* a, int64_t count, Real eps, Real& mean, Real& rstd) {
  V<Real> sum{};
  for_lanes<Real>(count, [&](int64_t j, int64_t n) { sum += ld(a + j, n); });
  mean = lane_sum<Real>(sum) / Real(count);
  const V<Real> m = splat<Real>(mean);
  V<Real> squares{};
  Real tail = 0;
  for_lanes<Real>(count, [&](int64_t j, int64_t n) {
    if (n == kWidth<Real>) {
      const V<Real> d = ld(a + j, n) - m;
      squares += d * d;
    } else {  // the lanes past n would add mean^2 each
      for (int64_t l = 0; l < n; ++l) tail += (a[j + l] - mean) * (a[j + l] - mean);
    }
  });
  const Real var = (lane_sum<Real>(squares) + tail) / Real(count);
  rstd = Real(1) / static_cast<Real>(::sqrt(static_cast<double>(var + eps)));  // libm's, not an inline copy
}

// z = (a - mean) * rstd for n values (z may be a).
template <typename Real>
inline void normalize(Real* z, const Real* a, int64_t count, Real mean, Real rstd) {
  const V<Real> m = splat<Real>(mean), r = splat<Real>(rstd);
  for_lanes<Real>(count, [&](int64_t j, int64_t n) { st(z + j, (ld(a + j, n) - m) * r, n); });
}

// One row of one step, after the recurrent product.
//   a: [4H] in: pre-activations; clobbered (scratch)
//   c_next, h_next, y: [H] out;  c_prev: [H]
//   gates: training [4H] out: i, f, g, o;  ln: training [ln_stride(H)] out (see above)
//   lnw: [10H] gamma_g, beta_g, gamma_c, beta_c (LayerWeights::ln)
template <typename Real, bool kTraining>
inline void ln_lstm_forward_row(Real* a, Real* c_next, Real* h_next, Real* y, Real* gates,
                                Real* ln, const Real* c_prev, const Real* lnw, Real eps,
                                int64_t H) {
  const int64_t GH = 4 * H;
  const Real *gamma_g = lnw, *beta_g = lnw + GH, *gamma_c = lnw + 2 * GH, *beta_c = gamma_c + H;
  Real mean, rstd;
  moments(a, GH, eps, mean, rstd);
  Real* z_g = kTraining ? ln : a;
  normalize(z_g, a, GH, mean, rstd);
  // Inference keeps o where z_g's o block was (each lane read before it is written).
  Real* o_row = kTraining ? gates + 3 * H : a + 3 * H;
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    auto gate = [&](int64_t g) {
      const int64_t at = g * H + j;
      return ld(z_g + at, n) * ld(gamma_g + at, n) + ld(beta_g + at, n);
    };
    const V<Real> i = simd::vsigmoid<Real>(gate(0)), f = simd::vsigmoid<Real>(gate(1));
    const V<Real> g = simd::vtanh(gate(2)), o = simd::vsigmoid<Real>(gate(3));
    st(c_next + j, f * ld(c_prev + j, n) + i * g, n);
    if constexpr (kTraining) {
      st(gates + j, i, n);
      st(gates + H + j, f, n);
      st(gates + 2 * H + j, g, n);
    }
    st(o_row + j, o, n);
  });
  Real mean_c, rstd_c;
  moments(c_next, H, eps, mean_c, rstd_c);
  Real* z_c = kTraining ? ln + GH : c_next;
  normalize(z_c, c_next, H, mean_c, rstd_c);
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    const V<Real> c = ld(z_c + j, n) * ld(gamma_c + j, n) + ld(beta_c + j, n);
    const V<Real> h = ld(o_row + j, n) * simd::vtanh(c);
    st(c_next + j, c, n);
    st(h_next + j, h, n);
    st(y + j, h, n);
  });
  if constexpr (kTraining) {
    ln[5 * H] = rstd;
    ln[5 * H + 1] = rstd_c;
  }
}

template <typename Real, bool kTraining>
void forward_on_rows(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                     const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                     const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = 4 * H, S = steps_of(s);
  const Real eps = static_cast<Real>(s.ln_eps);
  gather_state(buf.h, h0, H, walk);
  gather_state(buf.c, c0, H, walk);
  forward_on_pool<Real, 4>(buf, x, GH, w, s, [&](int64_t k, int64_t n, const UnitShare& mine) {
    const Real* h_prev = buf.h + slot(k, kTraining) * N * H;
    Real* h_next = buf.h + slot(k + 1, kTraining) * N * H;
    const Real* c_prev = buf.c + slot(k, kTraining) * N * H;
    Real* c_next = buf.c + slot(k + 1, kTraining) * N * H;
    auto epilogue = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
      const Real* xp = buf.xproj + walk.x_row(k, b) * GH + j;
      Real* a = buf.rec + b * GH + j;
      for (int64_t g = 0; g < 4; ++g) st(a + g * H, acc[g] + ld(xp + g * H, lanes), lanes);
    };
    recurrent_step<Real, 4>(product_input(buf, k, s), H, n, H, buf.W_hh_p, H, mine.u0, mine.u1,
                            epilogue);
    pool_barrier();  // the row phase reads whole rows of a
    int64_t b0, b1;
    share(N, mine.tid, mine.nt, b0, b1);
    for (int64_t b = b0; b < b1; ++b) {
      if (b >= n) {  // finished rows keep their state
        copy_row(h_next + b * H, h_prev + b * H, H);
        copy_row(c_next + b * H, c_prev + b * H, H);
        continue;
      }
      ln_lstm_forward_row<Real, kTraining>(
          buf.rec + b * GH, c_next + b * H, h_next + b * H, y + walk.at(k, b) * ldy,
          kTraining ? buf.gates + (k * N + b) * GH : nullptr,
          kTraining ? buf.ln + (k * N + b) * ln_stride(H) : nullptr, c_prev + b * H, w.ln, eps, H);
    }
    // forward_on_pool masks h for recurrent dropout by units: all its rows must be written
    if (buf.hm) pool_barrier();
  });
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * H, H, walk);
  scatter_state(c_n, buf.c + slot(S, kTraining) * N * H, H, walk);
}

// The forward of an inference layer with reduced weights (reduced_steps): the
// products by panels, then each row's pre-activations a = xproj + rec and its row
// phase, as forward_on_rows's. float32 only, as reduced weights are.
template <typename Real>
void forward_reduced(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                     const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                     const LayerShape& s) {
  if constexpr (std::is_same<Real, float>::value) {
    const Walk walk(s);
    const int64_t N = s.N, H = s.H, GH = 4 * H, S = steps_of(s);
    const Real eps = static_cast<Real>(s.ln_eps);
    gather_state(buf.h, h0, H, walk);
    gather_state(buf.c, c0, H, walk);
    reduced_steps(buf, x, GH, w, s, [&](int64_t k, int64_t b, bool running) {
      const Real* c_prev = buf.c + (k & 1) * N * H + b * H;
      Real* c_next = buf.c + ((k + 1) & 1) * N * H + b * H;
      if (!running) return copy_row(c_next, c_prev, H);
      Real* a = buf.rec + b * GH;
      add_into(a, buf.xproj + walk.x_row(k, b) * GH, GH);
      ln_lstm_forward_row<Real, false>(a, c_next, buf.h + ((k + 1) & 1) * N * H + b * H,
                                       y + walk.at(k, b) * ldy, nullptr, nullptr, c_prev, w.ln,
                                       eps, H);
    });
    scatter_state(h_n, buf.h + (S & 1) * N * H, H, walk);
    scatter_state(c_n, buf.c + (S & 1) * N * H, H, walk);
  }
}

// Through one layer norm backward: returns, in dx, r (gy - mean(gy) - z mean(gy z)) with
// gy = dy gamma, for n values (dx may be dy).
template <typename Real>
inline void layer_norm_backward(Real* dx, const Real* dy, const Real* z, const Real* gamma,
                                Real rstd, int64_t count) {
  V<Real> sum_gy{}, sum_gyz{};
  for_lanes<Real>(count, [&](int64_t j, int64_t n) {
    const V<Real> gy = ld(dy + j, n) * ld(gamma + j, n);  // 0 past n: dy loads 0 there
    sum_gy += gy;
    sum_gyz += gy * ld(z + j, n);
  });
  const V<Real> mean_gy = splat<Real>(lane_sum<Real>(sum_gy) / Real(count));
  const V<Real> mean_gyz = splat<Real>(lane_sum<Real>(sum_gyz) / Real(count));
  const V<Real> r = splat<Real>(rstd);
  for_lanes<Real>(count, [&](int64_t j, int64_t n) {
    const V<Real> gy = ld(dy + j, n) * ld(gamma + j, n);
    st(dx + j, r * (gy - mean_gy - ld(z + j, n) * mean_gyz), n);
  });
}

// Backward of one row of one step.
//   dG: [4H] out: gradient of a;  dln: [5H] out: gradients of LN_g's output (4H) and of c' (H)
//   dh: [H] gradient of h';  dy: [H] added to dh, or nullptr
//   dc: [H] in: gradient of c'; out: gradient of c
//   gates: [4H] saved i, f, g, o;  ln: [ln_stride(H)] saved;  c_prev: [H] c;  c_next: [H] c'
template <typename Real>
inline void ln_lstm_backward_row(Real* dG, Real* dln, const Real* dh, const Real* dy, Real* dc,
                                 const Real* gates, const Real* ln, const Real* c_prev,
                                 const Real* c_next, const Real* lnw, int64_t H) {
  const int64_t GH = 4 * H;
  const V<Real> one = splat<Real>(1);
  Real* dc_out = dln + GH;  // gradient of c' (LN_c's output)
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    V<Real> dhj = ld(dh + j, n);
    if (dy) dhj += ld(dy + j, n);
    const V<Real> o = ld(gates + 3 * H + j, n);
    const V<Real> tc = simd::vtanh(ld(c_next + j, n));  // recomputed: tanh(c') is not saved
    st(dln + 3 * H + j, dhj * tc * o * (one - o), n);
    st(dc_out + j, ld(dc + j, n) + dhj * o * (one - tc * tc), n);
  });
  Real* dc_raw = dc;  // gradient of f c + i g, written over dc (read above)
  layer_norm_backward(dc_raw, dc_out, ln + GH, lnw + 2 * GH, ln[5 * H + 1], H);
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    const V<Real> d = ld(dc_raw + j, n);
    const V<Real> i = ld(gates + j, n), f = ld(gates + H + j, n), g = ld(gates + 2 * H + j, n);
    st(dln + j, d * g * i * (one - i), n);
    st(dln + H + j, d * ld(c_prev + j, n) * f * (one - f), n);
    st(dln + 2 * H + j, d * i * (one - g * g), n);
    st(dc + j, d * f, n);
  });
  layer_norm_backward(dG, dln, ln, lnw, ln[5 * H], GH);
}

// After the loop, columns col0..col1 of the layer norms' parameter gradients:
// d gamma[j] = sum of dln_rows[r, j] z[r, j], d beta[j] = sum of dln_rows[r, j] over the
// row-steps r that ran (the saved z of the others was never written), always in the
// same order.
template <typename Real>
inline void layer_norm_gradients(const LayerGrads<Real>& dw, const Real* dln_rows, const Real* ln,
                                 const Walk& walk, int64_t H, int64_t col0, int64_t col1) {
  const int64_t GH = 4 * H, width = 5 * H, N = walk.s.N, S = steps_of(walk.s);
  for (int64_t j = col0; j < col1; ++j) {
    Real d_gamma = 0, d_beta = 0;
    for (int64_t k = 0; k < S; ++k)
      for (int64_t r = k * N, end = k * N + walk.active(k); r < end; ++r) {
        const Real d = dln_rows[r * width + j];
        d_gamma += d * ln[r * ln_stride(H) + j];
        d_beta += d;
      }
    Real* gamma = j < GH ? dw.dln_g_w + j : dw.dln_c_w + (j - GH);
    Real* beta = j < GH ? dw.dln_g_b + j : dw.dln_c_b + (j - GH);
    // beta 0 overwrites: the arrays may hold anything then, NaN included
    *gamma = dw.beta == Real(0) ? d_gamma : *gamma + d_gamma;
    *beta = dw.beta == Real(0) ? d_beta : *beta + d_beta;
  }
}

template <typename Real>
void backward_on_rows(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                      const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                      const Real* dh_n, const Real* dc_n, const Real* x,
                      const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = 4 * H, S = steps_of(s);
  Real* dG = input_gate_grads(dG_x, buf.dG, s);
  gather_state(buf.dh, dh_n, H, walk);
  gather_state(buf.dc, dc_n, H, walk);
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    if (buf.W_hh_c) pack_column_panels(buf.W_hh_c, w.W_hh, GH, H, mine.u0, mine.u1);
    int64_t b0, b1;
    share(N, tid, nt, b0, b1);
    for (int64_t k = S - 1; k >= 0; --k) {
      const int64_t n = walk.active(k);
      Real* dG_step = dG + k * N * GH;
      Real* dln_step = buf.dln_rows + k * N * 5 * H;
      for (int64_t b = b0; b < b1; ++b) {
        if (b >= n) {  // no step here: no gradient, and dh, dc pass through unchanged
          zero_row(dG_step + b * GH, GH);
          continue;
        }
        ln_lstm_backward_row<Real>(dG_step + b * GH, dln_step + b * 5 * H, buf.dh + b * H,
                                   dy ? dy + walk.at(k, b) * lddy : nullptr, buf.dc + b * H,
                                   buf.gates + (k * N + b) * GH, buf.ln + (k * N + b) * ln_stride(H),
                                   buf.c + (k * N + b) * H, buf.c + ((k + 1) * N + b) * H, w.ln, H);
      }
      pool_barrier();  // dh needs every row's dG
      Real* dh = buf.hm ? buf.dh_rec : buf.dh;  // recurrent dropout: masked_dh after
      if (buf.W_hh_c)
        dh_product(dh, dG_step, GH, buf.W_hh_c, n, GH, H, mine.u0, mine.u1, false);
      else
        dh_product_stored(dh, dG_step, GH, w.W_hh, n, GH, H, mine.j0, mine.j1, false);
      if (buf.hm) masked_dh(buf, n, H, mine.j0, mine.j1, false);
      pool_barrier();  // the next row phase reads whole rows of dh
    }
    weight_gradients_share(tid, nt, dG_x, dw, buf.dsum, dG, GH, dG, buf.hm ? buf.hm : buf.h, x,
                           GH, s);
    int64_t col0, col1;
    share(5 * H, tid, nt, col0, col1);
    layer_norm_gradients(dw, buf.dln_rows, buf.ln, walk, H, col0, col1);
  };
  run_on_pool(s.threads, body);
  scatter_state(dh0, buf.dh, H, walk);
  scatter_state(dc0, buf.dc, H, walk);
}

}  // namespace

template <typename Real>
void ln_lstm_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                     const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                     const LayerShape& s) {
  if (w.W_hh_r)
    forward_reduced<Real>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  else if (s.training)
    forward_on_rows<Real, true>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  else
    forward_on_rows<Real, false>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
}

template <typename Real>
void ln_lstm_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                      const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                      const Real* dh_n, const Real* dc_n, const Real* x,
                      const LayerWeights<Real>& w, const LayerShape& s) {
  backward_on_rows<Real>(dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
}

LSTMFAST_INSTANTIATE_CELL(ln_lstm)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
