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
#include "cells/cell.h"
#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

// The cell update of `lanes` units from their four pre-activations a[0..3] (i, f,
// g, o; bias included) and c: i, f, g, o activated, c' and h' = o tanh(c').
//   peep: [3H] P_i, P_f, P_o from the first of these units on, H apart; nullptr = none
template <typename Real>
LSTMFAST_ALWAYS_INLINE void lstm_units(const V<Real> (&a)[4], V<Real> c_prev, const Real* peep,
                                       int64_t H, int64_t lanes, V<Real> (&gate)[4], V<Real>& c,
                                       V<Real>& h) {
  V<Real> a_i = a[0], a_f = a[1], a_o = a[3];
  if (peep) {
    a_i += ld(peep, lanes) * c_prev;
    a_f += ld(peep + H, lanes) * c_prev;
  }
  gate[0] = simd::vsigmoid<Real>(a_i);
  gate[1] = simd::vsigmoid<Real>(a_f);
  gate[2] = simd::vtanh(a[2]);
  c = gate[1] * c_prev + gate[0] * gate[2];
  if (peep) a_o += ld(peep + 2 * H, lanes) * c;
  gate[3] = simd::vsigmoid<Real>(a_o);
  h = gate[3] * simd::vtanh(c);
}

// One row of one step, fused: pre-activations (still in cache) to c', m and y.
//   c_next: [H] out;  m: [H] out (h' itself without projection);  y: [H] out or nullptr
//   gates: [4H] out when training: i, f, g, o
//   xp: [4H] x W_ih^T;  rec: [4H] h W_hh^T;  bias: [4H];  c_prev: [H]
//   peep: [3H] peepholes, or nullptr
template <typename Real, bool kTraining>
inline void lstm_forward_row(Real* c_next, Real* m, Real* y, Real* gates, const Real* xp,
                             const Real* rec, const Real* bias, const Real* c_prev,
                             const Real* peep, int64_t H) {
  for_lanes<Real>(H, [&](int64_t j, int64_t n) {
    auto pre = [&](int64_t gate) {
      const int64_t o = gate * H + j;
      return ld(xp + o, n) + ld(rec + o, n) + ld(bias + o, n);
    };
    const V<Real> a[4] = {pre(0), pre(1), pre(2), pre(3)};
    V<Real> gate[4], c, h;
    lstm_units<Real>(a, ld(c_prev + j, n), peep ? peep + j : nullptr, H, n, gate, c, h);
    const V<Real> i = gate[0], f = gate[1], g = gate[2], o = gate[3];
    st(c_next + j, c, n);
    st(m + j, h, n);
    if (y) st(y + j, h, n);
    if constexpr (kTraining) {
      st(gates + j, i, n);
      st(gates + H + j, f, n);
      st(gates + 2 * H + j, g, n);
      st(gates + 3 * H + j, o, n);
    }
  });
}

template <typename Real, bool kTraining>
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
  if (small) {
    transpose(buf.W_hh_t, w.W_hh, GH, H_out);
    if (P) transpose(buf.W_hr_t, w.W_hr, P, H);
  }
  gather_state(buf.h, h0, H_out, walk);
  gather_state(buf.c, c0, H, walk);
  for (int64_t k = 0; k < S; ++k) {
    const int64_t n = walk.active(k);
    const Real* h_prev = buf.h + slot(k, kTraining) * N * H_out;
    Real* h_next = buf.h + slot(k + 1, kTraining) * N * H_out;
    const Real* c_prev = buf.c + slot(k, kTraining) * N * H;
    Real* c_next = buf.c + slot(k + 1, kTraining) * N * H;
    Real* m = P ? buf.m + (kTraining ? k * N * H : 0) : h_next;
    Real* gates = kTraining ? buf.gates + k * N * GH : nullptr;

    mask_state(buf, k, s, 0, N, 0, H_out);  // recurrent dropout (regularizers.h)
    const Real* h_in = product_input(buf, k, s);
    if (direct)
      weight_product(buf.rec, GH, h_in, w.W_hh, w.W_hh_r, n, H_out, GH, buf, w, s.threads);
    else
      step_gemm(buf.rec, h_in, w.W_hh, true, small ? buf.W_hh_t : nullptr, n, H_out, GH, false);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t at = walk.at(k, b);
      lstm_forward_row<Real, kTraining>(c_next + b * H, m + b * H, P ? nullptr : y + at * ldy,
                                        kTraining ? gates + b * GH : nullptr,
                                        buf.xproj + walk.x_row(k, b) * GH, buf.rec + b * GH, w.bias,
                                        c_prev + b * H, w.peephole, H);
    }
    if (P) {
      if (s.round_bf16) round_to_bfloat16(m, m, n * H);  // inference: m is scratch
      if (direct)
        weight_product(h_next, P, m, w.W_hr, w.W_hr_r, n, H, P, buf, w, s.threads);
      else
        step_gemm(h_next, m, w.W_hr, true, small ? buf.W_hr_t : nullptr, n, H, P, false);
      for (int64_t b = 0; b < n; ++b) copy_row(y + walk.at(k, b) * ldy, h_next + b * P, P);
    }
    if (zoneout(w, s)) zoneout_step(buf, y, ldy, w, s, k, n, 0, H_out, 0, H);
    // Finished rows keep their state, so the last slot holds h_n and c_n, and
    // every saved row is finite for the weight-gradient GEMMs.
    for (int64_t b = n; b < N; ++b) {
      copy_row(h_next + b * H_out, h_prev + b * H_out, H_out);
      copy_row(c_next + b * H, c_prev + b * H, H);
      if (kTraining && P) zero_row(m + b * H, H);
    }
  }
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * H_out, H_out, walk);
  scatter_state(c_n, buf.c + slot(S, kTraining) * N * H, H, walk);
}

// The forward without projection on the persistent pool (forward_on_pool): each
// thread owns a range of unit blocks (all four gates of its units) and at every step
// computes their pre-activations for all running rows and the cell update in the
// micro-kernel's epilogue.
template <typename Real, bool kTraining>
void forward_fused(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                   const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                   const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = 4 * H, S = steps_of(s);
  gather_state(buf.h, h0, H, walk);
  gather_state(buf.c, c0, H, walk);
  const Real* bias = w.bias;
  const Real* peep = w.peephole;
  forward_on_pool<Real, 4>(buf, x, GH, w, s, [&](int64_t k, int64_t n, const UnitShare& mine) {
    const Real* h_prev = buf.h + slot(k, kTraining) * N * H;
    Real* h_next = buf.h + slot(k + 1, kTraining) * N * H;
    const Real* c_prev = buf.c + slot(k, kTraining) * N * H;
    Real* c_next = buf.c + slot(k + 1, kTraining) * N * H;
    Real* gates = kTraining ? buf.gates + k * N * GH : nullptr;
    auto epilogue = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
      const int64_t at = walk.at(k, b);
      const Real* xp = buf.xproj + walk.x_row(k, b) * GH + j;
      const Real* bj = bias + j;
      const V<Real> a[4] = {acc[0] + ld(xp, lanes) + ld(bj, lanes),
                            acc[1] + ld(xp + H, lanes) + ld(bj + H, lanes),
                            acc[2] + ld(xp + 2 * H, lanes) + ld(bj + 2 * H, lanes),
                            acc[3] + ld(xp + 3 * H, lanes) + ld(bj + 3 * H, lanes)};
      V<Real> gate[4], c, h;
      lstm_units<Real>(a, ld(c_prev + b * H + j, lanes), peep ? peep + j : nullptr, H, lanes,
                       gate, c, h);
      const V<Real> i = gate[0], f = gate[1], g = gate[2], o = gate[3];
      st(c_next + b * H + j, c, lanes);
      st(h_next + b * H + j, h, lanes);
      st(y + at * ldy + j, h, lanes);
      if constexpr (kTraining) {
        Real* gb = gates + b * GH + j;
        st(gb, i, lanes);
        st(gb + H, f, lanes);
        st(gb + 2 * H, g, lanes);
        st(gb + 3 * H, o, lanes);
      }
    };
    recurrent_step<Real, 4>(product_input(buf, k, s), H, n, H, buf.W_hh_p, H, mine.u0, mine.u1,
                            epilogue);
    if (zoneout(w, s)) zoneout_step(buf, y, ldy, w, s, k, n, mine.j0, mine.j1, mine.j0, mine.j1);
    // Finished rows keep their state (see forward_steps).
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    for (int64_t b = n; b < N; ++b) {
      copy_row(h_next + b * H + j0, h_prev + b * H + j0, units);
      copy_row(c_next + b * H + j0, c_prev + b * H + j0, units);
    }
  });
  scatter_state(h_n, buf.h + slot(S, kTraining) * N * H, H, walk);
  scatter_state(c_n, buf.c + slot(S, kTraining) * N * H, H, walk);
}

// The forward of an inference layer with reduced weights and no projection
// (reduced_steps): float32 only, as reduced weights are.
template <typename Real>
void forward_reduced(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                     const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                     const LayerShape& s) {
  if constexpr (std::is_same<Real, float>::value) {
    const Walk walk(s);
    const int64_t N = s.N, H = s.H, GH = 4 * H, S = steps_of(s);
    gather_state(buf.h, h0, H, walk);
    gather_state(buf.c, c0, H, walk);
    reduced_steps(buf, x, GH, w, s, [&](int64_t k, int64_t b, bool running) {
      const Real* c_prev = buf.c + (k & 1) * N * H + b * H;
      Real* c_next = buf.c + ((k + 1) & 1) * N * H + b * H;
      if (running)
        lstm_forward_row<Real, false>(c_next, buf.h + ((k + 1) & 1) * N * H + b * H,
                                      y + walk.at(k, b) * ldy, nullptr,
                                      buf.xproj + walk.x_row(k, b) * GH, buf.rec + b * GH,
                                      w.bias, c_prev, w.peephole, H);
      else
        copy_row(c_next, c_prev, H);
    });
    scatter_state(h_n, buf.h + (S & 1) * N * H, H, walk);
    scatter_state(c_n, buf.c + (S & 1) * N * H, H, walk);
  }
}

// Backward of one row of one step.
//   dG: [4H] out: gradient of the pre-activations (i, f, g, o)
//   dc: [H] in: gradient of c'; out: gradient of c
//   dm: [H] gradient of m (of h' without projection);  dy: [H] added to dm, or nullptr
//   gates: [4H] saved i, f, g, o;  c_prev: [H] c;  c_next: [H] c'
//   H: the gate stride;  units: how many units from the pointers on (H for all)
//   peep: [3H] peepholes (H apart), or nullptr;  dpeep: [3H] their gradients, added into
// dG may point at gates: every value is read before any is written. With
// peepholes o's pre-activation saw c', so its gradient joins dc' first; i's and
// f's saw c, so theirs join dc.
template <typename Real>
inline void lstm_backward_row(Real* dG, Real* dc, const Real* dm, const Real* dy,
                              const Real* gates, const Real* c_prev, const Real* c_next,
                              const Real* peep, Real* dpeep, int64_t H, int64_t units) {
  const V<Real> one = splat<Real>(1);
  for_lanes<Real>(units, [&](int64_t j, int64_t n) {
    V<Real> dmj = ld(dm + j, n);
    if (dy) dmj += ld(dy + j, n);
    const V<Real> i = ld(gates + j, n), f = ld(gates + H + j, n);
    const V<Real> g = ld(gates + 2 * H + j, n), o = ld(gates + 3 * H + j, n);
    const V<Real> cn = ld(c_next + j, n), cp = ld(c_prev + j, n);
    const V<Real> tc = simd::vtanh(cn);  // recomputed: tanh(c') is not saved
    const V<Real> da_o = dmj * tc * o * (one - o);
    V<Real> dcj = ld(dc + j, n) + dmj * o * (one - tc * tc);
    if (peep) dcj += da_o * ld(peep + 2 * H + j, n);
    const V<Real> da_i = dcj * g * i * (one - i);
    const V<Real> da_f = dcj * cp * f * (one - f);
    V<Real> dc_prev = dcj * f;
    if (peep) {
      dc_prev += da_i * ld(peep + j, n) + da_f * ld(peep + H + j, n);
      st(dpeep + j, ld(dpeep + j, n) + da_i * cp, n);
      st(dpeep + H + j, ld(dpeep + H + j, n) + da_f * cp, n);
      st(dpeep + 2 * H + j, ld(dpeep + 2 * H + j, n) + da_o * cn, n);
    }
    st(dc + j, dc_prev, n);
    st(dG + j, da_i, n);
    st(dG + H + j, da_f, n);
    st(dG + 2 * H + j, dcj * i * (one - g * g), n);
    st(dG + 3 * H + j, da_o, n);
  });
}

// After the loop: the peephole gradients summed over rows and steps into dw.
template <typename Real>
inline void peephole_gradients(const LayerGrads<Real>& dw, const Real* dpeep, int64_t H) {
  add_or_assign(dw.dP_i, dpeep, H, dw.beta);
  add_or_assign(dw.dP_f, dpeep + H, H, dw.beta);
  add_or_assign(dw.dP_o, dpeep + 2 * H, H, dw.beta);
}

// With zoneout of c, c' of the saved state is the zoned one, but h~ = o tanh(c~) took
// c~ = f c + i g: recomputed here for units j0..j1-1 of running rows, into zone_c_raw.
// Returns where the backward finds c~ of step k (rows H apart).
template <typename Real>
inline const Real* unzoned_c(const LayerBuffers<Real>& buf, const LayerWeights<Real>& w,
                             const LayerShape& s, int64_t k, int64_t n, int64_t j0, int64_t j1) {
  const int64_t N = s.N, H = s.H, GH = 4 * H;
  if (!zoneout_c(w, s)) return buf.c + (k + 1) * N * H;
  for (int64_t b = 0; b < n; ++b) {
    const Real* gates = buf.gates + (k * N + b) * GH;
    const Real* c_prev = buf.c + (k * N + b) * H;
    for_lanes<Real>(j1 - j0, [&](int64_t jj, int64_t l) {
      const int64_t j = j0 + jj;
      st(buf.zone_c_raw + b * H + j,
         ld(gates + H + j, l) * ld(c_prev + j, l) + ld(gates + j, l) * ld(gates + 2 * H + j, l), l);
    });
  }
  return buf.zone_c_raw;
}

// The backward without projection on the pool (backward_on_pool): each thread
// does the gate gradients (and dc) of its units at every step.
template <typename Real>
void backward_fused(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                    const Real* dh_n, const Real* dc_n, const Real* x,
                    const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = 4 * H;
  Real* dG = input_gate_grads(dG_x, buf.dG ? buf.dG : buf.gates, s);  // see LayerBuffers::dG
  gather_state(buf.dh, dh_n, H, walk);
  gather_state(buf.dc, dc_n, H, walk);
  const Real* peep = w.peephole;
  if (peep) zero_row(buf.dpeep, 3 * H);
  auto pointwise = [&](int64_t k, int64_t n, const UnitShare& mine) {
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    Real* dGk = dG + k * N * GH;
    const Real* gates = buf.gates + k * N * GH;
    const Real* c_prev = buf.c + k * N * H;
    const Real* c_next = unzoned_c(buf, w, s, k, n, j0, j0 + units);
    const Real* dy_cell = zoneout_dy(dy, w, s);
    for (int64_t b = 0; b < n; ++b)
      lstm_backward_row<Real>(dGk + b * GH + j0, buf.dc + b * H + j0, buf.dh + b * H + j0,
                              dy_cell ? dy_cell + walk.at(k, b) * lddy + j0 : nullptr, gates + b * GH + j0,
                              c_prev + b * H + j0, c_next + b * H + j0, peep ? peep + j0 : nullptr,
                              peep ? buf.dpeep + j0 : nullptr, H, units);
    for (int64_t b = n; b < N; ++b)
      for (int64_t g = 0; g < 4; ++g) zero_row(dGk + b * GH + g * H + j0, units);
  };
  backward_on_pool(dG_x, dw, buf, dG, GH, dG, GH, false, x, w, s, pointwise, dy, lddy);
  scatter_state(dh0, buf.dh, H, walk);
  scatter_state(dc0, buf.dc, H, walk);
  if (peep) peephole_gradients(dw, buf.dpeep, H);
}

}  // namespace

template <typename Real>
void lstm_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                  const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                  const LayerShape& s) {
  if (s.P == 0 && w.W_hh_r != nullptr) {
    forward_reduced<Real>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  } else if (s.P == 0 && !direct_weights(s) && w.W_hh_r == nullptr) {
    if (s.training)
      forward_fused<Real, true>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
    else
      forward_fused<Real, false>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  } else if (s.training) {
    forward_steps<Real, true>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  } else {
    forward_steps<Real, false>(y, ldy, h_n, c_n, buf, x, h0, c0, w, s);
  }
}

template <typename Real>
void lstm_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                   const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                   const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                   const LayerShape& s) {
  if (s.P == 0)
    return backward_fused(dG_x, dh0, dc0, dw, buf, dy, lddy, dh_n, dc_n, x, w, s);
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, P = s.P, H_out = h_out(s), GH = 4 * H, S = steps_of(s);
  Real* dG = input_gate_grads(dG_x, buf.dG ? buf.dG : buf.gates, s);  // see LayerBuffers::dG
  gather_state(buf.dh, dh_n, H_out, walk);
  gather_state(buf.dc, dc_n, H, walk);
  const Real* peep = w.peephole;
  if (peep) zero_row(buf.dpeep, 3 * H);
  for (int64_t k = S - 1; k >= 0; --k) {
    const int64_t n = walk.active(k);
    Real* dGk = dG + k * N * GH;
    const Real* gates = buf.gates + k * N * GH;
    const Real* c_prev = buf.c + k * N * H;
    const Real* c_next = unzoned_c(buf, w, s, k, n, 0, H);
    const Real* dm = buf.dh;
    const bool zoned = zoneout(w, s);
    if (zoned) zoneout_backward_before(buf, dy, lddy, w, s, k, n, 0, H_out, 0, H);
    const Real* dy_cell = zoneout_dy(dy, w, s);
    bool add_dy = dy_cell != nullptr;
    if (P) {
      // dh' in total (from step k+1 and from y), saved for dW_hr; then dm = dh' W_hr.
      Real* dhk = buf.dhs + k * N * P;
      for (int64_t b = 0; b < n; ++b) {
        const Real* dyb = dy_cell ? dy_cell + walk.at(k, b) * lddy : nullptr;
        for_lanes<Real>(P, [&](int64_t j, int64_t l) {
          V<Real> v = ld(buf.dh + b * P + j, l);
          if (dyb) v += ld(dyb + j, l);
          st(dhk + b * P + j, v, l);
        });
      }
      for (int64_t b = n; b < N; ++b) zero_row(dhk + b * P, P);
      step_gemm(buf.dm, dhk, w.W_hr, false, w.W_hr, n, P, H, false);
      dm = buf.dm;
      add_dy = false;
    }
    for (int64_t b = 0; b < n; ++b)
      lstm_backward_row<Real>(dGk + b * GH, buf.dc + b * H, dm + b * H,
                              add_dy ? dy_cell + walk.at(k, b) * lddy : nullptr, gates + b * GH,
                              c_prev + b * H, c_next + b * H, peep, buf.dpeep, H, H);
    for (int64_t b = n; b < N; ++b) zero_row(dGk + b * GH, GH);
    // dh = dG W_hh for the running rows (times the recurrent dropout mask); finished
    // rows keep theirs.
    if (zoned) zoneout_backward_after(buf, w, s, n, 0, H_out, 0, H, false);
    step_gemm(buf.hm ? buf.dh_rec : buf.dh, dGk, w.W_hh, false, w.W_hh, n, GH, H_out,
              zoned && !buf.hm);
    if (buf.hm) masked_dh(buf, n, H_out, 0, H_out, zoned);
  }
  scatter_state(dh0, buf.dh, H_out, walk);
  scatter_state(dc0, buf.dc, H, walk);
  weight_gradients(dG_x, dw, buf.dsum, dG, dG, buf.hm ? buf.hm : buf.h, x, GH, s);
  if (peep) peephole_gradients(dw, buf.dpeep, H);
  if (P)  // dW_hr += sum over steps of dh'^T m: one GEMM
    gemm<Real>(true, false, P, H, S * N, Real(1), buf.dhs, P, buf.m, H, dw.beta, dw.dW_hr, H);
}

template void lstm_forward<float>(float*, int64_t, float*, float*, const LayerBuffers<float>&,
                                  const float*, const float*, const float*,
                                  const LayerWeights<float>&, const LayerShape&);
template void lstm_forward<double>(double*, int64_t, double*, double*,
                                   const LayerBuffers<double>&, const double*, const double*,
                                   const double*, const LayerWeights<double>&, const LayerShape&);
template void lstm_backward<float>(float*, float*, float*, const LayerGrads<float>&,
                                   const LayerBuffers<float>&, const float*, int64_t,
                                   const float*, const float*, const float*,
                                   const LayerWeights<float>&, const LayerShape&);
template void lstm_backward<double>(double*, double*, double*, const LayerGrads<double>&,
                                    const LayerBuffers<double>&, const double*, int64_t,
                                    const double*, const double*, const double*,
                                    const LayerWeights<double>&, const LayerShape&);

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
