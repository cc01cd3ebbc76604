// The GRU of the original paper (Cho et al., 2014), as ONNX's GRU with
// linear_before_reset=0 and Keras's reset_after=False define it: the reset gate
// multiplies h before W_hn, so a step makes two recurrent products (the second on
// u = r * h; cell_driver.h, kFirstGates). One layer in one direction: forward, then
// backward (BPTT). Compiled once per instruction set (see cell.h); arguments are
// documented in lstmfast.h.
//
//   gi = x W_ih^T + b_ih                       blocks r, z, n of H each
//   r  = sigmoid(gi_r + h W_hr^T + b_hr)        (W_hr, W_hz, W_hn: the blocks of W_hh)
//   z  = sigmoid(gi_z + h W_hz^T + b_hz)
//   u  = r * h
//   n  = tanh(gi_n + u W_hn^T + b_hn)
//   h' = (1 - z) n + z h
// Every bias sits outside a product, so b_ih + b_hh is one bias (LayerWeights::bias).
#include <type_traits>

#include "cells/cell.h"
#include "cells/onnx_gates.h"
#include "drivers/cell_driver.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// Kept per row (training: every step; inference: the step's): r, z, n; training
// with a clip keeps their pre-activations (CellGates::keep). kOnnx: ONNX's options.
template <typename Real, bool kOnnx = false>
struct GruResetBeforeCell : NoBackwardStep {
  static constexpr int kGates = 3, kFirstGates = 2, kSaved = 3;
  static constexpr bool kCellState = false, kLeavesDh = true, kSplitInputGrads = false,
                        kZoneoutRaw = false, kNoise = false;
  const Real* bias;  // [3H]
  int64_t H;
  bool round_u;      // bfloat16 weights widened to float32: u, a product's left operand, is
                     //   rounded to bfloat16 as h is (LayerShape::round_bf16)
  CellGates<Real, kOnnx> gates;  // torch's or ONNX's (onnx_gates.h)

  GruResetBeforeCell(const LayerWeights<Real>& w, const LayerShape& s)
      : bias(w.bias), H(s.H), round_u(s.round_bf16), gates(s.gates) {}

  // r and z from the first product; u = r * h for the second. saved may be where
  // xp is (LayerBuffers::xproj): each value is read before it is written.
  template <bool kTraining, class Row>
  LSTMFAST_ALWAYS_INLINE void forward(const Row& row, int64_t j, int64_t lanes,
                                      const V<Real>* rec) const {
    const Real* xp = row.xp() + j;
    const Real* bj = bias + j;
    const V<Real> a_r = rec[0] + ld(xp, lanes) + ld(bj, lanes);
    const V<Real> a_z = rec[1] + ld(xp + H, lanes) + ld(bj + H, lanes);
    const V<Real> r = gates.gate(a_r), z = gates.gate(a_z);
    st(row.saved() + j, kTraining ? gates.keep(r, a_r) : r, lanes);
    st(row.saved() + H + j, kTraining ? gates.keep(z, a_z) : z, lanes);
    // Rounding, h_rec is h rounded already (hm): u takes h itself (recurrent dropout and
    // reduced weights exclude each other) and is rounded once, as the reference does.
    V<Real> u = r * ld((round_u ? row.h_prev() : row.h_rec()) + j, lanes);
    if constexpr (std::is_same<Real, float>::value)
      if (round_u) u = simd::round_to_bfloat16(u);
    st(row.u() + j, u, lanes);
  }

  template <bool kTraining, class Row>
  LSTMFAST_ALWAYS_INLINE void forward_second(const Row& row, int64_t j,
                                             int64_t lanes, const V<Real>* rec) const {
    const V<Real> a_n = rec[0] + ld(row.xp() + 2 * H + j, lanes) + ld(bias + 2 * H + j, lanes);
    const V<Real> nn = gates.candidate(a_n);
    const V<Real> kept_z = ld(row.saved() + H + j, lanes);
    const V<Real> z = kTraining ? gates.kept_gate(kept_z) : kept_z;
    const V<Real> h = nn + z * (ld(row.h_prev() + j, lanes) - nn);
    st(row.h_next() + j, h, lanes);
    st(row.y() + j, h, lanes);
    if constexpr (kTraining) st(row.saved() + 2 * H + j, gates.keep(nn, a_n), lanes);
  }

  // z's and n's pre-activation gradients, and dh' z (the part of dh that bypasses
  // W_hh); r's needs du = da_n W_hn first (backward_second_row).
  void backward_row(const BackwardRow<Real>& row, int64_t, int64_t, int64_t, int64_t units) const {
    const V<Real> one = splat<Real>(1);
    const Real* saved = row.saved;
    for_lanes<Real>(units, [&](int64_t j, int64_t n) {
      V<Real> g = ld(row.dh + j, n);
      if (row.dy) g += ld(row.dy + j, n);
      const V<Real> kept_z = ld(saved + H + j, n), kept_n = ld(saved + 2 * H + j, n);
      const V<Real> z = gates.kept_gate(kept_z), nn = gates.kept_candidate(kept_n);
      st(row.dh + j, g * z, n);
      st(row.dG + H + j, g * (ld(row.h_prev + j, n) - nn) * gates.kept_gate_prime(kept_z, z), n);
      st(row.dG + 2 * H + j, g * (one - z) * gates.kept_candidate_prime(kept_n, nn), n);
    });
  }

  // u = r * h_rec: r's pre-activation gradient du h_rec r (1 - r), and du r into h_rec's.
  void backward_second_row(const BackwardRow<Real>& row, int64_t, int64_t, int64_t,
                           int64_t units) const {
    for_lanes<Real>(units, [&](int64_t j, int64_t n) {
      const V<Real> du = ld(row.du + j, n), kept_r = ld(row.saved + j, n);
      const V<Real> r = gates.kept_gate(kept_r);
      st(row.dG + j, du * ld(row.h_rec + j, n) * gates.kept_gate_prime(kept_r, r), n);
      const V<Real> through_u = du * r;
      st(row.dh_rec + j, row.add_dh_rec ? ld(row.dh_rec + j, n) + through_u : through_u, n);
    });
  }
};

}  // namespace

template <typename Real>
void gru_reset_before_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n,
                              const LayerBuffers<Real>& buf, const Real* x, const Real* h0,
                              const Real* c0, const LayerWeights<Real>& w, const LayerShape& s) {
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kOnnx = decltype(onnx)::value;
    forward_layer(GruResetBeforeCell<Real, kOnnx>(w, s), y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  });
}

template <typename Real>
void gru_reset_before_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                               const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                               const Real* dh_n, const Real* dc_n, const Real* x,
                               const LayerWeights<Real>& w, const LayerShape& s) {
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kOnnx = decltype(onnx)::value;
    GruResetBeforeCell<Real, kOnnx> cell(w, s);
    backward_layer(cell, dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
  });
}

LSTMFAST_INSTANTIATE_CELL(gru_reset_before)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
