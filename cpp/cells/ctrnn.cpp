// Continuous-time (leaky) RNN, one layer in one direction: forward, then backward
// (BPTT). Compiled once per instruction set (see cell.h); arguments are documented
// in lstmfast.h, the equations in docs/cells.md. With z = x W_ih^T + b_ih + h W_hh^T
// + b_hh, alpha = dt / tau, phi = tanh or relu and noise e (given per step):
//   leak outside:  h' = (1 - alpha) h + alpha phi(z) + e
//   leak inside:   h' = phi((1 - alpha) h + alpha z + e)
//
// The noise is added, never multiplied, so backward needs none of it: inside, phi'
// comes from h' itself; outside, from phi(z), which training saves (h' cannot give
// it back without e, and dividing by alpha would lose precision).
#include <type_traits>

#include "cells/cell.h"
#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

template <typename Real, bool kRelu>
inline V<Real> phi(V<Real> v) {
  if constexpr (kRelu)
    return simd::vmax<Real>(v, splat<Real>(0));
  else
    return simd::vtanh(v);
}

// g * phi'(v) where a = phi(v): relu' = [a > 0] (0 at 0, as torch), tanh' = 1 - a^2.
template <typename Real, bool kRelu>
inline V<Real> times_phi_prime(V<Real> g, V<Real> a) {
  if constexpr (kRelu)
    return a > Real(0) ? g : splat<Real>(0);
  else
    return g * (splat<Real>(1) - a * a);
}

// h' of n units from their pre-activation z and previous h; noise and act (where
// phi(z) is saved, leak outside) may be null.
template <typename Real, bool kRelu, bool kInside>
inline V<Real> ctrnn_update(V<Real> z, V<Real> h, const Real* noise, Real* act, int64_t n,
                            Real alpha) {
  const V<Real> keep = splat<Real>(Real(1) - alpha), take = splat<Real>(alpha);
  if constexpr (kInside) {
    V<Real> u = keep * h + take * z;
    if (noise) u += ld(noise, n);
    return phi<Real, kRelu>(u);
  } else {
    const V<Real> a = phi<Real, kRelu>(z);
    if (act) st(act, a, n);
    V<Real> next = keep * h + take * a;
    if (noise) next += ld(noise, n);
    return next;
  }
}

// One row of one step, fused.
//   h_next, y: [H] out;  act: [H] out phi(z) or nullptr;  h_prev: [H];  xp: [H] x W_ih^T;
//   rec: [H] h W_hh^T;  bias: [H];  noise: [H] or nullptr
template <typename Real, bool kRelu, bool kInside>
inline void ctrnn_forward_row(Real* h_next, Real* y, Real* act, const Real* h_prev, const Real* xp,
                              const Real* rec, const Real* bias, const Real* noise, Real alpha,
                              int64_t H) {
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    const V<Real> z = ld(xp + j, n) + ld(rec + j, n) + ld(bias + j, n);
    const V<Real> h = ctrnn_update<Real, kRelu, kInside>(
        z, ld(h_prev + j, n), noise ? noise + j : nullptr, act ? act + j : nullptr, n, alpha);
    st(h_next + j, h, n);
    st(y + j, h, n);
  });
}

// Where training keeps phi(z) of sorted row b at step k (leak outside), else nullptr.
template <typename Real, bool kInside>
inline Real* saved_activation(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k,
                              int64_t b) {
  if (kInside || !s.training) return nullptr;
  return buf.gates + (k * s.N + b) * s.H;
}

// The forward of a short call of few rows (direct_weights), with the weights
// used in place.
template <typename Real, bool kRelu, bool kInside>
void forward_direct(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                    const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  const Real alpha = static_cast<Real>(s.alpha);
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
      ctrnn_forward_row<Real, kRelu, kInside>(
          h_next + b * H, y + at * ldy, saved_activation<Real, kInside>(buf, s, k, b),
          h_prev + b * H, buf.xproj + walk.x_row(k, b) * H, buf.rec + b * H, w.bias,
          w.noise ? w.noise + at * H : nullptr, alpha, H);
    }
    for (int64_t b = n; b < N; ++b) copy_row(h_next + b * H, h_prev + b * H, H);
  }
  scatter_state(h_n, buf.h + slot(S, s.training) * N * H, H, walk);
}

// The forward on the persistent pool (forward_on_pool), as rnn.cpp's.
template <typename Real, bool kRelu, bool kInside>
void forward_fused(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                   const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  const Real alpha = static_cast<Real>(s.alpha);
  gather_state(buf.h, h0, H, walk);
  forward_on_pool<Real, 1>(buf, x, H, w, s, [&](int64_t k, int64_t n, const UnitShare& mine) {
    const Real* h_prev = buf.h + slot(k, s.training) * N * H;
    Real* h_next = buf.h + slot(k + 1, s.training) * N * H;
    auto epilogue = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
      const int64_t at = walk.at(k, b);
      const V<Real> z =
          acc[0] + ld(buf.xproj + walk.x_row(k, b) * H + j, lanes) + ld(w.bias + j, lanes);
      Real* act = saved_activation<Real, kInside>(buf, s, k, b);
      const V<Real> h = ctrnn_update<Real, kRelu, kInside>(
          z, ld(h_prev + b * H + j, lanes), w.noise ? w.noise + at * H + j : nullptr,
          act ? act + j : nullptr, lanes, alpha);
      st(h_next + b * H + j, h, lanes);
      st(y + at * ldy + j, h, lanes);
    };
    recurrent_step<Real, 1>(product_input(buf, k, s), H, n, H, buf.W_hh_p, H, mine.u0, mine.u1,
                            epilogue);
    for (int64_t b = n; b < N; ++b)
      copy_row(h_next + b * H + mine.j0, h_prev + b * H + mine.j0, mine.j1 - mine.j0);
  });
  scatter_state(h_n, buf.h + slot(S, s.training) * N * H, H, walk);
}

// The forward of an inference layer with reduced weights (reduced_steps): float32
// only, as reduced weights are.
template <typename Real, bool kRelu, bool kInside>
void forward_reduced(Real* y, int64_t ldy, Real* h_n, const LayerBuffers<Real>& buf, const Real* x,
                     const Real* h0, const LayerWeights<Real>& w, const LayerShape& s) {
  if constexpr (std::is_same<Real, float>::value) {
    const Walk walk(s);
    const int64_t N = s.N, H = s.H, S = steps_of(s);
    const Real alpha = static_cast<Real>(s.alpha);
    gather_state(buf.h, h0, H, walk);
    reduced_steps(buf, x, H, w, s, [&](int64_t k, int64_t b, bool running) {
      if (!running) return;
      const int64_t at = walk.at(k, b);
      ctrnn_forward_row<Real, kRelu, kInside>(
          buf.h + ((k + 1) & 1) * N * H + b * H, y + at * ldy, nullptr, buf.h + (k & 1) * N * H + b * H,
          buf.xproj + walk.x_row(k, b) * H, buf.rec + b * H, w.bias,
          w.noise ? w.noise + at * H : nullptr, alpha, H);
    });
    scatter_state(h_n, buf.h + (S & 1) * N * H, H, walk);
  }
}

// Backward of one row of one step. With g = dh + dy the gradient of h':
//   leak outside:  dz = alpha g phi'(z),   the bypass (1 - alpha) g;
//   leak inside:   du = g phi'(u),  dz = alpha du,   the bypass (1 - alpha) du.
// dz goes to dG; the bypass is left in dh, to which backward_on_pool adds dz W_hh.
//   dG: [units] out;  dh: [units] in: gradient of h', out: the bypass;  dy: or nullptr;
//   out: [units] phi(z) (outside) or h' (inside), from which phi' is taken
template <typename Real, bool kRelu, bool kInside>
inline void ctrnn_backward_row(Real* dG, Real* dh, const Real* dy, const Real* out, Real alpha,
                               int64_t units) {
  const V<Real> keep = splat<Real>(Real(1) - alpha), take = splat<Real>(alpha);
  for_lanes<Real>(units, [&](int64_t j, int64_t n) {
    V<Real> g = ld(dh + j, n);
    if (dy) g += ld(dy + j, n);
    const V<Real> d = times_phi_prime<Real, kRelu>(g, ld(out + j, n));
    st(dG + j, take * d, n);
    st(dh + j, keep * (kInside ? d : g), n);
  });
}

// The backward on the pool (backward_on_pool), as rnn.cpp's, but the gradient of
// h also bypasses W_hh through the leak.
template <typename Real, bool kRelu, bool kInside>
void backward_fused(Real* dG_x, Real* dh0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                    const Real* dh_n, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H;
  const Real alpha = static_cast<Real>(s.alpha);
  Real* dG = input_gate_grads(dG_x, buf.dG, s);
  gather_state(buf.dh, dh_n, H, walk);
  auto pointwise = [&](int64_t k, int64_t n, const UnitShare& mine) {
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    Real* dGk = dG + k * N * H;
    const Real* out = kInside ? buf.h + (k + 1) * N * H : buf.gates + k * N * H;
    for (int64_t b = 0; b < n; ++b)
      ctrnn_backward_row<Real, kRelu, kInside>(
          dGk + b * H + j0, buf.dh + b * H + j0,
          dy ? dy + walk.at(k, b) * lddy + j0 : nullptr, out + b * H + j0, alpha, units);
    for (int64_t b = n; b < N; ++b) zero_row(dGk + b * H + j0, units);
  };
  backward_on_pool(dG_x, dw, buf, dG, H, dG, H, /*accumulate_dh=*/true, x, w, s, pointwise);
  scatter_state(dh0, buf.dh, H, walk);
}

// f(relu, inside) with the two flags of s as compile-time constants.
template <typename F>
inline void with_cell_flags(const LayerShape& s, F&& f) {
  using yes = std::true_type;
  using no = std::false_type;
  if (s.relu && s.leak_inside)
    f(yes{}, yes{});
  else if (s.relu)
    f(yes{}, no{});
  else if (s.leak_inside)
    f(no{}, yes{});
  else
    f(no{}, no{});
}

}  // namespace

template <typename Real>
void ctrnn_forward(Real* y, int64_t ldy, Real* h_n, Real* /*c_n*/, const LayerBuffers<Real>& buf,
                   const Real* x, const Real* h0, const Real* /*c0*/, const LayerWeights<Real>& w,
                   const LayerShape& s) {
  with_cell_flags(s, [&](auto relu, auto inside) {
    constexpr bool kRelu = decltype(relu)::value, kInside = decltype(inside)::value;
    if (w.W_hh_r)
      forward_reduced<Real, kRelu, kInside>(y, ldy, h_n, buf, x, h0, w, s);
    else if (direct_weights(s))
      forward_direct<Real, kRelu, kInside>(y, ldy, h_n, buf, x, h0, w, s);
    else
      forward_fused<Real, kRelu, kInside>(y, ldy, h_n, buf, x, h0, w, s);
  });
}

template <typename Real>
void ctrnn_backward(Real* dG_x, Real* dh0, Real* /*dc0*/, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                    const Real* /*dc_n*/, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s) {
  with_cell_flags(s, [&](auto relu, auto inside) {
    backward_fused<Real, decltype(relu)::value, decltype(inside)::value>(dG_x, dh0, dw, buf, dy,
                                                                         lddy, dh_n, x, w, s);
  });
}

template void ctrnn_forward<float>(float*, int64_t, float*, float*, const LayerBuffers<float>&,
                                   const float*, const float*, const float*,
                                   const LayerWeights<float>&, const LayerShape&);
template void ctrnn_forward<double>(double*, int64_t, double*, double*,
                                    const LayerBuffers<double>&, const double*, const double*,
                                    const double*, const LayerWeights<double>&, const LayerShape&);
template void ctrnn_backward<float>(float*, float*, float*, const LayerGrads<float>&,
                                    const LayerBuffers<float>&, const float*, int64_t,
                                    const float*, const float*, const float*,
                                    const LayerWeights<float>&, const LayerShape&);
template void ctrnn_backward<double>(double*, double*, double*, const LayerGrads<double>&,
                                     const LayerBuffers<double>&, const double*, int64_t,
                                     const double*, const double*, const double*,
                                     const LayerWeights<double>&, const LayerShape&);

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
