// ONNX's options of the LSTM, GRU and RNN nodes (lstmfast.h GateOptions,
// docs/onnx.md) as the cells apply them on their ONNX path: the gates' activation
// (sigmoid or hard sigmoid) and the clip of every pre-activation of the gates and
// of the candidate, forward and backward. A cell is instantiated with and without
// this path (CellGates<Real, kOnnx>), so that torch's cells pay nothing for it.
#pragma once

#include <type_traits>

#include "runtime/kernel_unit.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

template <typename Real>
struct OnnxGates {
  bool clipped, hard_sigmoid, input_forget;
  V<Real> lo, hi, alpha, beta, zero, one;

  explicit OnnxGates(const GateOptions& o)
      : clipped(o.clip > 0),
        hard_sigmoid(o.hard_sigmoid),
        input_forget(o.input_forget),
        lo(splat<Real>(static_cast<Real>(-o.clip))),
        hi(splat<Real>(static_cast<Real>(o.clip))),
        alpha(splat<Real>(static_cast<Real>(o.hs_alpha))),
        beta(splat<Real>(static_cast<Real>(o.hs_beta))),
        zero(splat<Real>(0)),
        one(splat<Real>(1)) {}

  // a bounded to [-clip, clip] when there is a clip
  LSTMFAST_ALWAYS_INLINE V<Real> bound(V<Real> a) const {
    return clipped ? simd::vmin<Real>(hi, simd::vmax<Real>(lo, a)) : a;  // NaN stays (simd.h)
  }
  // A gate (LSTM i, f, o; GRU r, z): f in ONNX's letters.
  LSTMFAST_ALWAYS_INLINE V<Real> gate(V<Real> a) const {
    a = bound(a);
    if (hard_sigmoid) return simd::vmin<Real>(one, simd::vmax<Real>(zero, alpha * a + beta));
    return simd::vsigmoid<Real>(a);
  }
  // The candidate (LSTM g, GRU n): g in ONNX's letters, tanh.
  LSTMFAST_ALWAYS_INLINE V<Real> candidate(V<Real> a) const { return simd::vtanh(bound(a)); }
  // The gate's derivative from its value y: alpha where the hard sigmoid is not
  // flat, else sigmoid's y (1 - y). The clip's part is not in it (kept_gate_prime).
  LSTMFAST_ALWAYS_INLINE V<Real> gate_prime(V<Real> y) const {
    if (hard_sigmoid) return y > zero ? (y < one ? alpha : zero) : zero;
    return y * (one - y);
  }

  // Training with a clip keeps each gate's (and the candidate's) pre-activation a in
  // the cell's saved blocks instead of its value y. The derivative is zero where the
  // clip bounded a (|a| > clip, as the reference has it), and y cannot tell that: many
  // a near the bound round to the same y. Backward computes y again from a, bit for
  // bit as forward did. Without a clip the value is kept, as torch's cells keep it.
  //
  // What forward keeps of a gate or the candidate of value y and pre-activation a.
  LSTMFAST_ALWAYS_INLINE V<Real> keep(V<Real> y, V<Real> a) const { return clipped ? a : y; }
  // The value of a kept gate, of a kept candidate.
  LSTMFAST_ALWAYS_INLINE V<Real> kept_gate(V<Real> kept) const {
    return clipped ? gate(kept) : kept;
  }
  LSTMFAST_ALWAYS_INLINE V<Real> kept_candidate(V<Real> kept) const {
    return clipped ? candidate(kept) : kept;
  }
  // d y / d a of a kept gate (y = kept_gate(kept)) and of a kept candidate.
  LSTMFAST_ALWAYS_INLINE V<Real> kept_gate_prime(V<Real> kept, V<Real> y) const {
    return unclipped(kept, gate_prime(y));
  }
  LSTMFAST_ALWAYS_INLINE V<Real> kept_candidate_prime(V<Real> kept, V<Real> y) const {
    return unclipped(kept, one - y * y);
  }
  // d: a derivative of a pre-activation a, zeroed where the clip bounded a (by a
  // factor 0, as the reference: a NaN d stays NaN).
  LSTMFAST_ALWAYS_INLINE V<Real> unclipped(V<Real> a, V<Real> d) const {
    if (!clipped) return d;
    return d * ((a >= lo) & (a <= hi) ? one : zero);
  }
};

// A cell's gate functions: torch's (sigmoid gates, tanh candidate) or, with kOnnx,
// ONNX's options.
template <typename Real, bool kOnnx>
struct CellGates {
  OnnxGates<Real> onnx;

  explicit CellGates(const GateOptions& o) : onnx(o) {}

  LSTMFAST_ALWAYS_INLINE V<Real> gate(V<Real> a) const {
    if constexpr (kOnnx) return onnx.gate(a);
    return simd::vsigmoid<Real>(a);
  }
  LSTMFAST_ALWAYS_INLINE V<Real> candidate(V<Real> a) const {
    if constexpr (kOnnx) return onnx.candidate(a);
    return simd::vtanh(a);
  }
  LSTMFAST_ALWAYS_INLINE V<Real> gate_prime(V<Real> y) const {
    if constexpr (kOnnx) return onnx.gate_prime(y);
    return y * (splat<Real>(1) - y);
  }
  // What training keeps of a gate or the candidate, and what backward makes of it
  // (OnnxGates::keep): torch's cells keep the values.
  LSTMFAST_ALWAYS_INLINE V<Real> keep(V<Real> y, V<Real> a) const {
    if constexpr (kOnnx) return onnx.keep(y, a);
    return y;
  }
  LSTMFAST_ALWAYS_INLINE V<Real> kept_gate(V<Real> kept) const {
    if constexpr (kOnnx) return onnx.kept_gate(kept);
    return kept;
  }
  LSTMFAST_ALWAYS_INLINE V<Real> kept_candidate(V<Real> kept) const {
    if constexpr (kOnnx) return onnx.kept_candidate(kept);
    return kept;
  }
  LSTMFAST_ALWAYS_INLINE V<Real> kept_gate_prime(V<Real> kept, V<Real> y) const {
    if constexpr (kOnnx) return onnx.kept_gate_prime(kept, y);
    return gate_prime(y);
  }
  LSTMFAST_ALWAYS_INLINE V<Real> kept_candidate_prime(V<Real> kept, V<Real> y) const {
    if constexpr (kOnnx) return onnx.kept_candidate_prime(kept, y);
    return splat<Real>(1) - y * y;
  }
  // LSTM: f = 1 - i
  bool coupled() const { return kOnnx && onnx.input_forget; }
};

// run(std::bool_constant<kOnnx>()) with the path of this layer call: ONNX's when
// LayerShape::gates.onnx is set, torch's otherwise. Each cell's forward and backward
// choose their CellGates<Real, kOnnx> through it.
template <typename Run>
inline void with_gate_path(const LayerShape& s, Run&& run) {
  if (s.gates.onnx)
    run(std::true_type());
  else
    run(std::false_type());
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
