// GRU (torch's variant), one layer in one direction: forward, then backward (BPTT).
// Compiled once per instruction set (see cell.h); arguments are documented in lstmfast.h.
//
//   gi = x W_ih^T + b_ih,  gh = h W_hh^T + b_hh      blocks r, z, n of H each
//   r  = sigmoid(gi_r + gh_r)
//   z  = sigmoid(gi_z + gh_z)
//   n  = tanh(gi_n + r * gh_n)                      (gh_n = W_hn h + b_hn: b_hn stays inside r)
//   h' = (1 - z) n + z h
// ONNX's options (LayerShape::gates): hard sigmoid for r and z, their
// pre-activations and n's clipped; the cell's kOnnx path. Training with a clip keeps
// the pre-activations of r, z and n in place of their values (OnnxGates::keep).
#include "cells/cell.h"
#include "cells/onnx_gates.h"
#include "drivers/cell_driver.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// The cell for the drivers (cell_driver.h). Saved per row when training: r, z, n
// (CellGates::keep), gh_n.
template <typename Real, bool kOnnx = false>
struct GruCell : NoBackwardStep {
  static constexpr int kGates = 3, kFirstGates = 3, kSaved = 4;
  static constexpr bool kCellState = false, kLeavesDh = true, kSplitInputGrads = true,
                        kZoneoutRaw = false, kNoise = false;
  const Real* bias;  // [3H] b_ir + b_hr, b_iz + b_hz, b_in
  const Real* b_hn;  // [H]: stays inside r
  int64_t H;
  CellGates<Real, kOnnx> gates;  // torch's or ONNX's (onnx_gates.h)

  GruCell(const LayerWeights<Real>& w, const LayerShape& s)
      : bias(w.bias), b_hn(w.b_hn), H(s.H), gates(s.gates) {}

  template <bool kTraining, class Row>
  LSTMFAST_ALWAYS_INLINE void forward(const Row& row, int64_t j, int64_t lanes,
                                      const V<Real>* rec) const {
    const Real* xp = row.xp() + j;
    const Real* bj = bias + j;
    const V<Real> a_r = rec[0] + ld(xp, lanes) + ld(bj, lanes);
    const V<Real> a_z = rec[1] + ld(xp + H, lanes) + ld(bj + H, lanes);
    const V<Real> r = gates.gate(a_r), z = gates.gate(a_z);
    const V<Real> ghn = rec[2] + ld(b_hn + j, lanes);
    const V<Real> a_n = ld(xp + 2 * H, lanes) + ld(bj + 2 * H, lanes) + r * ghn;
    const V<Real> nn = gates.candidate(a_n);
    const V<Real> h = nn + z * (ld(row.h_prev() + j, lanes) - nn);
    st(row.h_next() + j, h, lanes);
    st(row.y() + j, h, lanes);
    if constexpr (kTraining) {
      Real* saved = row.saved() + j;
      st(saved, gates.keep(r, a_r), lanes);
      st(saved + H, gates.keep(z, a_z), lanes);
      st(saved + 2 * H, gates.keep(nn, a_n), lanes);
      st(saved + 3 * H, ghn, lanes);
    }
  }

  // dG_in: r, z, n pre-activations on the input side; dG: the same but r times that
  // of n in the n block (gh_n sits inside r); dh keeps dh' z, the part that bypasses
  // W_hh. dG may point at the saved gates: every value is read before any is written.
  void backward_row(const BackwardRow<Real>& row, int64_t, int64_t, int64_t, int64_t units) const {
    const V<Real> one = splat<Real>(1);
    const Real* saved = row.saved;
    for_lanes<Real>(units, [&](int64_t j, int64_t n) {
      V<Real> dhj = ld(row.dh + j, n);
      if (row.dy) dhj += ld(row.dy + j, n);
      const V<Real> kept_r = ld(saved + j, n), kept_z = ld(saved + H + j, n);
      const V<Real> kept_n = ld(saved + 2 * H + j, n), ghn = ld(saved + 3 * H + j, n);
      const V<Real> r = gates.kept_gate(kept_r), z = gates.kept_gate(kept_z);
      const V<Real> nn = gates.kept_candidate(kept_n);
      const V<Real> da_n = dhj * (one - z) * gates.kept_candidate_prime(kept_n, nn);
      const V<Real> da_r = da_n * ghn * gates.kept_gate_prime(kept_r, r);
      const V<Real> da_z = dhj * (ld(row.h_prev + j, n) - nn) * gates.kept_gate_prime(kept_z, z);
      st(row.dh + j, dhj * z, n);
      st(row.dG_in + j, da_r, n);
      st(row.dG_in + H + j, da_z, n);
      st(row.dG_in + 2 * H + j, da_n, n);
      st(row.dG + j, da_r, n);
      st(row.dG + H + j, da_z, n);
      st(row.dG + 2 * H + j, da_n * r, n);
    });
  }
};

}  // namespace

template <typename Real>
void gru_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                 const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                 const LayerShape& s) {
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kOnnx = decltype(onnx)::value;
    forward_layer(GruCell<Real, kOnnx>(w, s), y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  });
}

template <typename Real>
void gru_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                  const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                  const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                  const LayerShape& s) {
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kOnnx = decltype(onnx)::value;
    GruCell<Real, kOnnx> cell(w, s);
    backward_layer(cell, dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
  });
}

LSTMFAST_INSTANTIATE_CELL(gru)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
