// Elman RNN (tanh or relu), one layer in one direction: forward, then backward (BPTT).
// Compiled once per instruction set (see cell.h); arguments are documented in lstmfast.h.
//
//   h' = act(x W_ih^T + h W_hh^T + b_ih + b_hh),  act = tanh or relu
#include "cells/cell.h"
#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// With zoneout, training keeps h~ of every step in buf.gates ([S, N, H]): the saved
// h is the zoned one, and tanh' and relu' are taken from h~.
template <typename Real>
inline Real* raw_h(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k) {
  return s.training ? buf.gates + k * s.N * s.H : nullptr;
}

// One row of one step, fused.
//   h_next: [H] out;  y: [H] out;  xp: [H] x W_ih^T;  rec: [H] h W_hh^T;  bias: [H]
template <typename Real, bool kRelu>
inline void rnn_forward_row(Real* h_next, Real* y, const Real* xp, const Real* rec,
                            const Real* bias, int64_t H) {
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    const V<Real> a = ld(xp + j, n) + ld(rec + j, n) + ld(bias + j, n);
    V<Real> h;
    if constexpr (kRelu)
      h = simd::vmax<Real>(a, splat<Real>(0));
    else
      h = simd::vtanh(a);
    st(h_next + j, h, n);
    st(y + j, h, n);
  });
}

// The forward of a short call of few rows (direct_weights), with the weights
// used in place.
template <typename Real, bool kRelu>
void forward_direct(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                    const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  direct_input_projection(buf.xproj, H, x, w, H, buf, s);
  gather_state(buf.h, h0, H, walk);
  for (int64_t k = 0; k < S; ++k) {
    const int64_t n = walk.active(k);
    const Real* h_prev = buf.h + slot(k, s.training) * N * H;
    Real* h_next = buf.h + slot(k + 1, s.training) * N * H;
    mask_state(buf, k, s, 0, N, 0, H);  // recurrent dropout (regularizers.h)
    weight_product(buf.rec, H, product_input(buf, k, s), w.W_hh, w.W_hh_r, n, H, H, buf, w, s.threads);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t at = walk.at(k, b);
      rnn_forward_row<Real, kRelu>(h_next + b * H, y + at * ldy, buf.xproj + walk.x_row(k, b) * H,
                                   buf.rec + b * H, w.bias, H);
    }
    for (int64_t b = n; b < N; ++b) copy_row(h_next + b * H, h_prev + b * H, H);
    if (zoneout(w, s)) zoneout_step(buf, y, ldy, w, s, k, n, 0, H, 0, 0, raw_h(buf, s, k));
  }
  scatter_state(h_n, buf.h + slot(S, s.training) * N * H, H, walk);
}

// The forward of an inference layer with reduced weights (reduced_steps): float32
// only, as reduced weights are.
template <typename Real, bool kRelu>
void forward_reduced(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                     const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  if constexpr (std::is_same<Real, float>::value) {
    const Walk walk(s);
    const int64_t N = s.N, H = s.H, S = steps_of(s);
    gather_state(buf.h, h0, H, walk);
    reduced_steps(buf, x, H, w, s, [&](int64_t k, int64_t b, bool running) {
      if (running)
        rnn_forward_row<Real, kRelu>(buf.h + ((k + 1) & 1) * N * H + b * H,
                                     y + walk.at(k, b) * ldy, buf.xproj + walk.x_row(k, b) * H,
                                     buf.rec + b * H, w.bias, H);
    });
    scatter_state(h_n, buf.h + (S & 1) * N * H, H, walk);
  }
}

// The forward on the persistent pool (forward_on_pool), as lstm.cpp's.
template <typename Real, bool kRelu>
void forward_fused(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                   const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  gather_state(buf.h, h0, H, walk);
  forward_on_pool<Real, 1>(buf, x, H, w, s, [&](int64_t k, int64_t n, const UnitShare& mine) {
    const Real* h_prev = buf.h + slot(k, s.training) * N * H;
    Real* h_next = buf.h + slot(k + 1, s.training) * N * H;
    auto epilogue = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
      const int64_t at = walk.at(k, b);
      const V<Real> a =
          acc[0] + ld(buf.xproj + walk.x_row(k, b) * H + j, lanes) + ld(w.bias + j, lanes);
      V<Real> h;
      if constexpr (kRelu)
        h = simd::vmax<Real>(a, splat<Real>(0));
      else
        h = simd::vtanh(a);
      st(h_next + b * H + j, h, lanes);
      st(y + at * ldy + j, h, lanes);
    };
    recurrent_step<Real, 1>(product_input(buf, k, s), H, n, H, buf.W_hh_p, H, mine.u0, mine.u1,
                            epilogue);
    if (zoneout(w, s))
      zoneout_step(buf, y, ldy, w, s, k, n, mine.j0, mine.j1, 0, 0, raw_h(buf, s, k));
    for (int64_t b = n; b < N; ++b)
      copy_row(h_next + b * H + mine.j0, h_prev + b * H + mine.j0, mine.j1 - mine.j0);
  });
  scatter_state(h_n, buf.h + slot(S, s.training) * N * H, H, walk);
}

// Backward of one row of one step, from the saved output h' (no pre-activation is kept):
// tanh' = 1 - h'^2, relu' = [h' > 0].
//   dG: [H] out: gradient of the pre-activation;  dh: [H] gradient of h';
//   dy: [H] added to dh, or nullptr;  h_next: [H] h'
//   units: how many units from the pointers on (H for all)
template <typename Real, bool kRelu>
inline void rnn_backward_row(Real* dG, const Real* dh, const Real* dy, const Real* h_next,
                             int64_t units) {
  for_lanes<Real>(units, [&](int64_t j, int64_t n) {
    V<Real> dhj = ld(dh + j, n);
    if (dy) dhj += ld(dy + j, n);
    const V<Real> h = ld(h_next + j, n);
    if constexpr (kRelu)
      st(dG + j, h > Real(0) ? dhj : splat<Real>(0), n);
    else
      st(dG + j, dhj * (splat<Real>(1) - h * h), n);
  });
}

// The backward on the pool (backward_on_pool), as lstm.cpp's.
template <typename Real, bool kRelu>
void backward_fused(Real* dG_x, Real* dh0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                    const Real* dh_n, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H;
  Real* dG = input_gate_grads(dG_x, buf.dG, s);
  gather_state(buf.dh, dh_n, H, walk);
  auto pointwise = [&](int64_t k, int64_t n, const UnitShare& mine) {
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    Real* dGk = dG + k * N * H;
    const Real* h_next = zoneout_h(w, s) ? buf.gates + k * N * H : buf.h + (k + 1) * N * H;
    const Real* dy_cell = zoneout_dy(dy, w, s);
    for (int64_t b = 0; b < n; ++b)
      rnn_backward_row<Real, kRelu>(dGk + b * H + j0, buf.dh + b * H + j0,
                                    dy_cell ? dy_cell + walk.at(k, b) * lddy + j0 : nullptr,
                                    h_next + b * H + j0, units);
    for (int64_t b = n; b < N; ++b) zero_row(dGk + b * H + j0, units);
  };
  backward_on_pool(dG_x, dw, buf, dG, H, dG, H, false, x, w, s, pointwise, dy, lddy);
  scatter_state(dh0, buf.dh, H, walk);
}

}  // namespace

template <typename Real>
void rnn_forward(Real* y, int64_t ldy, Real* h_n, Real* /*c_n*/, const LayerBuffers<Real>& buf,
                 const Real* x, const Real* h0, const Real* /*c0*/, const LayerWeights<Real>& w,
                 const LayerShape& s) {
  const bool direct = direct_weights(s);
  if (w.W_hh_r && s.relu)
    forward_reduced<Real, true>(y, ldy, h_n, buf, x, h0, w, s);
  else if (w.W_hh_r)
    forward_reduced<Real, false>(y, ldy, h_n, buf, x, h0, w, s);
  else if (direct && s.relu)
    forward_direct<Real, true>(y, ldy, h_n, buf, x, h0, w, s);
  else if (direct)
    forward_direct<Real, false>(y, ldy, h_n, buf, x, h0, w, s);
  else if (s.relu)
    forward_fused<Real, true>(y, ldy, h_n, buf, x, h0, w, s);
  else
    forward_fused<Real, false>(y, ldy, h_n, buf, x, h0, w, s);
}

template <typename Real>
void rnn_backward(Real* dG_x, Real* dh0, Real* /*dc0*/, const LayerGrads<Real>& dw,
                  const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                  const Real* /*dc_n*/, const Real* x, const LayerWeights<Real>& w,
                  const LayerShape& s) {
  if (s.relu)
    backward_fused<Real, true>(dG_x, dh0, dw, buf, dy, lddy, dh_n, x, w, s);
  else
    backward_fused<Real, false>(dG_x, dh0, dw, buf, dy, lddy, dh_n, x, w, s);
}

template void rnn_forward<float>(float*, int64_t, float*, float*, const LayerBuffers<float>&,
                                 const float*, const float*, const float*,
                                 const LayerWeights<float>&, const LayerShape&);
template void rnn_forward<double>(double*, int64_t, double*, double*, const LayerBuffers<double>&,
                                  const double*, const double*, const double*,
                                  const LayerWeights<double>&, const LayerShape&);
template void rnn_backward<float>(float*, float*, float*, const LayerGrads<float>&,
                                  const LayerBuffers<float>&, const float*, int64_t, const float*,
                                  const float*, const float*, const LayerWeights<float>&,
                                  const LayerShape&);
template void rnn_backward<double>(double*, double*, double*, const LayerGrads<double>&,
                                   const LayerBuffers<double>&, const double*, int64_t,
                                   const double*, const double*, const double*,
                                   const LayerWeights<double>&, const LayerShape&);

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
