// The regularizers that act inside the recurrence, shared by every cell's time
// loop: recurrent dropout (a mask on h where it enters h W_hh^T) and zoneout (each
// unit keeps its old value with a mask drawn per step), forward and backward.
// Included only by the per-ISA kernel units.
#pragma once

#include <cstdint>

#include "runtime/kernel_unit.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// Recurrent dropout (docs/cells.md): one mask per sequence on h where it enters the
// recurrent product, the same for every gate and step. buf.hm holds h times the mask,
// slot by slot like buf.h: the forward's products read it, and so does dW_hh, since
// the weight gradient is taken with the h the product saw. Without the mask buf.hm is
// null and both read buf.h.

// The rows the recurrent product of step k reads (rows h_out(s) apart).
template <typename Real>
inline const Real* product_input(const LayerBuffers<Real>& buf, int64_t k, const LayerShape& s) {
  return (buf.hm ? buf.hm : buf.h) + slot(k, s.training) * s.N * h_out(s);
}

// A bfloat16 layer on widened weights (LayerShape::round_bf16) reads h through hm
// too, rounded to bfloat16 there (recurrent dropout and reduced weights exclude
// each other).

// hm = h times the mask (or h rounded) in slot k, rows b0..b1-1, units j0..j1-1
// (nothing without hm).
template <typename Real>
inline void mask_state(const LayerBuffers<Real>& buf, int64_t k, const LayerShape& s, int64_t b0,
                       int64_t b1, int64_t j0, int64_t j1) {
  if (!buf.hm || j1 <= j0) return;
  const int64_t width = h_out(s), offset = slot(k, s.training) * s.N * width;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = offset + b * width + j0;
    if (s.round_bf16) {
      round_to_bfloat16(buf.hm + row, buf.h + row, j1 - j0);
      continue;
    }
    const Real* mask = buf.mask_sorted + b * width + j0;
    for_lanes<Real>(j1 - j0, [&](int64_t j, int64_t n) {
      st(buf.hm + row + j, ld(buf.h + row + j, n) * ld(mask + j, n), n);
    });
  }
}

// After dh_rec = dG W_hh for rows 0..n-1, units j0..j1-1: dh = dh_rec times the mask,
// added to what dh holds when accumulate (the part of the gradient that bypassed W_hh).
template <typename Real>
inline void masked_dh(const LayerBuffers<Real>& buf, int64_t n, int64_t width, int64_t j0,
                      int64_t j1, bool accumulate) {
  for (int64_t b = 0; b < n; ++b) {
    Real* dh = buf.dh + b * width + j0;
    const Real* rec = buf.dh_rec + b * width + j0;
    const Real* mask = buf.mask_sorted + b * width + j0;
    for_lanes<Real>(j1 - j0, [&](int64_t j, int64_t l) {
      const V<Real> v = ld(rec + j, l) * ld(mask + j, l);
      st(dh + j, accumulate ? ld(dh + j, l) + v : v, l);
    });
  }
}

// ---------------------------------------------------------------------------
// Zoneout (docs/cells.md, ESPnet's convention): after a cell's step, each unit keeps
// its old value with factor m (a mask of 0 and 1 per step in training, the
// probability in eval): h_t = m h_{t-1} + (1 - m) h~_t, the same for c. What is
// output and carried is the zoned h_t, c_t. In backward a step's gradient g of h_t
// splits: (1 - m) g enters the cell, m g goes to h_{t-1} directly.

// Masks drawn inside the kernels (LayerShape::zone_hashed): a counter-based generator,
// so that backward draws again what forward drew and nothing is stored. The mask of
// unit j of (time, row) `at` (at = t N + row, the caller's row) of state `which` (0 h,
// 1 c) of a layer-direction with seed s:
//   key  = low 32 bits of splitmix64(s ^ (which T N + at))
//   hash = fmix32(key + j * 0x9E3779B9)                 (MurmurHash3's finalizer)
//   keep = hash < p 2^32                                 (1: keep the old value)
// All integer arithmetic, so every instruction set and thread count draws the same
// masks; reference.zoneout_masks_from_seed is the same in NumPy.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// 1 where units j..j+lanes-1 keep their old value, else 0 (lanes past n: anything).
template <typename Real>
inline V<Real> zoneout_keep(uint64_t seed, int64_t which, int64_t T, int64_t N, int64_t at,
                            int64_t j, double p) {
  if (p >= 1) return splat<Real>(1);
  if (p <= 0) return splat<Real>(0);
  using U = typename simd::UintOf<Real>::vec;  // unsigned lanes as wide as Real's
  constexpr int64_t W = kWidth<Real>;
  const uint32_t key =
      static_cast<uint32_t>(splitmix64(seed ^ static_cast<uint64_t>(which * T * N + at)));
  const U low = U{} + 0xFFFFFFFFu;  // 32-bit arithmetic in lanes that may be 64-bit wide
  U h;
  for (int64_t l = 0; l < W; ++l) h[l] = static_cast<uint32_t>(j + l);
  h = (h * 0x9E3779B9u + key) & low;
  h ^= h >> 16;
  h = (h * 0x85EBCA6Bu) & low;
  h ^= h >> 13;
  h = (h * 0xC2B2AE35u) & low;
  h ^= h >> 16;
  // below 2^32 as p < 1, so it fits 32-bit lanes
  const auto threshold = static_cast<typename simd::UintOf<Real>::lane>(p * 4294967296.0);
  using I = simd::ivec_t<Real>;
  const I keep = (I)(h < (U{} + threshold));  // -1 where kept, 0 elsewhere
  return __builtin_convertvector(-keep, V<Real>);
}

template <typename Real>
inline bool zoneout_h(const LayerWeights<Real>& w, const LayerShape& s) {
  return w.zone_h || s.zone_p_h != 0;
}
template <typename Real>
inline bool zoneout_c(const LayerWeights<Real>& w, const LayerShape& s) {
  return w.zone_c || s.zone_p_c != 0;
}
template <typename Real>
inline bool zoneout(const LayerWeights<Real>& w, const LayerShape& s) {
  return zoneout_h(w, s) || zoneout_c(w, s);
}

// The keep-old factors of n units from unit j of (time, row) `at` of state `which`: from
// its [T, N, width] mask, drawn from the seed (LayerShape::zone_hashed), or the constant p.
template <typename Real>
inline V<Real> zoneout_factor(const LayerWeights<Real>& w, const LayerShape& s, int which,
                              int64_t at, int64_t width, int64_t j, int64_t n) {
  const Real* mask = which == 0 ? w.zone_h : w.zone_c;
  const double p = which == 0 ? s.zone_p_h : s.zone_p_c;
  if (mask) return ld(mask + at * width + j, n);
  if (s.zone_hashed) return zoneout_keep<Real>(w.zone_seed, which, s.T, s.N, at, j, p);
  return splat<Real>(static_cast<Real>(p));
}

// prev and next rows of state `which`: next = m prev + (1 - m) next, also into out (y)
// when given.
template <typename Real>
inline void zoneout_blend(Real* next, Real* out, const Real* prev, const LayerWeights<Real>& w,
                          const LayerShape& s, int which, int64_t at, int64_t width, int64_t j0,
                          int64_t j1) {
  for_lanes<Real>(j1 - j0, [&](int64_t j, int64_t n) {
    const V<Real> m = zoneout_factor(w, s, which, at, width, j0 + j, n);
    const V<Real> new_value = ld(next + j0 + j, n);
    const V<Real> v = new_value + m * (ld(prev + j0 + j, n) - new_value);
    st(next + j0 + j, v, n);
    if (out) st(out + j0 + j, v, n);
  });
}

// After step k of running rows 0..n-1 wrote h (and c, y): zone out units j0..j1-1 of h
// (of its width h_out(s)) and units c0..c1-1 of c. raw_h: when given (the RNN's
// training), h~ of the step is saved there first ([N, H], rows H apart).
template <typename Real>
inline void zoneout_step(const LayerBuffers<Real>& buf, Real* y, int64_t ldy,
                         const LayerWeights<Real>& w, const LayerShape& s, int64_t k, int64_t n,
                         int64_t j0, int64_t j1, int64_t c0, int64_t c1, Real* raw_h = nullptr) {
  const Walk walk(s);
  const int64_t N = s.N, W = h_out(s), H = s.H;
  const bool on_h = zoneout_h(w, s), on_c = zoneout_c(w, s) && buf.c;
  Real* h_next = buf.h + slot(k + 1, s.training) * N * W;
  const Real* h_prev = buf.h + slot(k, s.training) * N * W;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t at = walk.at(k, b);
    if (on_h) {
      if (raw_h) copy_row(raw_h + b * W + j0, h_next + b * W + j0, j1 - j0);
      zoneout_blend(h_next + b * W, y + at * ldy, h_prev + b * W, w, s, 0, at, W, j0, j1);
    }
    if (on_c) {
      Real* c_next = buf.c + slot(k + 1, s.training) * N * H;
      const Real* c_prev = buf.c + slot(k, s.training) * N * H;
      zoneout_blend<Real>(c_next + b * H, nullptr, c_prev + b * H, w, s, 1, at, H, c0, c1);
    }
  }
}

// Before a step's backward, units j0..j1-1 of running rows: g = dh + dy (dy folded in
// here, so the cell is given none); the cell gets (1 - m) g, zone_dh keeps m g. The
// same for dc (LSTM), without dy.
// Units c0..c1-1 of dc (its width H differs from h's with a projection).
template <typename Real>
inline void zoneout_backward_before(const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                                    const LayerWeights<Real>& w, const LayerShape& s, int64_t k,
                                    int64_t n, int64_t j0, int64_t j1, int64_t c0, int64_t c1) {
  const Walk walk(s);
  const int64_t W = h_out(s), H = s.H;
  const bool on_h = zoneout_h(w, s), on_c = zoneout_c(w, s) && buf.dc;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t at = walk.at(k, b);
    for_lanes<Real>(j1 - j0, [&](int64_t jj, int64_t l) {
      const int64_t j = j0 + jj;
      V<Real> g = ld(buf.dh + b * W + j, l);
      if (dy) g += ld(dy + at * lddy + j, l);
      const V<Real> m = on_h ? zoneout_factor(w, s, 0, at, W, j, l) : splat<Real>(0);
      st(buf.zone_dh + b * W + j, m * g, l);
      st(buf.dh + b * W + j, g - m * g, l);
    });
    if (on_c)
      for_lanes<Real>(c1 - c0, [&](int64_t jj, int64_t l) {
        const int64_t j = c0 + jj;
        const V<Real> g = ld(buf.dc + b * H + j, l);
        const V<Real> m = zoneout_factor(w, s, 1, at, H, j, l);
        st(buf.zone_dc + b * H + j, m * g, l);
        st(buf.dc + b * H + j, g - m * g, l);
      });
  }
}

// After the cell's step backward: dh = (what the cell left there when keep_dh) + zone_dh,
// so that dG W_hh is then added to it; dc += zone_dc.
template <typename Real>
inline void zoneout_backward_after(const LayerBuffers<Real>& buf, const LayerWeights<Real>& w,
                                   const LayerShape& s, int64_t n, int64_t j0, int64_t j1,
                                   int64_t c0, int64_t c1, bool keep_dh) {
  const int64_t W = h_out(s), H = s.H;
  const bool on_c = zoneout_c(w, s) && buf.dc;
  for (int64_t b = 0; b < n; ++b) {
    if (keep_dh)
      add_into(buf.dh + b * W + j0, buf.zone_dh + b * W + j0, j1 - j0);
    else
      copy_row(buf.dh + b * W + j0, buf.zone_dh + b * W + j0, j1 - j0);
    if (on_c) add_into(buf.dc + b * H + c0, buf.zone_dc + b * H + c0, c1 - c0);
  }
}

// The dy a cell's backward reads: none with zoneout (zoneout_backward_before folded it in).
template <typename Real>
inline const Real* zoneout_dy(const Real* dy, const LayerWeights<Real>& w, const LayerShape& s) {
  return zoneout(w, s) ? nullptr : dy;
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
