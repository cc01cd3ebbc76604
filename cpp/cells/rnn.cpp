// Elman RNN (tanh or relu), one layer in one direction: forward, then backward (BPTT).
// Compiled once per instruction set (see cell.h); arguments are documented in lstmfast.h.
//
//   h' = act(x W_ih^T + h W_hh^T + b_ih + b_hh),  act = tanh or relu
// ONNX's clip (LayerShape::gates): the pre-activation bounded first; training keeps
// the pre-activation (OnnxGates::keep).
#include "cells/cell.h"
#include "cells/onnx_gates.h"
#include "drivers/cell_driver.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// The cell for the drivers (cell_driver.h). With zoneout, training keeps h~ of
// every step in buf.gates ([S, N, H]): the saved h is the zoned one, and tanh' and
// relu' are taken from h~. With a clip it keeps the pre-activation a there instead
// (h~ = act(clip(a)) again in backward), as the clip's derivative needs a.
template <typename Real, bool kRelu, bool kClip = false>
struct RnnCell : NoBackwardStep {
  static constexpr int kGates = 1, kFirstGates = 1, kSaved = 1;
  static constexpr bool kCellState = false, kLeavesDh = false, kSplitInputGrads = false,
                        kZoneoutRaw = !kClip, kNoise = false;
  const Real* bias;
  bool zoned_h;
  OnnxGates<Real> onnx;  // kClip: ONNX's clip of the pre-activation

  RnnCell(const LayerWeights<Real>& w, const LayerShape& s)
      : bias(w.bias), zoned_h(zoneout_h(w, s)), onnx(s.gates) {}

  template <bool kTraining, class Row>
  LSTMFAST_ALWAYS_INLINE void forward(const Row& row, int64_t j, int64_t lanes,
                                      const V<Real>* rec) const {
    const V<Real> a = rec[0] + ld(row.xp() + j, lanes) + ld(bias + j, lanes);
    const V<Real> h = activation(a);
    st(row.h_next() + j, h, lanes);
    st(row.y() + j, h, lanes);
    if constexpr (kTraining && kClip) st(row.saved() + j, a, lanes);
  }

  LSTMFAST_ALWAYS_INLINE V<Real> activation(V<Real> a) const {
    if constexpr (kClip) a = onnx.bound(a);
    if constexpr (kRelu)
      return simd::vrelu<Real>(a);
    else
      return simd::vtanh(a);
  }

  // From h' (h~ with zoneout, act(clip(a)) with a clip): tanh' = 1 - h'^2,
  // relu' (simd::times_relu_prime), and zero where the clip bounded a.
  void backward_row(const BackwardRow<Real>& row, int64_t, int64_t, int64_t, int64_t units) const {
    const Real* h_next = zoned_h ? row.saved : row.h_next;
    for_lanes<Real>(units, [&](int64_t j, int64_t n) {
      V<Real> dhj = ld(row.dh + j, n);
      if (row.dy) dhj += ld(row.dy + j, n);
      V<Real> h, a;
      if constexpr (kClip) {
        a = ld(row.saved + j, n);
        h = activation(a);
      } else {
        h = ld(h_next + j, n);
      }
      V<Real> da;
      if constexpr (kRelu)
        da = simd::times_relu_prime<Real>(dhj, h);
      else
        da = dhj * (splat<Real>(1) - h * h);
      if constexpr (kClip) da = onnx.unclipped(a, da);
      st(row.dG + j, da, n);
    });
  }
};

}  // namespace

template <typename Real>
void rnn_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                 const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                 const LayerShape& s) {
  // The clip is ONNX's only option of the RNN.
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kClip = decltype(onnx)::value;
    if (s.relu)
      forward_layer(RnnCell<Real, true, kClip>(w, s), y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
    else
      forward_layer(RnnCell<Real, false, kClip>(w, s), y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  });
}

template <typename Real>
void rnn_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                  const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                  const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                  const LayerShape& s) {
  auto run = [&](auto cell) {
    backward_layer(cell, dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
  };
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kClip = decltype(onnx)::value;
    if (s.relu)
      run(RnnCell<Real, true, kClip>(w, s));
    else
      run(RnnCell<Real, false, kClip>(w, s));
  });
}

LSTMFAST_INSTANTIATE_CELL(rnn)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
