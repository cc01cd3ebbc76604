// LSTM, one layer in one direction: forward, then backward (BPTT).
// Compiled once per instruction set (see cell.h); arguments are documented in lstmfast.h.
//
//   pre   = x W_ih^T + h W_hh^T + b_ih + b_hh        blocks i, f, g, o of H each
//   i, f, o = sigmoid(pre)   g = tanh(pre)
//   c'    = f c + i g
//   m     = o tanh(c')
//   h'    = m W_hr^T with a projection (P > 0), else m
// With peepholes (w.peephole; docs/cells.md) i and f also see c, and o sees c':
//   i = sigmoid(pre_i + P_i c)   f = sigmoid(pre_f + P_f c)   o = sigmoid(pre_o + P_o c')
// ONNX's options (LayerShape::gates): hard sigmoid for the gates, every
// pre-activation but c's clipped, f = 1 - i (input_forget); the cell's kOnnx path.
// With input_forget i takes f's gradient too, negated. Training with a clip keeps
// the pre-activations in place of the gates (OnnxGates::keep).
#include "cells/cell.h"
#include "cells/onnx_gates.h"
#include "drivers/cell_driver.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// The cell update of `lanes` units from their four pre-activations a[0..3] (i, f,
// g, o; bias included) and c: i, f, g, o activated, c' and h' = o tanh(c'); the
// pre-activations the gates took (peepholes included) in a.
//   peep: [3H] P_i, P_f, P_o from the first of these units on, H apart; nullptr = none
//   gates: the gate functions, torch's or ONNX's (onnx_gates.h)
template <typename Real, bool kOnnx>
LSTMFAST_ALWAYS_INLINE void lstm_units(V<Real> (&a)[4], V<Real> c_prev, const Real* peep,
                                       int64_t H, int64_t lanes, V<Real> (&gate)[4], V<Real>& c,
                                       V<Real>& h, const CellGates<Real, kOnnx>& gates) {
  if (peep) {
    a[0] += ld(peep, lanes) * c_prev;
    a[1] += ld(peep + H, lanes) * c_prev;
  }
  gate[0] = gates.gate(a[0]);
  gate[1] = gates.coupled() ? splat<Real>(1) - gate[0] : gates.gate(a[1]);
  gate[2] = gates.candidate(a[2]);
  c = gate[1] * c_prev + gate[0] * gate[2];
  if (peep) a[3] += ld(peep + 2 * H, lanes) * c;
  gate[3] = gates.gate(a[3]);
  h = gate[3] * simd::vtanh(c);
}

// The four gates of a row from what training kept of them (CellGates::keep).
template <typename Real, bool kOnnx>
LSTMFAST_ALWAYS_INLINE void kept_gates(const Real* saved, int64_t H, int64_t lanes,
                                       const CellGates<Real, kOnnx>& gates, V<Real> (&kept)[4],
                                       V<Real> (&gate)[4]) {
  for (int g = 0; g < 4; ++g) kept[g] = ld(saved + g * H, lanes);
  gate[0] = gates.kept_gate(kept[0]);
  gate[1] = gates.coupled() ? splat<Real>(1) - gate[0] : gates.kept_gate(kept[1]);
  gate[2] = gates.kept_candidate(kept[2]);
  gate[3] = gates.kept_gate(kept[3]);
}

// The cell for the drivers (cell_driver.h). Saved per row when training: i, f, g, o
// (their pre-activations with a clip: CellGates::keep).
// With a projection (forward_steps) h_next is m and y is written after the
// projection, so the row's y is nullptr. kOnnx: ONNX's options.
template <typename Real, bool kOnnx = false>
struct LstmCell {
  static constexpr int kGates = 4, kFirstGates = 4, kSaved = 4;
  static constexpr bool kCellState = true, kLeavesDh = false, kSplitInputGrads = false,
                        kZoneoutRaw = false, kNoise = false;
  const Real* bias;  // [4H]
  const Real* peep;  // [3H] peepholes, or nullptr
  Real* dpeep;       // [3H] their gradients, summed over rows and steps (backward)
  const LayerBuffers<Real>& buf;
  const LayerWeights<Real>& w;
  const LayerShape& s;
  int64_t H;
  const Real* c_unzoned;  // with zoneout of c: where backward_step leaves c~ of the step
  CellGates<Real, kOnnx> gates;  // torch's or ONNX's (onnx_gates.h)

  LstmCell(const LayerBuffers<Real>& buffers, const LayerWeights<Real>& weights,
           const LayerShape& shape)
      : bias(weights.bias), peep(weights.peephole), dpeep(buffers.dpeep), buf(buffers),
        w(weights), s(shape), H(shape.H),
        c_unzoned(zoneout_c(weights, shape) ? buffers.zone_c_raw : nullptr), gates(shape.gates) {}

  template <bool kTraining, class Row>
  LSTMFAST_ALWAYS_INLINE void forward(const Row& row, int64_t j, int64_t lanes,
                                      const V<Real>* rec) const {
    const Real* xp = row.xp() + j;
    const Real* bj = bias + j;
    V<Real> a[4] = {rec[0] + ld(xp, lanes) + ld(bj, lanes),
                          rec[1] + ld(xp + H, lanes) + ld(bj + H, lanes),
                          rec[2] + ld(xp + 2 * H, lanes) + ld(bj + 2 * H, lanes),
                          rec[3] + ld(xp + 3 * H, lanes) + ld(bj + 3 * H, lanes)};
    V<Real> gate[4], c, h;
    lstm_units<Real, kOnnx>(a, ld(row.c_prev() + j, lanes), peep ? peep + j : nullptr, H, lanes,
                            gate, c, h, gates);
    st(row.c_next() + j, c, lanes);
    st(row.h_next() + j, h, lanes);
    if (row.y()) st(row.y() + j, h, lanes);
    if constexpr (kTraining) {
      Real* saved = row.saved() + j;
      for (int g = 0; g < 4; ++g) st(saved + g * H, gates.keep(gate[g], a[g]), lanes);
    }
  }

  // With zoneout of c, c' of the saved state is the zoned one, but h~ = o tanh(c~)
  // took c~ = f c + i g: recomputed here for units j0..j1-1 of running rows.
  void backward_step(int64_t k, int64_t n, int64_t j0, int64_t j1) const {
    if (!c_unzoned) return;
    const int64_t N = s.N, GH = 4 * H;
    for (int64_t b = 0; b < n; ++b) {
      const Real* saved = buf.gates + (k * N + b) * GH;
      const Real* c_prev = buf.c + (k * N + b) * H;
      for_lanes<Real>(j1 - j0, [&](int64_t jj, int64_t l) {
        const int64_t j = j0 + jj;
        V<Real> kept[4], gate[4];
        kept_gates(saved + j, H, l, gates, kept, gate);
        st(buf.zone_c_raw + b * H + j, gate[1] * ld(c_prev + j, l) + gate[0] * gate[2], l);
      });
    }
  }

  // dG: i, f, g, o pre-activations; dc: in, gradient of c'; out, of c; dh: gradient
  // of m (h' without projection). dG may point at the saved gates: every value is
  // read before any is written. With peepholes o's pre-activation saw c', so its
  // gradient joins dc' first; i's and f's saw c, so theirs join dc.
  void backward_row(const BackwardRow<Real>& row, int64_t, int64_t b, int64_t j0,
                    int64_t units) const {
    const V<Real> one = splat<Real>(1);
    const bool coupled = gates.coupled();
    const Real* saved = row.saved;
    const Real* c_next = c_unzoned ? c_unzoned + b * H + j0 : row.c_next;
    const Real* pp = peep ? peep + j0 : nullptr;
    Real* dpp = peep ? dpeep + j0 : nullptr;
    for_lanes<Real>(units, [&](int64_t j, int64_t n) {
      V<Real> dmj = ld(row.dh + j, n);
      if (row.dy) dmj += ld(row.dy + j, n);
      V<Real> kept[4], gate[4];
      kept_gates(saved + j, H, n, gates, kept, gate);
      const V<Real> i = gate[0], f = gate[1], g = gate[2], o = gate[3];
      const V<Real> cn = ld(c_next + j, n), cp = ld(row.c_prev + j, n);
      const V<Real> tc = simd::vtanh(cn);  // recomputed: tanh(c') is not saved
      const V<Real> da_o = dmj * tc * gates.kept_gate_prime(kept[3], o);
      V<Real> dcj = ld(row.dc + j, n) + dmj * o * (one - tc * tc);
      if (pp) dcj += da_o * ld(pp + 2 * H + j, n);
      const V<Real> da_i =
          (coupled ? dcj * (g - cp) : dcj * g) * gates.kept_gate_prime(kept[0], i);
      const V<Real> da_f =
          coupled ? splat<Real>(0) : dcj * cp * gates.kept_gate_prime(kept[1], f);
      V<Real> dc_prev = dcj * f;
      if (pp) {
        dc_prev += da_i * ld(pp + j, n) + da_f * ld(pp + H + j, n);
        st(dpp + j, ld(dpp + j, n) + da_i * cp, n);
        st(dpp + H + j, ld(dpp + H + j, n) + da_f * cp, n);
        st(dpp + 2 * H + j, ld(dpp + 2 * H + j, n) + da_o * cn, n);
      }
      st(row.dc + j, dc_prev, n);
      st(row.dG + j, da_i, n);
      st(row.dG + H + j, da_f, n);
      st(row.dG + 2 * H + j, dcj * i * gates.kept_candidate_prime(kept[2], g), n);
      st(row.dG + 3 * H + j, da_o, n);
    });
  }
};

// Where step k of a projected layer reads and writes (sorted rows), for both of its
// loops: h' (P wide) and c before and after the step (slots of buf.h and buf.c), m
// (every step's when training, else one) and the gates kept for backward (training).
template <typename Real, bool kTraining>
struct ProjectedStep {
  const Real* h_prev;
  Real* h_next;
  const Real* c_prev;
  Real* c_next;
  Real* m;
  Real* gates;
  int64_t H;
  ProjectedStep(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k)
      : h_prev(buf.h + slot(k, kTraining) * s.N * s.P),
        h_next(buf.h + slot(k + 1, kTraining) * s.N * s.P),
        c_prev(buf.c + slot(k, kTraining) * s.N * s.H),
        c_next(buf.c + slot(k + 1, kTraining) * s.N * s.H),
        m(buf.m + (kTraining ? k * s.N * s.H : 0)),
        gates(kTraining ? buf.gates + k * s.N * 4 * s.H : nullptr),
        H(s.H) {}
  // Row b as the cell's forward reads it, xp its input projection: the cell writes m
  // where h' would go, and y is written after the projection.
  RowPointers<Real> row(int64_t b, const Real* xp) const {
    RowPointers<Real> r;
    r.xp_ = xp;
    r.h_next_ = m + b * H;
    r.c_prev_ = c_prev + b * H;
    r.c_next_ = c_next + b * H;
    r.saved_ = kTraining ? gates + b * 4 * H : nullptr;
    return r;
  }
};

// The projected layer's steps one after the other (P > 0: a layer without a
// projection takes the drivers), each product on the weights in place, transposed or
// through OpenBLAS: short calls, reduced weights and the regularizers
// (projected_on_pool).
template <typename Real, bool kTraining, bool kOnnx = false>
void forward_steps(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                   const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                   const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, P = s.P, H_out = h_out(s), GH = 4 * H, S = steps_of(s);
  const bool direct = direct_weights(s) || (w.W_hh_r != nullptr);
  if (direct)
    direct_input_projection(buf.xproj, GH, x, w, GH, buf, s);
  else
    input_projection(buf.xproj, x, w.W_ih, GH, s);
  const bool small = !direct && uses_small_gemm(s);
  const LstmCell<Real, kOnnx> cell(buf, w, s);
  if (small) {
    transpose(buf.W_hh_t, w.W_hh, GH, H_out);
    if (P) transpose(buf.W_hr_t, w.W_hr, P, H);
  }
  gather_state(buf.h, h0, H_out, walk);
  gather_state(buf.c, c0, H, walk);
  for (int64_t k = 0; k < S; ++k) {
    const int64_t n = walk.active(k);
    const ProjectedStep<Real, kTraining> at(buf, s, k);

    mask_state(buf, k, s, 0, N, 0, H_out);  // recurrent dropout (regularizers.h)
    const Real* h_in = product_input(buf, k, s);
    if (direct)
      weight_product(buf.rec, GH, h_in, w.W_hh, w.W_hh_r, n, H_out, GH, buf, w, s.threads);
    else
      step_gemm(buf.rec, h_in, w.W_hh, true, small ? buf.W_hh_t : nullptr, n, H_out, GH, false);
    for (int64_t b = 0; b < n; ++b)
      cell_forward_row<LstmCell<Real, kOnnx>, kTraining>(
          cell, at.row(b, buf.xproj + walk.x_row(k, b) * GH), buf.rec + b * GH, H);
    if (s.round_bf16) round_to_bfloat16(at.m, at.m, n * H);  // inference: m is scratch
    if (direct)
      weight_product(at.h_next, P, at.m, w.W_hr, w.W_hr_r, n, H, P, buf, w, s.threads);
    else
      step_gemm(at.h_next, at.m, w.W_hr, true, small ? buf.W_hr_t : nullptr, n, H, P, false);
    for (int64_t b = 0; b < n; ++b) copy_row(y + walk.at(k, b) * ldy, at.h_next + b * P, P);
    if (zoneout(w, s)) zoneout_step(buf, y, ldy, w, s, k, n, 0, H_out, 0, H);
    // Finished rows keep their state, so the last slot holds h_n and c_n, and
    // every saved row is finite for the weight-gradient GEMMs.
    for (int64_t b = n; b < N; ++b) {
      copy_row(at.h_next + b * H_out, at.h_prev + b * H_out, H_out);
      copy_row(at.c_next + b * H, at.c_prev + b * H, H);
      if (kTraining) zero_row(at.m + b * H, H);
    }
  }
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * H_out, H_out, walk);
  scatter_state(c_n, buf.c + slot(S, kTraining) * N * H, H, walk);
}

// Whether a projected layer's call runs on the pool (forward_projected_on_pool, and
// its backward): every call but a short one (the weights in place), reduced weights,
// and the regularizers, which keep forward_steps' loop.
template <typename Real>
bool projected_on_pool(const LayerBuffers<Real>& buf, const LayerWeights<Real>& w,
                       const LayerShape& s) {
  return buf.W_hh_p && buf.W_hr_p && !direct_weights(s) && !w.W_hh_r && !zoneout(w, s) &&
         !buf.hm && !s.round_bf16;
}

// The projected LSTM's steps in one pool job, as forward_on_pool's for the other
// cells: W_hh ([4H, P]) and W_hr ([P, H]) packed once per call, each thread's units
// of the gates and of the state computed in the micro-kernel's epilogue, then, after
// a barrier (the projection reads all of m), each thread's columns of h' = m W_hr^T,
// and another barrier (the next step reads all of h'). On OpenBLAS, every step
// packed W_hh and W_hr again and its threads met at each of the step's two products
// (LSTM T=100 N=32 I=256 H=512 P=128 inference, 2 threads: 40 ms, torch 54 ms).
template <typename Real, bool kTraining, bool kOnnx>
void forward_projected_on_pool(Real* y, int64_t ldy, Real* h_n, Real* c_n,
                               const LayerBuffers<Real>& buf, const Real* x, const Real* h0,
                               const Real* c0, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, P = s.P, GH = 4 * H, S = steps_of(s);
  const LstmCell<Real, kOnnx> cell(buf, w, s);
  gather_state(buf.h, h0, P, walk);
  gather_state(buf.c, c0, H, walk);
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    const UnitShare columns = unit_share<Real>(P, tid, nt);  // of h' (W_hr's rows)
    // (lstmfast.freeze packs nothing of a projected layer: the panels are made here)
    pack_gate_panels<Real, 4>(buf.W_hh_p, w.W_hh, H, P, mine.u0, mine.u1);
    pack_gate_panels<Real, 1>(buf.W_hr_p, w.W_hr, P, H, columns.u0, columns.u1);
    input_projection_units(buf.xproj, GH, x, w.W_ih, 4, H, mine.j0, mine.j1, s);
    for (int64_t k = 0; k < S; ++k) {
      const int64_t n = walk.active(k);
      const ProjectedStep<Real, kTraining> at(buf, s, k);
      recurrent_step<Real, 4>(at.h_prev, P, n, P, buf.W_hh_p, H, mine.u0, mine.u1,
                              [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc)
                                  LSTMFAST_LAMBDA_INLINE {
                                    cell.template forward<kTraining>(
                                        at.row(b, buf.xproj + walk.x_row(k, b) * GH), j, lanes,
                                        acc);
                                  });
      // Finished rows keep their state, so the last slot holds h_n and c_n, and
      // every saved row is finite for the weight-gradient GEMMs.
      for (int64_t b = n; b < N; ++b) {
        copy_row(at.c_next + b * H + mine.j0, at.c_prev + b * H + mine.j0, mine.j1 - mine.j0);
        if (kTraining) zero_row(at.m + b * H + mine.j0, mine.j1 - mine.j0);
        copy_row(at.h_next + b * P + columns.j0, at.h_prev + b * P + columns.j0,
                 columns.j1 - columns.j0);
      }
      if (nt > 1) pool_barrier();
      recurrent_step<Real, 1>(at.m, H, n, H, buf.W_hr_p, P, columns.u0, columns.u1,
                              [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc)
                                  LSTMFAST_LAMBDA_INLINE {
                                    st(at.h_next + b * P + j, acc[0], lanes);
                                    st(y + walk.at(k, b) * ldy + j, acc[0], lanes);
                                  });
      if (k + 1 < S && nt > 1) pool_barrier();
    }
  };
  run_on_pool(s.threads, body);
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * P, P, walk);
  scatter_state(c_n, buf.c + slot(S, kTraining) * N * H, H, walk);
}

// After the loop: the peephole gradients summed over rows and steps into dw.
template <typename Real>
inline void peephole_gradients(const LayerGrads<Real>& dw, const Real* dpeep, int64_t H) {
  add_or_assign(dw.dP_i, dpeep, H, dw.beta);
  add_or_assign(dw.dP_f, dpeep + H, H, dw.beta);
  add_or_assign(dw.dP_o, dpeep + 2 * H, H, dw.beta);
}

}  // namespace

template <typename Real>
void lstm_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                  const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                  const LayerShape& s) {
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kOnnx = decltype(onnx)::value;
    if (s.P == 0) {
      forward_layer(LstmCell<Real, kOnnx>(buf, w, s), y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
    } else if (projected_on_pool(buf, w, s)) {
      if (s.training)
        forward_projected_on_pool<Real, true, kOnnx>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
      else
        forward_projected_on_pool<Real, false, kOnnx>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
    } else if (s.training) {
      forward_steps<Real, true, kOnnx>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
    } else {
      forward_steps<Real, false, kOnnx>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
    }
  });
}

namespace {

// dh' of step k in total (from step k + 1, in buf.dh, and from y: dy, rows lddy
// apart, or nullptr), columns p0..p0+width-1 of every row, kept per step (buf.dhs)
// for dW_hr; a finished row's is zero. Both of the projected backward's loops.
template <typename Real>
void total_dh_columns(Real* dhk, const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                      const Walk& walk, int64_t k, int64_t n, int64_t p0, int64_t width) {
  const int64_t P = walk.s.P;
  for (int64_t b = 0; b < walk.s.N; ++b) {
    Real* out = dhk + b * P + p0;
    if (b >= n) {
      zero_row(out, width);
      continue;
    }
    const Real* dyb = dy ? dy + walk.at(k, b) * lddy + p0 : nullptr;
    const Real* in = buf.dh + b * P + p0;
    for_lanes<Real>(width, [&](int64_t j, int64_t l) {
      st(out + j, dyb ? ld(in + j, l) + ld(dyb + j, l) : ld(in + j, l), l);
    });
  }
}

// The cell's backward of units j0..j0+units-1 of step k's rows, from dm (buf.dm) and
// dc: their gate gradients into dGk and dc; a finished row's gate gradients are zero.
// Both of the projected backward's loops.
template <class Cell, typename Real>
void projected_backward_rows(const Cell& cell, Real* dGk, const LayerBuffers<Real>& buf,
                             const LayerShape& s, int64_t k, int64_t n, int64_t j0,
                             int64_t units) {
  const int64_t N = s.N, H = s.H, GH = 4 * H;
  for (int64_t b = 0; b < n; ++b) {
    BackwardRow<Real> row{};
    row.dG_in = row.dG = dGk + b * GH + j0;
    row.dh = buf.dm + b * H + j0;
    row.dc = buf.dc + b * H + j0;
    row.saved = buf.gates + (k * N + b) * GH + j0;
    row.c_prev = buf.c + (k * N + b) * H + j0;
    row.c_next = buf.c + ((k + 1) * N + b) * H + j0;
    cell.backward_row(row, k, b, j0, units);
  }
  for (int64_t b = n; b < N; ++b)
    for (int g = 0; g < 4; ++g) zero_row(dGk + b * GH + g * H + j0, units);
}

// The backward of a projected layer on the pool (without recurrent dropout or
// zoneout), the mirror of forward_projected_on_pool. At every step, last to first:
// each thread adds its columns of dy into dh' (kept per step for dW_hr); after a
// barrier, its units of dm = dh' W_hr and their gate gradients; after another
// barrier, its columns of dh = dG W_hh, which only its own next step reads. Then the
// weight gradients, each thread its gate rows (weight_gradients_share) and its rows
// of dW_hr = dh'^T m.
template <typename Real, bool kOnnx>
void backward_projected_on_pool(const LstmCell<Real, kOnnx>& cell, Real* dG_x, Real* dh0,
                                Real* dc0, const LayerGrads<Real>& dw,
                                const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                                const Real* dh_n, const Real* dc_n, const Real* x,
                                const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, P = s.P, GH = 4 * H, S = steps_of(s);
  Real* dG = input_gate_grads(dG_x, buf.dG ? buf.dG : buf.gates, s);  // see LayerBuffers::dG
  gather_state(buf.dh, dh_n, P, walk);
  gather_state(buf.dc, dc_n, H, walk);
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    const UnitShare columns = unit_share<Real>(P, tid, nt);  // of h'
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    const int64_t p0 = columns.j0, width = columns.j1 - columns.j0;
    auto barrier = [nt] {
      if (nt > 1) pool_barrier();
    };
    for (int64_t k = S - 1; k >= 0; --k) {
      const int64_t n = walk.active(k);
      Real* dGk = dG + k * N * GH;
      Real* dhk = buf.dhs + k * N * P;
      total_dh_columns(dhk, buf, dy, lddy, walk, k, n, p0, width);
      barrier();
      dh_product_stored(buf.dm, dhk, P, w.W_hr, n, P, H, j0, mine.j1, false);
      projected_backward_rows(cell, dGk, buf, s, k, n, j0, units);
      barrier();
      // finished rows keep their dh
      dh_product_stored(buf.dh, dGk, GH, w.W_hh, n, GH, P, p0, columns.j1, false);
    }
    barrier();
    weight_gradients_share(tid, nt, dG_x, dw, buf.dsum, dG, GH, dG, buf.h, x, GH, s);
    if (width > 0)
      gemm<Real>(true, false, width, H, S * N, Real(1), buf.dhs + p0, P, buf.m, H, dw.beta,
                 dw.dW_hr + p0 * H, H);
  };
  run_on_pool(s.threads, body);
  scatter_state(dh0, buf.dh, P, walk);
  scatter_state(dc0, buf.dc, H, walk);
}

// The backward with a projection runs its own loop (the projection's product
// between the cell and dh); without one, backward_layer.
template <typename Real, bool kOnnx>
void backward_of(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                 const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                 const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                 const LayerShape& s) {
  LstmCell<Real, kOnnx> cell(buf, w, s);
  if (w.peephole) zero_row(buf.dpeep, 3 * s.H);
  if (s.P == 0) {
    backward_layer(cell, dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
    if (w.peephole) peephole_gradients(dw, buf.dpeep, s.H);
    return;
  }
  if (!zoneout(w, s) && !buf.hm) {
    backward_projected_on_pool(cell, dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
    if (w.peephole) peephole_gradients(dw, buf.dpeep, s.H);
    return;
  }
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, P = s.P, GH = 4 * H, S = steps_of(s);
  Real* dG = input_gate_grads(dG_x, buf.dG ? buf.dG : buf.gates, s);  // see LayerBuffers::dG
  gather_state(buf.dh, dh_n, P, walk);
  gather_state(buf.dc, dc_n, H, walk);
  const bool zoned = zoneout(w, s);
  const Real* dy_cell = zoneout_dy(dy, w, s);
  for (int64_t k = S - 1; k >= 0; --k) {
    const int64_t n = walk.active(k);
    Real* dGk = dG + k * N * GH;
    if (zoned) zoneout_backward_before(buf, dy, lddy, w, s, k, n, 0, P, 0, H);
    // dh' in total, then dm = dh' W_hr.
    Real* dhk = buf.dhs + k * N * P;
    total_dh_columns(dhk, buf, dy_cell, lddy, walk, k, n, 0, P);
    step_gemm(buf.dm, dhk, w.W_hr, false, w.W_hr, n, P, H, false);
    cell.backward_step(k, n, 0, H);
    projected_backward_rows(cell, dGk, buf, s, k, n, 0, H);
    // dh = dG W_hh for the running rows (times the recurrent dropout mask); finished
    // rows keep theirs.
    if (zoned) zoneout_backward_after(buf, w, s, n, 0, P, 0, H, false);
    step_gemm(buf.hm ? buf.dh_rec : buf.dh, dGk, w.W_hh, false, w.W_hh, n, GH, P,
              zoned && !buf.hm);
    if (buf.hm) masked_dh(buf, n, P, 0, P, zoned);
  }
  scatter_state(dh0, buf.dh, P, walk);
  scatter_state(dc0, buf.dc, H, walk);
  weight_gradients(dG_x, dw, buf.dsum, dG, dG, buf.hm ? buf.hm : buf.h, x, GH, s);
  if (w.peephole) peephole_gradients(dw, buf.dpeep, H);
  // dW_hr += sum over steps of dh'^T m: one GEMM
  gemm<Real>(true, false, P, H, S * N, Real(1), buf.dhs, P, buf.m, H, dw.beta, dw.dW_hr, H);
}

}  // namespace

template <typename Real>
void lstm_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                   const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                   const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                   const LayerShape& s) {
  with_gate_path(s, [&](auto onnx) {
    constexpr bool kOnnx = decltype(onnx)::value;
    backward_of<Real, kOnnx>(dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
  });
}

LSTMFAST_INSTANTIATE_CELL(lstm)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
