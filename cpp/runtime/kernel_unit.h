// The base of every translation unit compiled once per instruction set (the cells
// and the reduced products): vectors with partial tails, and the bookkeeping of rows,
// times and steps (lengths, reversal, state gather and scatter). Everything here
// lives in namespace lstmfast::LSTMFAST_ISA, so the copies built with different
// flags never meet at link time.
#pragma once

#ifndef LSTMFAST_ISA
#error "kernel_unit.h is for the per-ISA kernel units: compile with -DLSTMFAST_ISA=<name>"
#endif

#include <cstdint>
#include <cstring>

#include "lstmfast.h"
#include "runtime/simd.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// Nothing here calls an inline function of another namespace (std:: templates,
// LayerShape's members) other than simd.h's, whose names carry the vector type:
// a copy compiled with this unit's ISA flags could be the one the linker keeps
// for every caller.

// ---------------------------------------------------------------------------
// Vectors: full-width or partial loads and stores, chosen by the lane count n.

template <typename Real>
using V = simd::vec_t<Real>;

template <typename Real>
constexpr int64_t kWidth = simd::Vec<Real>::width;

template <typename Real>
inline V<Real> ld(const Real* p, int64_t n) {
  return n == kWidth<Real> ? simd::load<Real>(p) : simd::load_partial<Real>(p, n);
}
template <typename Real>
inline void st(Real* p, V<Real> v, int64_t n) {
  if (n == kWidth<Real>)
    simd::store<Real>(p, v);
  else
    simd::store_partial<Real>(p, v, n);
}
template <typename Real>
inline V<Real> splat(Real v) {
  return simd::broadcast<Real>(v);
}

// f(j, n) over 0..count-1 in chunks of the vector width; the last chunk may be short.
template <typename Real, typename F>
inline void for_lanes(int64_t count, F&& f) {
  int64_t j = 0;
  for (; j + kWidth<Real> <= count; j += kWidth<Real>) f(j, kWidth<Real>);
  if (j < count) f(j, count - j);
}

// out[0..n) = v rounded to bfloat16 (simd.h: round_to_bfloat16); out may be v.
// float32 only: reduced weights are.
template <typename Real>
inline void round_to_bfloat16(Real* out, const Real* v, int64_t count) {
  if constexpr (sizeof(Real) == sizeof(float)) {
    for_lanes<Real>(count, [&](int64_t j, int64_t n) {
      st(out + j, simd::round_to_bfloat16(ld(v + j, n)), n);
    });
  }
}

// ---------------------------------------------------------------------------
// Rows, times and steps (see LayerShape).

// Rows up to which small_gemm beats OpenBLAS (measured with AVX2, H = 128..512:
// 1.5-2x faster up to 4 rows with 1 or 2 threads; even at 8 rows on one thread,
// behind OpenBLAS's two threads there).
constexpr int64_t kSmallGemmRows = 4;

inline int64_t h_out(const LayerShape& s) { return s.P > 0 ? s.P : s.H; }
// Rows of x and of its projection: all T*N, or only the running ones (LayerShape::offsets).
inline int64_t x_rows(const LayerShape& s) { return s.offsets ? s.offsets[s.T] : s.T * s.N; }
inline int64_t steps_of(const LayerShape& s) { return s.lengths ? s.lengths[0] : s.T; }

struct Walk {
  const LayerShape& s;
  explicit Walk(const LayerShape& shape) : s(shape) {}

  // Always inlined: the micro-kernel's epilogues ask these of every row and block of
  // units, and a call each there cost a CTRNN's step 10%.
  LSTMFAST_ALWAYS_INLINE int64_t row(int64_t b) const { return s.rows ? s.rows[b] : b; }
  LSTMFAST_ALWAYS_INLINE int64_t length(int64_t b) const {
    return s.lengths ? s.lengths[b] : s.T;
  }
  // Time visited by sorted row b at step k.
  LSTMFAST_ALWAYS_INLINE int64_t time(int64_t k, int64_t b) const {
    return s.reverse ? length(b) - 1 - k : k;
  }
  // Index of (time, batch row) into [T, N, ...] arrays.
  LSTMFAST_ALWAYS_INLINE int64_t at(int64_t k, int64_t b) const {
    return time(k, b) * s.N + row(b);
  }
  // Row of x and of its projection for step k of sorted row b (see LayerShape::offsets).
  LSTMFAST_ALWAYS_INLINE int64_t x_row(int64_t k, int64_t b) const {
    return s.offsets ? s.offsets[time(k, b)] + b : at(k, b);
  }
  // Rows still running at step k: a prefix, since lengths are non-increasing.
  int64_t active(int64_t k) const {
    if (!s.lengths) return s.N;
    int64_t lo = 0, hi = s.N;  // first b with lengths[b] <= k
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (s.lengths[mid] > k)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  }
  // Whether step k of sorted row b is at time k of batch row b for every row,
  // i.e. step-ordered buffers are already in x's order.
  bool identity() const { return !s.reverse && !s.rows && !s.lengths; }
};

// Whether any step runs few enough rows for small_gemm (then the forward lays
// out the transposed weights it needs, once per call).
inline bool uses_small_gemm(const LayerShape& s) {
  return Walk(s).active(steps_of(s) - 1) <= kSmallGemmRows;
}

// Slot of step k in a state buffer: every step when training, else ping-pong.
inline int64_t slot(int64_t k, bool training) { return training ? k : (k & 1); }

template <typename Real>
inline void copy_row(Real* dst, const Real* src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(Real));
}
template <typename Real>
inline void zero_row(Real* dst, int64_t n) {
  std::memset(dst, 0, static_cast<size_t>(n) * sizeof(Real));
}

// state[b] = init[rows[b]] (or zeros when init is null), for b in 0..N-1.
template <typename Real>
inline void gather_state(Real* state, const Real* init, int64_t width, const Walk& walk) {
  for (int64_t b = 0; b < walk.s.N; ++b) {
    if (init)
      copy_row(state + b * width, init + walk.row(b) * width, width);
    else
      zero_row(state + b * width, width);
  }
}
// out[rows[b]] = state[b] (nothing when out is null).
template <typename Real>
inline void scatter_state(Real* out, const Real* state, int64_t width, const Walk& walk) {
  if (!out) return;
  for (int64_t b = 0; b < walk.s.N; ++b)
    copy_row(out + walk.row(b) * width, state + b * width, width);
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
