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
#include "drivers/cell_driver.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

template <typename Real, bool kRelu>
inline V<Real> phi(V<Real> v) {
  if constexpr (kRelu)
    return simd::vrelu<Real>(v);
  else
    return simd::vtanh(v);
}

// g * phi'(v) where a = phi(v): relu' as simd::times_relu_prime, tanh' = 1 - a^2.
template <typename Real, bool kRelu>
inline V<Real> times_phi_prime(V<Real> g, V<Real> a) {
  if constexpr (kRelu)
    return simd::times_relu_prime<Real>(g, a);
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

// The cell for the drivers (cell_driver.h). Training keeps phi(z) per row (leak
// outside; inside, phi' comes from h' itself).
template <typename Real, bool kRelu, bool kInside>
struct CtrnnCell : NoBackwardStep {
  static constexpr int kGates = 1, kFirstGates = 1, kSaved = kInside ? 0 : 1;
  static constexpr bool kCellState = false, kLeavesDh = true, kSplitInputGrads = false,
                        kZoneoutRaw = false, kNoise = true;
  const Real* bias;
  Real alpha;

  CtrnnCell(const LayerWeights<Real>& w, const LayerShape& s)
      : bias(w.bias), alpha(static_cast<Real>(s.alpha)) {}

  template <bool kTraining, class Row>
  LSTMFAST_ALWAYS_INLINE void forward(const Row& row, int64_t j, int64_t lanes,
                                      const V<Real>* rec) const {
    const V<Real> z = rec[0] + ld(row.xp() + j, lanes) + ld(bias + j, lanes);
    const V<Real> h = ctrnn_update<Real, kRelu, kInside>(
        z, ld(row.h_prev() + j, lanes), row.noise() ? row.noise() + j : nullptr,
        kTraining && row.saved() ? row.saved() + j : nullptr, lanes, alpha);
    st(row.h_next() + j, h, lanes);
    st(row.y() + j, h, lanes);
  }

  // With g = dh + dy the gradient of h':
  //   leak outside:  dz = alpha g phi'(z),   the bypass (1 - alpha) g;
  //   leak inside:   du = g phi'(u),  dz = alpha du,   the bypass (1 - alpha) du.
  // dz goes to dG; the bypass is left in dh, to which backward_on_pool adds dz W_hh.
  // phi' is taken from phi(z) (outside, saved) or h' (inside).
  void backward_row(const BackwardRow<Real>& row, int64_t, int64_t, int64_t, int64_t units) const {
    const Real* out = kInside ? row.h_next : row.saved;
    const V<Real> keep = splat<Real>(Real(1) - alpha), take = splat<Real>(alpha);
    for_lanes<Real>(units, [&](int64_t j, int64_t n) {
      V<Real> g = ld(row.dh + j, n);
      if (row.dy) g += ld(row.dy + j, n);
      const V<Real> d = times_phi_prime<Real, kRelu>(g, ld(out + j, n));
      st(row.dG + j, take * d, n);
      st(row.dh + j, keep * (kInside ? d : g), n);
    });
  }
};

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
void ctrnn_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                   const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                   const LayerShape& s) {
  with_cell_flags(s, [&](auto relu, auto inside) {
    const CtrnnCell<Real, decltype(relu)::value, decltype(inside)::value> cell(w, s);
    forward_layer(cell, y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  });
}

template <typename Real>
void ctrnn_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                    const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s) {
  with_cell_flags(s, [&](auto relu, auto inside) {
    CtrnnCell<Real, decltype(relu)::value, decltype(inside)::value> cell(w, s);
    backward_layer(cell, dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
  });
}

LSTMFAST_INSTANTIATE_CELL(ctrnn)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
