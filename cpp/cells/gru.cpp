// GRU (torch's variant), one layer in one direction: forward, then backward (BPTT).
// Compiled once per instruction set (see cell.h); arguments are documented in lstmfast.h.
//
//   gi = x W_ih^T + b_ih,  gh = h W_hh^T + b_hh      blocks r, z, n of H each
//   r  = sigmoid(gi_r + gh_r)
//   z  = sigmoid(gi_z + gh_z)
//   n  = tanh(gi_n + r * gh_n)                      (gh_n = W_hn h + b_hn: b_hn stays inside r)
//   h' = (1 - z) n + z h
#include "cells/cell.h"
#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// One row of one step, fused.
//   h_next: [H] out;  y: [H] out;  gates: [4H] out when training: r, z, n, gh_n
//   xp: [3H] x W_ih^T;  rec: [3H] h W_hh^T;  bias: [3H] (b_ir + b_hr, b_iz + b_hz, b_in);
//   b_hn: [H];  h_prev: [H]
template <typename Real, bool kTraining>
inline void gru_forward_row(Real* h_next, Real* y, Real* gates, const Real* xp, const Real* rec,
                            const Real* bias, const Real* b_hn, const Real* h_prev, int64_t H) {
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    const V<Real> r = simd::vsigmoid<Real>(ld(xp + j, n) + ld(rec + j, n) + ld(bias + j, n));
    const V<Real> z =
        simd::vsigmoid<Real>(ld(xp + H + j, n) + ld(rec + H + j, n) + ld(bias + H + j, n));
    const V<Real> ghn = ld(rec + 2 * H + j, n) + ld(b_hn + j, n);
    const V<Real> nn = simd::vtanh(ld(xp + 2 * H + j, n) + ld(bias + 2 * H + j, n) + r * ghn);
    const V<Real> h = nn + z * (ld(h_prev + j, n) - nn);
    st(h_next + j, h, n);
    st(y + j, h, n);
    if constexpr (kTraining) {
      st(gates + j, r, n);
      st(gates + H + j, z, n);
      st(gates + 2 * H + j, nn, n);
      st(gates + 3 * H + j, ghn, n);
    }
  });
}

// Row stride of xproj: 4H when it is the saved gates (see LayerBuffers::xproj),
// whose r, z, n columns it fills before each step writes r, z, n, gh_n there.
template <typename Real>
inline int64_t x_projection_stride(const LayerBuffers<Real>& buf, int64_t H) {
  return buf.xproj == buf.gates ? 4 * H : 3 * H;
}

// The forward of a short call of few rows (direct_weights), with the weights
// used in place.
template <typename Real, bool kTraining>
void forward_direct(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                    const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = 3 * H, S = steps_of(s);
  const int64_t ldx = x_projection_stride(buf, H);
  direct_input_projection(buf.xproj, ldx, x, w, GH, buf, s);
  gather_state(buf.h, h0, H, walk);
  for (int64_t k = 0; k < S; ++k) {
    const int64_t n = walk.active(k);
    const Real* h_prev = buf.h + slot(k, kTraining) * N * H;
    Real* h_next = buf.h + slot(k + 1, kTraining) * N * H;
    mask_state(buf, k, s, 0, N, 0, H);  // recurrent dropout (regularizers.h)
    weight_product(buf.rec, GH, product_input(buf, k, s), w.W_hh, w.W_hh_r, n, H, GH, buf, w,
                   s.threads);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t at = walk.at(k, b);
      gru_forward_row<Real, kTraining>(h_next + b * H, y + at * ldy,
                                       kTraining ? buf.gates + (k * N + b) * 4 * H : nullptr,
                                       buf.xproj + walk.x_row(k, b) * ldx, buf.rec + b * GH, w.bias, w.b_hn,
                                       h_prev + b * H, H);
    }
    for (int64_t b = n; b < N; ++b) copy_row(h_next + b * H, h_prev + b * H, H);
    if (zoneout(w, s)) zoneout_step(buf, y, ldy, w, s, k, n, 0, H, 0, 0);
  }
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * H, H, walk);
}

// The forward of an inference layer with reduced weights (reduced_steps): float32
// only, as reduced weights are.
template <typename Real>
void forward_reduced(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                     const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  if constexpr (std::is_same<Real, float>::value) {
    const Walk walk(s);
    const int64_t N = s.N, H = s.H, GH = 3 * H, S = steps_of(s);
    gather_state(buf.h, h0, H, walk);
    reduced_steps(buf, x, GH, w, s, [&](int64_t k, int64_t b, bool running) {
      if (running)
        gru_forward_row<Real, false>(buf.h + ((k + 1) & 1) * N * H + b * H,
                                     y + walk.at(k, b) * ldy, nullptr,
                                     buf.xproj + walk.x_row(k, b) * GH, buf.rec + b * GH, w.bias,
                                     w.b_hn, buf.h + (k & 1) * N * H + b * H, H);
    });
    scatter_state(h_n, buf.h + (S & 1) * N * H, H, walk);
  }
}

// The forward on the persistent pool (as lstm.cpp's forward_fused): each thread
// owns a range of unit blocks, and the micro-kernel's epilogue does the gate math.
template <typename Real, bool kTraining>
void forward_fused(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                   const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  const int64_t ldx = x_projection_stride(buf, H);
  gather_state(buf.h, h0, H, walk);
  const Real* bias = w.bias;
  forward_on_pool<Real, 3>(buf, x, ldx, w, s, [&](int64_t k, int64_t n, const UnitShare& mine) {
    const Real* h_prev = buf.h + slot(k, kTraining) * N * H;
    Real* h_next = buf.h + slot(k + 1, kTraining) * N * H;
    Real* gates = kTraining ? buf.gates + k * N * 4 * H : nullptr;
    auto epilogue = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
      const int64_t at = walk.at(k, b);
      const Real* xp = buf.xproj + walk.x_row(k, b) * ldx + j;
      const Real* bj = bias + j;
      const V<Real> r = simd::vsigmoid<Real>(acc[0] + ld(xp, lanes) + ld(bj, lanes));
      const V<Real> z = simd::vsigmoid<Real>(acc[1] + ld(xp + H, lanes) + ld(bj + H, lanes));
      const V<Real> ghn = acc[2] + ld(w.b_hn + j, lanes);
      const V<Real> nn =
          simd::vtanh(ld(xp + 2 * H, lanes) + ld(bj + 2 * H, lanes) + r * ghn);
      const V<Real> h = nn + z * (ld(h_prev + b * H + j, lanes) - nn);
      st(h_next + b * H + j, h, lanes);
      st(y + at * ldy + j, h, lanes);
      if constexpr (kTraining) {
        Real* gb = gates + b * 4 * H + j;
        st(gb, r, lanes);
        st(gb + H, z, lanes);
        st(gb + 2 * H, nn, lanes);
        st(gb + 3 * H, ghn, lanes);
      }
    };
    recurrent_step<Real, 3>(product_input(buf, k, s), H, n, H, buf.W_hh_p, H, mine.u0, mine.u1,
                            epilogue);
    if (zoneout(w, s)) zoneout_step(buf, y, ldy, w, s, k, n, mine.j0, mine.j1, 0, 0);
    for (int64_t b = n; b < N; ++b)
      copy_row(h_next + b * H + mine.j0, h_prev + b * H + mine.j0, mine.j1 - mine.j0);
  });
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * H, H, walk);
}

// Backward of one row of one step.
//   dG_in: [3H] out: gradient of gi (r, z, n pre-activations on the input side)
//   dG: [3H] out: gradient of gh (the same but r * that of n in the n block)
//   dh: [H] in: gradient of h'; out: the part of the gradient of h that bypasses W_hh (dh' z)
//   dy: [H] added to dh, or nullptr;  gates: [4H] saved r, z, n, gh_n;  h_prev: [H]
//   H: the gate stride;  units: how many units from the pointers on (H for all)
// dG may point at gates: every value is read before any is written.
template <typename Real>
inline void gru_backward_row(Real* dG_in, Real* dG, Real* dh, const Real* dy, const Real* gates,
                             const Real* h_prev, int64_t H, int64_t units) {
  const V<Real> one = splat<Real>(1);
  for_lanes<Real>(units, [&](int64_t j, int64_t n) {
    V<Real> dhj = ld(dh + j, n);
    if (dy) dhj += ld(dy + j, n);
    const V<Real> r = ld(gates + j, n), z = ld(gates + H + j, n);
    const V<Real> nn = ld(gates + 2 * H + j, n), ghn = ld(gates + 3 * H + j, n);
    const V<Real> da_n = dhj * (one - z) * (one - nn * nn);
    const V<Real> da_r = da_n * ghn * r * (one - r);
    const V<Real> da_z = dhj * (ld(h_prev + j, n) - nn) * z * (one - z);
    st(dh + j, dhj * z, n);
    st(dG_in + j, da_r, n);
    st(dG_in + H + j, da_z, n);
    st(dG_in + 2 * H + j, da_n, n);
    st(dG + j, da_r, n);
    st(dG + H + j, da_z, n);
    st(dG + 2 * H + j, da_n * r, n);
  });
}

// The backward on the pool: own units' gate gradients and dh' z, a barrier, then
// own columns of dh += dG W_hh (backward_on_pool).
template <typename Real>
void backward_fused(Real* dG_x, Real* dh0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                    const Real* dh_n, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = 3 * H;
  Real* dG_in = input_gate_grads(dG_x, buf.dG_in, s);
  // The recurrent gate gradients: in scratch, or over the saved gates (see LayerBuffers::dG).
  Real* dG = buf.dG ? buf.dG : buf.gates;
  const int64_t ldg = buf.dG ? GH : 4 * H;
  gather_state(buf.dh, dh_n, H, walk);
  auto pointwise = [&](int64_t k, int64_t n, const UnitShare& mine) {
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    const Real* h_prev = buf.h + k * N * H;
    const Real* dy_cell = zoneout_dy(dy, w, s);
    for (int64_t b = 0; b < n; ++b)
      gru_backward_row<Real>(dG_in + (k * N + b) * GH + j0, dG + (k * N + b) * ldg + j0,
                             buf.dh + b * H + j0, dy_cell ? dy_cell + walk.at(k, b) * lddy + j0 : nullptr,
                             buf.gates + (k * N + b) * 4 * H + j0, h_prev + b * H + j0, H, units);
    for (int64_t b = n; b < N; ++b)
      for (int64_t g = 0; g < 3; ++g) {
        zero_row(dG_in + (k * N + b) * GH + g * H + j0, units);
        zero_row(dG + (k * N + b) * ldg + g * H + j0, units);
      }
  };
  backward_on_pool(dG_x, dw, buf, dG, ldg, dG_in, GH, true, x, w, s, pointwise, dy, lddy);
  scatter_state(dh0, buf.dh, H, walk);
}

}  // namespace

template <typename Real>
void gru_forward(Real* y, int64_t ldy, Real* h_n, Real* /*c_n*/, const LayerBuffers<Real>& buf,
                 const Real* x, const Real* h0, const Real* /*c0*/, const LayerWeights<Real>& w,
                 const LayerShape& s) {
  const bool direct = direct_weights(s);
  if (w.W_hh_r)
    forward_reduced<Real>(y, ldy, h_n, buf, x, h0, w, s);
  else if (direct && s.training)
    forward_direct<Real, true>(y, ldy, h_n, buf, x, h0, w, s);
  else if (direct)
    forward_direct<Real, false>(y, ldy, h_n, buf, x, h0, w, s);
  else if (s.training)
    forward_fused<Real, true>(y, ldy, h_n, buf, x, h0, w, s);
  else
    forward_fused<Real, false>(y, ldy, h_n, buf, x, h0, w, s);
}

template <typename Real>
void gru_backward(Real* dG_x, Real* dh0, Real* /*dc0*/, const LayerGrads<Real>& dw,
                  const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                  const Real* /*dc_n*/, const Real* x, const LayerWeights<Real>& w,
                  const LayerShape& s) {
  backward_fused(dG_x, dh0, dw, buf, dy, lddy, dh_n, x, w, s);
}

template void gru_forward<float>(float*, int64_t, float*, float*, const LayerBuffers<float>&,
                                 const float*, const float*, const float*,
                                 const LayerWeights<float>&, const LayerShape&);
template void gru_forward<double>(double*, int64_t, double*, double*, const LayerBuffers<double>&,
                                  const double*, const double*, const double*,
                                  const LayerWeights<double>&, const LayerShape&);
template void gru_backward<float>(float*, float*, float*, const LayerGrads<float>&,
                                  const LayerBuffers<float>&, const float*, int64_t, const float*,
                                  const float*, const float*, const LayerWeights<float>&,
                                  const LayerShape&);
template void gru_backward<double>(double*, double*, double*, const LayerGrads<double>&,
                                   const LayerBuffers<double>&, const double*, int64_t,
                                   const double*, const double*, const double*,
                                   const LayerWeights<double>&, const LayerShape&);

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
