// Portable SIMD for the pointwise gate math.
//
// This header is included by translation units that are compiled once per
// instruction set (generic, AVX2+FMA, AVX-512): the vector width follows the
// flags of the including unit, so the same source becomes three kernels and
// dispatch.cpp picks one at run time. It uses GCC/Clang vector extensions rather
// than intrinsics so one body serves every width and architecture.
//
// Accuracy: vexp/vsigmoid/vtanh follow Cephes (expf/exp, tanhf/tanh): a few ulps
// in float32 and float64, no lookup tables. Inputs are clamped to the range where
// the result is finite; NaN goes through: every clamp takes x as minps/maxps's second
// operand, the one they return when a lane is NaN (vmin below), so that a NaN in
// the input, the state or a weight reaches the output as it does in the reference
// and in torch (a model whose weights diverged must not give finite results).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX__)
#include <immintrin.h>
#endif

// Every unit that includes this header gets its own copy of these inline
// functions; a per-width inline namespace gives each copy its own symbol names,
// so the linker can never merge an AVX-512 body into the portable build (an ODR
// violation that would crash on older CPUs), nor a body built with an extension
// (VNNI, BF16) into the build without it.
#if defined(__AMX_TILE__)
#define LSTMFAST_SIMD_NAMESPACE width64_amx
#elif defined(__AVX512BF16__)
#define LSTMFAST_SIMD_NAMESPACE width64_bf16
#elif defined(__AVX512VNNI__)
#define LSTMFAST_SIMD_NAMESPACE width64_vnni
#elif defined(__AVX512F__)
#define LSTMFAST_SIMD_NAMESPACE width64
#elif defined(__AVXVNNI__)
#define LSTMFAST_SIMD_NAMESPACE width32_vnni
#elif defined(__AVX__)
#define LSTMFAST_SIMD_NAMESPACE width32
#else
#define LSTMFAST_SIMD_NAMESPACE width16
#endif

// The activations sit in the innermost epilogues: a call there would spill every
// live vector register (all are caller-saved), so they are always inlined. GCC
// declined to inline vtanh on its own (measured: 7% of an LSTM N=1 step in the call).
#if defined(__GNUC__) || defined(__clang__)
#define LSTMFAST_ALWAYS_INLINE inline __attribute__((always_inline))
#define LSTMFAST_LAMBDA_INLINE __attribute__((always_inline))  // after a lambda's parameters
#else
#define LSTMFAST_ALWAYS_INLINE inline
#define LSTMFAST_LAMBDA_INLINE
#endif

namespace lstmfast {
namespace simd {
inline namespace LSTMFAST_SIMD_NAMESPACE {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T>
struct IntOf;
template <>
struct IntOf<float> {
  using type = int32_t;
};
template <>
struct IntOf<double> {
  using type = int64_t;
};

template <typename T>
struct Vec {
  static constexpr int width = kVectorBytes / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(kVectorBytes)));
  typedef typename IntOf<T>::type int_type __attribute__((vector_size(kVectorBytes)));
};

// Unsigned integer lanes as wide as T's (for integer hashes: zoneout_keep).
template <typename T>
struct UintOf;
template <>
struct UintOf<float> {
  typedef uint32_t lane;
  typedef uint32_t vec __attribute__((vector_size(kVectorBytes)));
};
template <>
struct UintOf<double> {
  typedef uint64_t lane;
  typedef uint64_t vec __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
using vec_t = typename Vec<T>::type;
template <typename T>
using ivec_t = typename Vec<T>::int_type;

// Every lane set to v. "v - 0" is exactly v for every v, so it compiles to one
// broadcast (from memory when v was just loaded); "vec_t<T>{} + v" would keep the
// addition (0 + -0 is +0), an add and a shuffle per call in the innermost loops.
template <typename T>
inline vec_t<T> broadcast(T v) {
  return v - vec_t<T>{};
}

// Transposes the width x width block held in rows[0..width-1], in place: at each
// stage (blocks of b = width/2 .. 1 lanes) the off-diagonal b x b blocks of every
// 2b x 2b block swap, two rows at a time, each a two-source shuffle with constant
// lanes. log2(width) stages of width shuffles, where a lane-by-lane copy moves
// width^2 scalars (the packing of W_hh and W_ih per call: 12% of an LSTM N=1
// H=128 inference call, one thread, AVX-512).
namespace detail {
// Lanes L of a (0..width-1) and c (width..2 width-1): Clang's builtin, or GCC's
// (__builtin_shufflevector came to GCC only in version 12).
template <typename T, int... L>
LSTMFAST_ALWAYS_INLINE vec_t<T> shuffle2(vec_t<T> a, vec_t<T> c) {
#if defined(__clang__)
  return __builtin_shufflevector(a, c, L...);
#else
  return __builtin_shuffle(a, c, ivec_t<T>{L...});
#endif
}

template <typename T, int B, int... J>
LSTMFAST_ALWAYS_INLINE vec_t<T> keep_even_blocks(vec_t<T> a, vec_t<T> c,
                                                 std::integer_sequence<int, J...>) {
  constexpr int W = Vec<T>::width;
  return shuffle2<T, ((J & B) ? W + J - B : J)...>(a, c);
}
template <typename T, int B, int... J>
LSTMFAST_ALWAYS_INLINE vec_t<T> keep_odd_blocks(vec_t<T> a, vec_t<T> c,
                                                std::integer_sequence<int, J...>) {
  constexpr int W = Vec<T>::width;
  return shuffle2<T, ((J & B) ? W + J : J + B)...>(a, c);
}
template <typename T, int B>
LSTMFAST_ALWAYS_INLINE void transpose_stage(vec_t<T>* rows) {
  constexpr int W = Vec<T>::width;
  if constexpr (B >= 1) {
    for (int i = 0; i < W; ++i)
      if ((i & B) == 0) {
        const vec_t<T> a = rows[i], c = rows[i + B];
        rows[i] = keep_even_blocks<T, B>(a, c, std::make_integer_sequence<int, W>{});
        rows[i + B] = keep_odd_blocks<T, B>(a, c, std::make_integer_sequence<int, W>{});
      }
    transpose_stage<T, B / 2>(rows);
  }
}
}  // namespace detail

template <typename T>
LSTMFAST_ALWAYS_INLINE void transpose(vec_t<T> (&rows)[Vec<T>::width]) {
  detail::transpose_stage<T, Vec<T>::width / 2>(rows);
}

namespace detail {
template <typename T, int B>
LSTMFAST_ALWAYS_INLINE void lane_sums_stage(vec_t<T>* v) {
  constexpr int W = Vec<T>::width;
  if constexpr (B >= 1) {
    for (int i = 0; i < B; ++i) {
      const vec_t<T> a = v[i], c = v[i + B];
      v[i] = keep_even_blocks<T, B>(a, c, std::make_integer_sequence<int, W>{}) +
             keep_odd_blocks<T, B>(a, c, std::make_integer_sequence<int, W>{});
    }
    lane_sums_stage<T, B / 2>(v);
  }
}
}  // namespace detail

// The sums of the lanes of width vectors at once: lane j of the result is the sum
// of v[j]'s lanes (v is overwritten). Each stage halves the vectors: lanes l and
// l + b of a pair are added, one vector's in the low b-blocks and the other's in
// the high ones, so every sum is added in the order of a halving tree (lane l + W/2
// into l, then l + W/4, ...), the order of one vector's sum stored and folded. Two
// shuffles and an add per vector, where a vector's sum alone costs about W
// dependent steps (a dot product per row of a weight: small_products.h).
template <typename T>
LSTMFAST_ALWAYS_INLINE vec_t<T> lane_sums(vec_t<T> (&v)[Vec<T>::width]) {
  detail::lane_sums_stage<T, Vec<T>::width / 2>(v);
  return v[0];
}

// Unaligned loads and stores; memcpy compiles to one vector move.
template <typename T>
inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// The first n (< width) lanes; the others are zero.
template <typename T>
inline vec_t<T> load_partial(const T* p, int64_t n) {
  vec_t<T> v = vec_t<T>{};
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(T));
  return v;
}
template <typename T>
inline void store_partial(T* p, vec_t<T> v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(T));
}

// a < b ? a : b lane by lane (vmax: a > b). That is exactly what minps/maxps do (the
// second operand when either is NaN or both are zeros), but GCC writes the select
// out as a compare and a blend with AVX and AVX-512: two instructions where one
// does, in every clamp of the activations. Results are bit-identical either way.
// (The AVX-512 forms are the masked ones with every lane kept: GCC 12 warns of the
// unmasked ones' undefined pass-through value.)
namespace detail {
template <typename To, typename From>
LSTMFAST_ALWAYS_INLINE To as(From v) {
  return reinterpret_cast<To>(v);
}
}  // namespace detail

template <typename T>
inline vec_t<T> vmin(vec_t<T> a, vec_t<T> b) {
  using detail::as;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4)
    return as<vec_t<T>>(_mm512_mask_min_ps(as<__m512>(a), 0xFFFF, as<__m512>(a), as<__m512>(b)));
  else
    return as<vec_t<T>>(_mm512_mask_min_pd(as<__m512d>(a), 0xFF, as<__m512d>(a), as<__m512d>(b)));
#elif defined(__AVX__)
  if constexpr (sizeof(T) == 4)
    return as<vec_t<T>>(_mm256_min_ps(as<__m256>(a), as<__m256>(b)));
  else
    return as<vec_t<T>>(_mm256_min_pd(as<__m256d>(a), as<__m256d>(b)));
#else
  return a < b ? a : b;
#endif
}
template <typename T>
inline vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  using detail::as;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4)
    return as<vec_t<T>>(_mm512_mask_max_ps(as<__m512>(a), 0xFFFF, as<__m512>(a), as<__m512>(b)));
  else
    return as<vec_t<T>>(_mm512_mask_max_pd(as<__m512d>(a), 0xFF, as<__m512d>(a), as<__m512d>(b)));
#elif defined(__AVX__)
  if constexpr (sizeof(T) == 4)
    return as<vec_t<T>>(_mm256_max_ps(as<__m256>(a), as<__m256>(b)));
  else
    return as<vec_t<T>>(_mm256_max_pd(as<__m256d>(a), as<__m256d>(b)));
#else
  return a > b ? a : b;
#endif
}

namespace detail {

template <typename T>
inline vec_t<T> bitcast_to_float(ivec_t<T> i) {
  vec_t<T> v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

template <typename T>
inline ivec_t<T> bitcast_to_int(vec_t<T> v) {
  ivec_t<T> i;
  std::memcpy(&i, &v, sizeof(i));
  return i;
}

// x rounded to the nearest integer, as a float (fn) and as an integer (n), for
// |x| < 2^22 (float) or 2^51 (double): adding 1.5 * 2^mantissa-bits pushes the
// fraction out of the mantissa (rounded to nearest by the FPU), so the rounded
// value is read back by one subtraction, and the integer from the low bits. Two
// instructions where a convert, a convert back and a fix-up took five.
template <typename T>
inline void round_to_int(vec_t<T> x, vec_t<T>& fn, ivec_t<T>& n) {
  constexpr T magic = sizeof(T) == 4 ? T(12582912.0) : T(6755399441055744.0);
  const vec_t<T> shifted = x + magic;
  fn = shifted - magic;
  n = bitcast_to_int<T>(shifted) - bitcast_to_int<T>(vec_t<T>{} + magic);
}

// 2^n for integer n in the normal exponent range.
template <typename T>
inline vec_t<T> pow2(ivec_t<T> n);
template <>
inline vec_t<float> pow2<float>(ivec_t<float> n) {
  return bitcast_to_float<float>((n + 127) << 23);
}
template <>
inline vec_t<double> pow2<double>(ivec_t<double> n) {
  return bitcast_to_float<double>((n + 1023) << 52);
}

}  // namespace detail

namespace detail {
// e^r - 1 for x = n ln2 + r, |r| <= ln2/2 (Cephes expf's reduction and degree-6
// polynomial, e^r = 1 + r + r^2 P(r)), x within the range where 2^n is a normal float.
// vexp scales 1 + it by 2^n; vtanh keeps it apart from the 1, near 0 where they cancel.
LSTMFAST_ALWAYS_INLINE vec_t<float> expm1_reduced(vec_t<float> x, ivec_t<float>& n) {
  using V = vec_t<float>;
  V fn;
  round_to_int<float>(x * 1.44269504088896341f, fn, n);
  // ln2 split in two so n*ln2_hi is exact.
  V r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  V p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r;
}
}  // namespace detail

// e^x (Cephes expf).
LSTMFAST_ALWAYS_INLINE vec_t<float> vexp(vec_t<float> x) {
  x = vmin<float>(broadcast(88.3f), vmax<float>(broadcast(-87.3f), x));
  ivec_t<float> n;
  const vec_t<float> y = detail::expm1_reduced(x, n) + 1.0f;
  return y * detail::pow2<float>(n);
}

// e^x. Cephes exp: x = n ln2 + r, then a Pade form e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)).
LSTMFAST_ALWAYS_INLINE vec_t<double> vexp(vec_t<double> x) {
  using V = vec_t<double>;
  x = vmin<double>(broadcast(709.0), vmax<double>(broadcast(-708.0), x));
  V fn;
  ivec_t<double> n;
  detail::round_to_int<double>(x * 1.4426950408889634073599, fn, n);
  V r = x - fn * 6.93145751953125e-1;
  r = r - fn * 1.42860682030941723212e-6;
  const V rr = r * r;
  V p = broadcast(1.26177193074810590878e-4);
  p = p * rr + 3.02994407707441961300e-2;
  p = p * rr + 9.99999999999999999910e-1;
  p = p * r;
  V q = broadcast(3.00198505138664455042e-6);
  q = q * rr + 2.52448340349684104192e-3;
  q = q * rr + 2.27265548208155028766e-1;
  q = q * rr + 2.00000000000000000009e0;
  const V y = (p / (q - p)) * 2.0 + 1.0;
  return y * detail::pow2<double>(n);
}

template <typename T>
LSTMFAST_ALWAYS_INLINE vec_t<T> vsigmoid(vec_t<T> x) {
  return T(1) / (T(1) + vexp(-x));
}

// max(0, x), NaN kept (x second: see vmin), as torch's relu.
template <typename T>
LSTMFAST_ALWAYS_INLINE vec_t<T> vrelu(vec_t<T> x) {
  return vmax<T>(vec_t<T>{}, x);
}

// g * relu'(v) from a = relu(v): 1 where a > 0 (0 at 0, as torch) and where a is NaN
// (torch's relu passes the gradient there), else 0. A factor, as the reference has
// it, not a select: a NaN g stays NaN.
template <typename T>
LSTMFAST_ALWAYS_INLINE vec_t<T> times_relu_prime(vec_t<T> g, vec_t<T> a) {
  return g * ((a > T(0)) | (a != a) ? vec_t<T>{} + T(1) : vec_t<T>{});
}

// tanh(x) = e / (e + 2) with e = e^2x - 1, in float32. e comes from vexp's reduction,
// 2x = n ln2 + r: e = 2^n (e^r - 1) + (2^n - 1), where e^r - 1 = r + r^2 P(r) keeps
// its relative accuracy near r = 0 (n = 0 there, so small x lose nothing to
// cancellation) and 2^n - 1 is exact for the n that matter. Beyond |x| = 9 tanh is
// +-1 in float32. One exponential and one division, and no select between a small-x
// and a large-x form, each computed in full (measured: 2.44 ulps at most).
LSTMFAST_ALWAYS_INLINE vec_t<float> vtanh(vec_t<float> x) {
  using V = vec_t<float>;
  const V two_x = vmin<float>(broadcast(9.0f), vmax<float>(broadcast(-9.0f), x)) * 2.0f;
  ivec_t<float> n;
  const V expm1_r = detail::expm1_reduced(two_x, n);
  const V scale = detail::pow2<float>(n);
  const V e = expm1_r * scale + (scale - 1.0f);
  return e / (e + 2.0f);
}

// tanh in float64 (Cephes tanh): near zero a rational form keeps the relative error
// small where 1 - 2/(e^2x + 1) would cancel; beyond 0.625 the exponential form,
// computed on |x| and given x's sign back.
LSTMFAST_ALWAYS_INLINE vec_t<double> vtanh(vec_t<double> x) {
  using V = vec_t<double>;
  const V ax = vmax<double>(x, -x);
  const V z = x * x;
  V p = broadcast(-9.64399179425052238628e-1);
  p = p * z - 9.92877231001918586564e1;
  p = p * z - 1.61468768441708447952e3;
  V q = z + 1.12811678491632931402e2;
  q = q * z + 2.23548839060100448583e3;
  q = q * z + 4.84406305325125486048e3;
  const V small = x + x * z * (p / q);
  const V e = vexp(ax * 2.0);
  V large = 1.0 - 2.0 / (e + 1.0);
  large = x < 0.0 ? -large : large;
  return ax < 0.625 ? small : large;
}

// v rounded to bfloat16 (its upper 16 bits, nearest even) and widened back to
// float32: the value a bfloat16 product multiplies (reference.to_bfloat16_bits).
// NaN stays NaN.
inline vec_t<float> round_to_bfloat16(vec_t<float> v) {
  using I = ivec_t<float>;
  const I bits = detail::bitcast_to_int<float>(v);
  const I rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & static_cast<int32_t>(0xFFFF0000u);
  return v != v ? v : detail::bitcast_to_float<float>(rounded);
}

// Whole-array forms, for tests and for simple callers.
template <typename T, typename F>
inline void map_array(const T* x, T* y, int64_t n, F f) {
  constexpr int W = Vec<T>::width;
  int64_t i = 0;
  for (; i + W <= n; i += W) store<T>(y + i, f(load<T>(x + i)));
  if (i < n) store_partial<T>(y + i, f(load_partial<T>(x + i, n - i)), n - i);
}
template <typename T>
inline void exp_array(const T* x, T* y, int64_t n) {
  map_array<T>(x, y, n, [](vec_t<T> v) { return vexp(v); });
}
template <typename T>
inline void sigmoid_array(const T* x, T* y, int64_t n) {
  map_array<T>(x, y, n, [](vec_t<T> v) { return vsigmoid<T>(v); });
}
template <typename T>
inline void tanh_array(const T* x, T* y, int64_t n) {
  map_array<T>(x, y, n, [](vec_t<T> v) { return vtanh(v); });
}

}  // inline namespace LSTMFAST_SIMD_NAMESPACE
}  // namespace simd
}  // namespace lstmfast
