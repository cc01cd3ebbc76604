// The reduced-precision products (reduced_products.h), compiled once per
// instruction set: the portable loops, AVX2, AVX-VNNI (AVX2 with int8 on the 256-bit
// vpdpbusd), AVX-512 (int8 on vpmaddubsw; bfloat16 on AVX2's tile), AVX512_VNNI for
// int8 and AVX512_BF16 for bfloat16.
//
// Every panel kernel computes a register tile of R rows x P panels of 16 outputs,
// k innermost: per step of k it loads one vector of each panel and broadcasts one
// group of k of each row, so each weight loaded serves R rows and each
// broadcast P panels. Panels are read in order; at batch 1 a step streams W once,
// in a quarter (int8) or half (bfloat16) of the bytes of float32.
#ifndef LSTMFAST_ISA
#error "reduced_products.cpp is compiled once per instruction set: -DLSTMFAST_ISA=<name>"
#endif

#include "products/reduced_products.h"

#include <cstring>
#include <type_traits>

#include "products/row_tiles.h"
#include "runtime/simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

using V = simd::vec_t<float>;
using VI = simd::ivec_t<float>;
constexpr int64_t kLanes = simd::Vec<float>::width;
typedef uint8_t VBytes __attribute__((vector_size(kLanes)));

constexpr int64_t kActivationLevels = 127;

// Blocks of a product, so that what a tile reads comes from cache: the panels
// of a block of W (at most kPanelBlockBytes of it, L2) pass over a block of
// kRowBlock rows of A (64 rows of K = 1024 are 64 KB of int8 activations). Every
// row tile reads all the panels of the block: with all of W at once, a W larger
// than L2 (the input projection of LSTM I=H=1024: 4 MB of int8) came from L3
// for every 6 rows (measured with VNNI, n = 6400, K = 512, M = 2048: 167 GMAC/s,
// against 199 at n = 64).
constexpr int64_t kRowBlock = 64;
#if defined(__AMX_TILE__)
// Rows from which a product runs on AMX's tiles, below it on AVX-512's: a few int8
// rows stream their weights as fast through vpdpbusd (measured, LSTM and GRU, T = 100,
// one thread, AMX against AVX512_VNNI: 0.93-0.95x at N = 1, I = H = 128; 0.89-0.91x at
// N = 2; 1.16-1.21x at N = 4, I = H = 256); bfloat16 has no such rows, as vdpbf16ps
// is slow (1.6-1.7x on AMX at N = 1).
constexpr int64_t kAmxMinInt8Rows = 4, kAmxMinBf16Rows = 1;
#endif
constexpr int64_t kPanelBlockBytes = 256 * 1024;

inline V load_lanes(const float* p, int64_t n) {
  return n == kLanes ? simd::load<float>(p) : simd::load_partial<float>(p, n);
}

// x rounded to the nearest integer, ties to even, for |x| < 2^22: the fraction is
// pushed out of the mantissa by 1.5 * 2^23 (simd.h: round_to_int). Larger values
// come out within 1 of it, which the clamp to 0..127 below makes the same.
inline V round_even(V x) {
  const V magic = simd::broadcast(12582912.0f);
  return (x + magic) - magic;
}

// int8: A[r, k] ~ scale[r] * (q[r, k] - zero[r]) with q in 0..127 and the range
// widened to include 0, so that 0 is exact (rows of zeros, ReLU outputs);
// q[r, K:K_padded] = 0. The same arithmetic as reference.quantize_activations: a
// division per value (not a multiplication by 1 / scale, which rounds otherwise).
// A row holding a NaN gets the scale NaN: every output of its product is NaN, as
// in float arithmetic, where the NaN would reach every sum of the row.
void quantize_rows(const ActivationScratch& act, const float* A, int64_t lda, const ReducedMatrix& W,
                   int64_t r0, int64_t r1) {
  const int64_t K = W.K, ldq = W.K_padded;
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = A + r * lda;
    uint8_t* q = act.q + r * ldq;
    V lo_lanes = V{}, hi_lanes = V{};
    VI nan_lanes = VI{};
    for (int64_t k = 0; k < K; k += kLanes) {  // NaN is passed over: comparisons with it fail
      const V v = load_lanes(a + k, K - k < kLanes ? K - k : kLanes);
      lo_lanes = v < lo_lanes ? v : lo_lanes;
      hi_lanes = v > hi_lanes ? v : hi_lanes;
      nan_lanes |= v != v;
    }
    float lo = 0.0f, hi = 0.0f;
    bool has_nan = false;
    for (int64_t l = 0; l < kLanes; ++l) {
      lo = lo_lanes[l] < lo ? lo_lanes[l] : lo;
      hi = hi_lanes[l] > hi ? hi_lanes[l] : hi;
      has_nan = has_nan || nan_lanes[l] != 0;
    }
    float s = (hi - lo) / static_cast<float>(kActivationLevels);
    if (!(s > 0.0f) || !(s < 3.0e38f)) s = 1.0f;  // all zeros, or not finite: garbage in, no UB
    float z = __builtin_nearbyintf(-lo / s);
    z = z <= 127.0f ? z : 127.0f;  // only when s was reset above: no int overflow below
    const V sv = simd::broadcast(s), zv = simd::broadcast(z);
    const V zero_v = V{}, top = simd::broadcast(127.0f);
    for (int64_t k = 0; k < K; k += kLanes) {
      const int64_t n = K - k < kLanes ? K - k : kLanes;
      V v = round_even(load_lanes(a + k, n) / sv) + zv;
      v = v >= zero_v ? v : zero_v;  // NaN goes to 0
      v = v <= top ? v : top;
      const VBytes bytes = __builtin_convertvector(__builtin_convertvector(v, VI), VBytes);
      std::memcpy(q + k, &bytes, static_cast<size_t>(n));
    }
    if (ldq > K) std::memset(q + K, 0, static_cast<size_t>(ldq - K));
    act.scale[r] = has_nan ? __builtin_nanf("") : s;
    act.zero[r] = static_cast<int32_t>(z);
  }
}

// bfloat16: the upper 16 bits of float32 rounded to nearest even (NaN stays NaN:
// reference.to_bfloat16_bits);
// act.bf16[r, K:K_padded] = 0.
void round_rows_to_bf16(const ActivationScratch& act, const float* A, int64_t lda,
                        const ReducedMatrix& W, int64_t r0, int64_t r1) {
  const int64_t K = W.K, ld = W.K_padded;
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = A + r * lda;
    uint16_t* out = act.bf16 + r * ld;
    int64_t k = 0;
#if defined(__AVX512BF16__)
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + k)));
#endif
    for (; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, a + k, 4);
      out[k] = a[k] != a[k] ? static_cast<uint16_t>(0x7FC0)
                            : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }
    for (; k < ld; ++k) out[k] = 0;
  }
}

void prepare_rows(const ActivationScratch& act, const float* A, int64_t lda, const ReducedMatrix& W,
                  int64_t r0, int64_t r1) {
  if (W.precision == Precision::Int8)
    quantize_rows(act, A, lda, W, r0, r1);
  else
    round_rows_to_bf16(act, A, lda, W, r0, r1);
}

// What a tile needs of one product besides its rows and panels.
struct Tile {
  int64_t groups;        // int8: K_padded / 4; bfloat16: K_padded / 2
  int64_t panel_stride;  // elements (int8 bytes, bfloat16 values) from one panel to the next
  int64_t lda;           // prepared rows' stride, elements
};

// Columns of panel p of a tile whose first output is column m0 of W: 0..16.
inline int64_t panel_columns(const ReducedMatrix& W, int64_t m0, int p) {
  const int64_t left = W.M - m0 - 16 * p;
  return left <= 0 ? 0 : left < 16 ? left : 16;
}

inline void store_columns(float* c, const float* out, int64_t columns) {
  for (int64_t j = 0; j < columns; ++j) c[j] = out[j];
}

// ---------------------------------------------------------------------------
// int8 tiles

#if defined(__AVX512BW__)

// acc + the four u8 x s8 products of each 32-bit lane of a (u8) and w (s8), in int32.
#if defined(__AVX512VNNI__)
// GCC 12 copies every accumulator of a tile to another register around each
// vpdpbusd it emits for the intrinsic (66 moves for 24 vpdpbusd in the 6 x 4 tile);
// the instruction written out keeps each sum in its register.
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i w) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, a, w);
#endif
}
#else
// Without VNNI (AVX-512 before Cascade Lake): vpmaddubsw sums pairs of products in
// int16 (exact for 7-bit activations, as AVX2's), vpmaddwd the pairs in int32. The
// same lanes and the same sums as vpdpbusd, in three instructions instead of one.
// (This build had run AVX2's tile, whose 6 x 4 x 2 accumulators of 256 bits do not
// fit 32 registers: every sum went through memory.)
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i w) {
  const __m512i ones = _mm512_set1_epi16(1);
#if defined(__GNUC__) && !defined(__clang__)
  __m512i pairs;  // written out as vpdpbusd above: with the intrinsics GCC 12 kept the sums in memory
  asm("vpmaddubsw %[w], %[a], %[t]\n\t"
      "vpmaddwd %[ones], %[t], %[t]\n\t"
      "vpaddd %[t], %[acc], %[acc]"
      : [acc] "+v"(acc), [t] "=&v"(pairs)
      : [a] "v"(a), [w] "v"(w), [ones] "v"(ones));
  return acc;
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, w), ones));
#endif
}
#endif

// The exact int32 sums of R rows x P panels (the first output m0 of W) back in
// float32, into C (rows ldc apart, output m at C[m]): each row's zero point taken
// out with W's row sums, then the row's and the output's scales (store_int8_row: one
// row of one panel, keep its columns).
inline void store_int8_row(float* c, __mmask16 keep, __m512i acc, float row_scale,
                           int32_t row_zero, __m512i row_sums, __m512 wscale) {
  const __m512i exact = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(row_zero), row_sums));
  const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(row_scale), wscale);
  // maskz: GCC 12 warns that _mm512_cvtepi32_ps reads an undefined register
  _mm512_mask_storeu_ps(c, keep, _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, exact), scales));
}

template <int R, int P>
inline void store_int8_sums(float* C, int64_t ldc, const __m512i (&acc)[R][P],
                            const float* row_scale, const int32_t* row_zero,
                            const ReducedMatrix& W, int64_t m0) {
  for (int p = 0; p < P; ++p) {
    const int64_t columns = panel_columns(W, m0, p);
    const __mmask16 keep = static_cast<__mmask16>((1u << columns) - 1);
    const __m512i sums = _mm512_loadu_si512(W.row_sum + m0 + 16 * p);
    const __m512 wscale = _mm512_loadu_ps(W.scale + m0 + 16 * p);
    for (int r = 0; r < R; ++r)
      store_int8_row(C + r * ldc + m0 + 16 * p, keep, acc[r][p], row_scale[r], row_zero[r], sums, wscale);
  }
}

// The four u8 x s8 products of a 32-bit lane summed into its int32. The weights of
// a group are loaded first and each row's broadcast used at once: R x P
// accumulators, P weights, one broadcast (and without VNNI a product and the ones)
// stay within the 32 registers.
template <int R, int P>
inline void int8_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  const int8_t* w = W.q + panel * t.panel_stride;
  const uint8_t* q = act.q + b * t.lda;
  __m512i acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t g = 0; g < t.groups; ++g) {
    __m512i wv[P];
    for (int p = 0; p < P; ++p) wv[p] = _mm512_loadu_si512(w + p * t.panel_stride + g * 64);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * t.lda + g * 4, 4);
      const __m512i a = _mm512_set1_epi32(four);
      for (int p = 0; p < P; ++p) acc[r][p] = dpbusd(acc[r][p], a, wv[p]);
    }
  }
  store_int8_sums<R, P>(C, ldc, acc, act.scale + b, act.zero + b, W, panel * 16);
}

#elif defined(__AVX2__)

// The exact int32 sums of R rows x P panels, each panel two vectors of 8 outputs,
// back in float32 as store_int8_sums above.
template <int R, int P>
inline void store_int8_sums(float* C, int64_t ldc, const __m256i (&acc)[R][P][2],
                            const float* row_scale, const int32_t* row_zero,
                            const ReducedMatrix& W, int64_t m0) {
  for (int p = 0; p < P; ++p) {
    const int64_t columns = panel_columns(W, m0, p);
    for (int r = 0; r < R; ++r) {
      alignas(32) float out[16];
      float* c = C + r * ldc + m0 + 16 * p;
      for (int v = 0; v < 2; ++v) {
        const int64_t m = m0 + 16 * p + 8 * v;
        const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W.row_sum + m));
        const __m256i exact = _mm256_sub_epi32(
            acc[r][p][v], _mm256_mullo_epi32(_mm256_set1_epi32(row_zero[r]), sums));
        const __m256 scales = _mm256_mul_ps(_mm256_set1_ps(row_scale[r]), _mm256_loadu_ps(W.scale + m));
        const __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), scales);
        if (columns == 16)
          _mm256_storeu_ps(c + 8 * v, value);
        else
          _mm256_store_ps(out + 8 * v, value);
      }
      if (columns < 16) store_columns(c, out, columns);
    }
  }
}

#if defined(__AVXVNNI__)

// AVX-VNNI (Alder Lake and later, Sierra Forest; Sapphire Rapids and Zen 5 have it
// beside AVX-512): vpdpbusd on 256 bits in the VEX encoding, the four u8 x s8
// products of a lane summed into its int32, the same sums as AVX2's below in one
// instruction instead of three. A tile holds 12 sums (6 rows of a panel; fewer rows,
// more panels), enough to cover the instruction's latency, in the 16 registers.
// w from a register or straight from memory ("xm"), as the tile below has room.
inline __m256i dpbusd(__m256i acc, __m256i a, __m256i w) {
#if defined(__GNUC__) && !defined(__clang__)
  // Written out, as the 512-bit one above: GCC copies the sums around the intrinsic.
  // {vex} (%{ %} in a template): the assembler would otherwise encode the AVX512_VNNI form.
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "xm"(w));
  return acc;
#else
  return _mm256_dpbusd_avx_epi32(acc, a, w);
#endif
}

template <int R, int P>
inline void int8_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  const int8_t* w = W.q + panel * t.panel_stride;
  const uint8_t* q = act.q + b * t.lda;
  // acc[r][2 p + v]: outputs 8 v .. 8 v + 7 of panel p. Two dimensions: with the
  // [R][P][2] of the store GCC 12 kept a copy of every sum on the stack, a store per
  // vpdpbusd.
  __m256i acc[R][2 * P];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2 * P; ++j) acc[r][j] = _mm256_setzero_si256();
  // The weights of a group in registers where they fit beside the sums and a
  // broadcast, else operands from memory (loaded again for each row).
  constexpr bool kWeightsInRegisters = R * 2 * P + 2 * P + 1 <= 16;
  auto weights = [&](int64_t g, int j) LSTMFAST_LAMBDA_INLINE {
    return _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(w + (j / 2) * t.panel_stride + g * 64 + (j % 2) * 32));
  };
  for (int64_t g = 0; g < t.groups; ++g) {
    __m256i wv[2 * P];
    if constexpr (kWeightsInRegisters)
      for (int j = 0; j < 2 * P; ++j) wv[j] = weights(g, j);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * t.lda + g * 4, 4);
      const __m256i a = _mm256_set1_epi32(four);
      for (int j = 0; j < 2 * P; ++j)
        acc[r][j] = dpbusd(acc[r][j], a, kWeightsInRegisters ? wv[j] : weights(g, j));
    }
  }
  __m256i sums[R][P][2];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2 * P; ++j) sums[r][j / 2][j % 2] = acc[r][j];
  store_int8_sums<R, P>(C, ldc, sums, act.scale + b, act.zero + b, W, panel * 16);
}

#else

// vpmaddubsw sums pairs of u8 x s8 products in int16 (exact: activations are 7-bit),
// vpmaddwd the pairs in int32. Two groups of 4 k per pass, summed apart before they
// join the row's sums: the chain of adds into each accumulator is then half as long
// (measured with AVX2, R = 4, P = 1, K = 512: 42 GMAC/s one group per pass, 58-76 two).
template <int R, int P>
inline void int8_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* w = W.q + panel * t.panel_stride;
  const uint8_t* q = act.q + b * t.lda;
  auto weights = [&](int p, int64_t g, int half) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * t.panel_stride + g * 64 + half * 32));
  };
  auto activations = [&](int r, int64_t g) {
    int32_t four;
    std::memcpy(&four, q + r * t.lda + g * 4, 4);
    return _mm256_set1_epi32(four);
  };
  auto products = [&](__m256i a, __m256i wv) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, wv), ones);
  };
  __m256i acc[R][P][2];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_si256();
  int64_t g = 0;
  for (; g + 2 <= t.groups; g += 2)
    for (int p = 0; p < P; ++p) {
      const __m256i w00 = weights(p, g, 0), w01 = weights(p, g, 1);
      const __m256i w10 = weights(p, g + 1, 0), w11 = weights(p, g + 1, 1);
      for (int r = 0; r < R; ++r) {
        const __m256i a0 = activations(r, g), a1 = activations(r, g + 1);
        acc[r][p][0] = _mm256_add_epi32(acc[r][p][0], _mm256_add_epi32(products(a0, w00), products(a1, w10)));
        acc[r][p][1] = _mm256_add_epi32(acc[r][p][1], _mm256_add_epi32(products(a0, w01), products(a1, w11)));
      }
    }
  if (g < t.groups)
    for (int p = 0; p < P; ++p) {
      const __m256i w0 = weights(p, g, 0), w1 = weights(p, g, 1);
      for (int r = 0; r < R; ++r) {
        const __m256i a = activations(r, g);
        acc[r][p][0] = _mm256_add_epi32(acc[r][p][0], products(a, w0));
        acc[r][p][1] = _mm256_add_epi32(acc[r][p][1], products(a, w1));
      }
    }
  store_int8_sums<R, P>(C, ldc, acc, act.scale + b, act.zero + b, W, panel * 16);
}

#endif

#else  // portable: the same integer sums, one lane at a time

template <int R, int P>
inline void int8_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  for (int p = 0; p < P; ++p) {
    const int8_t* w = W.q + (panel + p) * t.panel_stride;
    const int64_t m0 = (panel + p) * 16, columns = panel_columns(W, panel * 16, p);
    for (int r = 0; r < R; ++r) {
      int32_t acc[16] = {};
      for (int64_t g = 0; g < t.groups; ++g) {
        const uint8_t* a = act.q + (b + r) * t.lda + g * 4;
        const int8_t* wg = w + g * 64;
        for (int j = 0; j < 16; ++j)
          acc[j] += a[0] * wg[4 * j] + a[1] * wg[4 * j + 1] + a[2] * wg[4 * j + 2] + a[3] * wg[4 * j + 3];
      }
      for (int64_t j = 0; j < columns; ++j)
        C[r * ldc + m0 + j] = static_cast<float>(acc[j] - act.zero[b + r] * W.row_sum[m0 + j]) *
                              (act.scale[b + r] * W.scale[m0 + j]);
    }
  }
}

#endif

// ---------------------------------------------------------------------------
// bfloat16 tiles: each 32-bit lane of a panel holds the weights of k and k + 1 of
// one output, each 32-bit value of a prepared row the activations of k and k + 1.

#if defined(__AVX512BF16__)

// acc + the two products of bfloat16 pairs in each 32-bit lane of a and w, in float32
// (written out for GCC, as dpbusd above).
inline __m512 dpbf16(__m512 acc, __m512i a, __m512i w) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
  return acc;
#else
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w);
#endif
}

// vdpbf16ps: the two bfloat16 products of a 32-bit lane added into its float32.
template <int R, int P>
inline void bf16_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  const uint16_t* w = W.bf16 + panel * t.panel_stride;
  const uint16_t* a16 = act.bf16 + b * t.lda;
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < t.groups; ++j) {
    __m512i a[R];
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a16 + r * t.lda + 2 * j, 4);
      a[r] = _mm512_set1_epi32(pair);
    }
    for (int p = 0; p < P; ++p) {
      const __m512i wv = _mm512_loadu_si512(w + p * t.panel_stride + j * 32);
      for (int r = 0; r < R; ++r)
        acc[r][p] = dpbf16(acc[r][p], a[r], wv);
    }
  }
  const int64_t m0 = panel * 16;
  for (int p = 0; p < P; ++p) {
    const __mmask16 keep = static_cast<__mmask16>((1u << panel_columns(W, m0, p)) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(C + r * ldc + m0 + 16 * p, keep, acc[r][p]);
  }
}

#elif defined(__AVX2__)

// Both bfloat16 halves of a lane widened by a shift and a mask, then FMAs.
template <int R, int P>
inline void bf16_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const uint16_t* w = W.bf16 + panel * t.panel_stride;
  const uint16_t* a16 = act.bf16 + b * t.lda;
  __m256 acc[R][P][2];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < t.groups; ++j) {
    __m256 even_a[R], odd_a[R];
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a16 + r * t.lda + 2 * j, 4);
      const __m256i both = _mm256_set1_epi32(pair);
      even_a[r] = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
      odd_a[r] = _mm256_castsi256_ps(_mm256_and_si256(both, high));
    }
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < 2; ++v) {
        const __m256i wv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * t.panel_stride + j * 32 + 16 * v));
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
        const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
        for (int r = 0; r < R; ++r) {
          acc[r][p][v] = _mm256_fmadd_ps(even_a[r], even, acc[r][p][v]);
          acc[r][p][v] = _mm256_fmadd_ps(odd_a[r], odd, acc[r][p][v]);
        }
      }
  }
  const int64_t m0 = panel * 16;
  for (int p = 0; p < P; ++p) {
    const int64_t columns = panel_columns(W, m0, p);
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc + m0 + 16 * p;
      if (columns == 16) {
        _mm256_storeu_ps(c, acc[r][p][0]);
        _mm256_storeu_ps(c + 8, acc[r][p][1]);
      } else {
        alignas(32) float out[16];
        _mm256_store_ps(out, acc[r][p][0]);
        _mm256_store_ps(out + 8, acc[r][p][1]);
        store_columns(c, out, columns);
      }
    }
  }
}

#else  // portable

inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

template <int R, int P>
inline void bf16_tile(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                      const ReducedMatrix& W, int64_t panel, const Tile& t) {
  for (int p = 0; p < P; ++p) {
    const uint16_t* w = W.bf16 + (panel + p) * t.panel_stride;
    const int64_t m0 = (panel + p) * 16, columns = panel_columns(W, panel * 16, p);
    for (int r = 0; r < R; ++r) {
      const uint16_t* a16 = act.bf16 + (b + r) * t.lda;
      float acc[16] = {};
      for (int64_t j = 0; j < t.groups; ++j) {
        const float a0 = widen(a16[2 * j]), a1 = widen(a16[2 * j + 1]);
        for (int l = 0; l < 16; ++l) {
          acc[l] += a0 * widen(w[j * 32 + 2 * l]);
          acc[l] += a1 * widen(w[j * 32 + 2 * l + 1]);
        }
      }
      store_columns(C + r * ldc + m0, acc, columns);
    }
  }
}

#endif

// ---------------------------------------------------------------------------
// Tiles over the rows and panels of a product.

// Tile shapes: kRows rows x kPanels panels for many rows; fewer rows take more
// panels per tile, so that enough independent sums stay in flight (a chain of
// vpdpbusd into one register waits on its latency at every step).
#if defined(__AVX512F__)
constexpr int kRows = 6, kPanels = 4;  // 24 accumulators of the 32 vector registers
#elif defined(__AVXVNNI__)
constexpr int kRows = 6, kPanels = 1;  // 12 accumulators (two vectors a panel) of 16
#elif defined(__AVX2__)
constexpr int kRows = 4, kPanels = 1;  // 8 accumulators (two vectors a panel) of 16
#else
constexpr int kRows = 4, kPanels = 1;
#endif
template <int R>
constexpr int panels_for_rows() {
#if defined(__AVX512F__)
  return R >= 4 ? kPanels : R == 3 ? 6 : R == 2 ? 8 : 8;
#elif defined(__AVXVNNI__)
  return R >= 4 ? kPanels : R == 3 ? 2 : R == 2 ? 3 : 6;  // up to 12 sums
#else
  return kPanels;
#endif
}

// Panels p0..p1-1 in groups of P (then smaller ones) for one tile of R rows at b.
template <int R, int P, bool kInt8>
inline void tile_panels(float* C, int64_t ldc, const ActivationScratch& act, int64_t b,
                        const ReducedMatrix& W, int64_t p0, int64_t p1, const Tile& t) {
  int64_t p = p0;
  for (; p + P <= p1; p += P) {
    if constexpr (kInt8)
      int8_tile<R, P>(C + b * ldc, ldc, act, b, W, p, t);
    else
      bf16_tile<R, P>(C + b * ldc, ldc, act, b, W, p, t);
  }
  if constexpr (P > 1) {
    if (p < p1) tile_panels<R, (P > 2 ? P / 2 : 1), kInt8>(C, ldc, act, b, W, p, p1, t);
  }
}

template <bool kInt8>
Tile tile_of(const ReducedMatrix& W) {
  Tile t;
  t.lda = W.K_padded;
  t.groups = kInt8 ? W.K_padded / 4 : W.K_padded / 2;
  t.panel_stride = W.K_padded * kReducedPanel;
  return t;
}

template <bool kInt8>
void panels_of(float* C, int64_t ldc, const ActivationScratch& act, int64_t n, const ReducedMatrix& W,
               int64_t p0, int64_t p1) {
  const Tile t = tile_of<kInt8>(W);
  const int64_t panel_bytes = W.K_padded * kReducedPanel * (kInt8 ? 1 : 2);
  int64_t block = kPanelBlockBytes / panel_bytes / kPanels * kPanels;
  block = block > kPanels ? block : kPanels;
  for (int64_t b0 = 0; b0 < n; b0 += kRowBlock) {
    const int64_t b1 = b0 + kRowBlock < n ? b0 + kRowBlock : n;
    for (int64_t q0 = p0; q0 < p1; q0 += block) {
      const int64_t q1 = q0 + block < p1 ? q0 + block : p1;
      for_row_tiles<kRows>(b1 - b0, [&](int64_t b, auto rows) {
        constexpr int R = decltype(rows)::value;
        tile_panels<R, panels_for_rows<R>(), kInt8>(C, ldc, act, b0 + b, W, q0, q1, t);
      });
    }
  }
}

#if defined(__AMX_TILE__)
// ---------------------------------------------------------------------------
// AMX (Sapphire Rapids and later): the products on the tile unit. A tile is 16 rows
// of 64 bytes; one tdpbusd (int8) or tdpbf16ps (bfloat16) multiplies 16 rows of A by
// 64 bytes of k (64 int8 or 32 bfloat16 values) into 16 x 16 int32 or float32 sums,
// 8192 or 16384 multiply-adds, where vpdpbusd on 512 bits does 64 and vdpbf16ps 32
// (and the latter, on these cores, at half the rate of an FMA: measured 1.26 G/s
// against 5.0 G/s on a Xeon of the Emerald Rapids generation).
//
// The panels are already what a B tile wants: a panel's k-group of 4 (int8) or pair
// (bfloat16) holds its 16 outputs in 64 bytes, and its groups follow each other, so
// 16 groups are one tile of stride 64; the prepared rows are A's tiles as they lie
// (stride K_padded). The tiles:
//   0, 1  C: 16 outputs of two panels for the tile's rows
//   2     A: the rows, one step of 64 bytes of k
//   3, 4  B: the two panels, the same 16 groups
//   5     A at the last step when K_padded does not fill 64 bytes, and
//   6, 7  B for it: the tail is configured once, not padded into the weights
// Each call configures the tiles for its rows and releases them at its end.

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

TileConfig amx_config(int64_t rows, int64_t tail_bytes) {
  TileConfig c;
  auto set = [&](int tile, int64_t tile_rows, int64_t bytes) {
    c.rows[tile] = static_cast<uint8_t>(tile_rows);
    c.bytes_per_row[tile] = static_cast<uint16_t>(bytes);
  };
  set(0, rows, 64);
  set(1, rows, 64);
  set(2, rows, 64);
  set(3, 16, 64);
  set(4, 16, 64);
  if (tail_bytes > 0) {
    set(5, rows, tail_bytes);
    set(6, tail_bytes / 4, 64);
    set(7, tail_bytes / 4, 64);
  }
  return c;
}

// C tiles 0 (and 1 when two panels) += A B over all of k, for the configured rows.
// Written out for the tail: GCC's tile intrinsics are macros that spell their tile
// numbers into the instruction, so they cannot come from template parameters.
template <bool kInt8, bool kTwo>
inline void amx_sums(const uint8_t* a, int64_t lda_bytes, const uint8_t* w0, const uint8_t* w1,
                     int64_t steps, bool tail) {
  _tile_zero(0);
  if constexpr (kTwo) _tile_zero(1);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(2, a + 64 * s, lda_bytes);
    _tile_loadd(3, w0 + 1024 * s, 64);
    if constexpr (kInt8)
      _tile_dpbusd(0, 2, 3);
    else
      _tile_dpbf16ps(0, 2, 3);
    if constexpr (kTwo) {
      _tile_loadd(4, w1 + 1024 * s, 64);
      if constexpr (kInt8)
        _tile_dpbusd(1, 2, 4);
      else
        _tile_dpbf16ps(1, 2, 4);
    }
  }
  if (tail) {
    _tile_loadd(5, a + 64 * steps, lda_bytes);
    _tile_loadd(6, w0 + 1024 * steps, 64);
    if constexpr (kInt8)
      _tile_dpbusd(0, 5, 6);
    else
      _tile_dpbf16ps(0, 5, 6);
    if constexpr (kTwo) {
      _tile_loadd(7, w1 + 1024 * steps, 64);
      if constexpr (kInt8)
        _tile_dpbusd(1, 5, 7);
      else
        _tile_dpbf16ps(1, 5, 7);
    }
  }
}

// The sums of one C tile (16 x 16, stored rows 64 bytes apart) in float32 into C: int8
// as store_int8_sums does, bfloat16 as they are.
template <bool kInt8>
inline void amx_store(float* C, int64_t ldc, const void* tile, int64_t rows,
                      const ActivationScratch& act, int64_t b, const ReducedMatrix& W, int64_t panel) {
  const int64_t m0 = panel * 16;
  const __mmask16 keep = static_cast<__mmask16>((1u << panel_columns(W, m0, 0)) - 1);
  if constexpr (kInt8) {
    const int32_t* sums = static_cast<const int32_t*>(tile);
    const __m512i row_sums = _mm512_loadu_si512(W.row_sum + m0);
    const __m512 wscale = _mm512_loadu_ps(W.scale + m0);
    for (int64_t r = 0; r < rows; ++r)
      store_int8_row(C + (b + r) * ldc + m0, keep, _mm512_loadu_si512(sums + 16 * r),
                     act.scale[b + r], act.zero[b + r], row_sums, wscale);
  } else {
    const float* sums = static_cast<const float*>(tile);
    for (int64_t r = 0; r < rows; ++r)
      _mm512_mask_storeu_ps(C + (b + r) * ldc + m0, keep, _mm512_loadu_ps(sums + 16 * r));
  }
}

template <bool kInt8>
void amx_panels(float* C, int64_t ldc, const ActivationScratch& act, int64_t n, const ReducedMatrix& W,
                int64_t p0, int64_t p1) {
  const int64_t lda_bytes = kInt8 ? W.K_padded : 2 * W.K_padded;  // also the bytes of k
  const int64_t steps = lda_bytes / 64, tail_bytes = lda_bytes % 64;
  const int64_t panel_bytes = lda_bytes * kReducedPanel;
  const uint8_t* a0 = kInt8 ? act.q : reinterpret_cast<const uint8_t*>(act.bf16);
  const uint8_t* w = kInt8 ? reinterpret_cast<const uint8_t*>(W.q) : reinterpret_cast<const uint8_t*>(W.bf16);
  alignas(64) int32_t tile[2][16 * 16];
  int64_t configured_rows = 0;
  for (int64_t b = 0; b < n; b += 16) {
    const int64_t rows = n - b < 16 ? n - b : 16;
    if (rows != configured_rows) {
      const TileConfig config = amx_config(rows, tail_bytes);
      _tile_loadconfig(&config);
      configured_rows = rows;
    }
    const uint8_t* a = a0 + b * lda_bytes;
    int64_t p = p0;
    for (; p + 2 <= p1; p += 2) {
      amx_sums<kInt8, true>(a, lda_bytes, w + p * panel_bytes, w + (p + 1) * panel_bytes, steps,
                            tail_bytes > 0);
      _tile_stored(0, tile[0], 64);
      _tile_stored(1, tile[1], 64);
      amx_store<kInt8>(C, ldc, tile[0], rows, act, b, W, p);
      amx_store<kInt8>(C, ldc, tile[1], rows, act, b, W, p + 1);
    }
    if (p < p1) {
      amx_sums<kInt8, false>(a, lda_bytes, w + p * panel_bytes, nullptr, steps, tail_bytes > 0);
      _tile_stored(0, tile[0], 64);
      amx_store<kInt8>(C, ldc, tile[0], rows, act, b, W, p);
    }
  }
  _tile_release();
}
#endif

void panels(float* C, int64_t ldc, const ActivationScratch& act, int64_t n, const ReducedMatrix& W,
            int64_t p0, int64_t p1) {
#if defined(__AMX_TILE__)
  if (n >= (W.precision == Precision::Int8 ? kAmxMinInt8Rows : kAmxMinBf16Rows)) {
    if (W.precision == Precision::Int8)
      amx_panels<true>(C, ldc, act, n, W, p0, p1);
    else
      amx_panels<false>(C, ldc, act, n, W, p0, p1);
    return;
  }
#endif
  if (W.precision == Precision::Int8)
    panels_of<true>(C, ldc, act, n, W, p0, p1);
  else
    panels_of<false>(C, ldc, act, n, W, p0, p1);
}

#if defined(__AVX512VNNI__)
// int8_tile<1, P> of the one row of act at panel, while the carried rows get panel c
// of W_ih in the same loop over the groups of k: per group P weights and one
// broadcast for the row, one weight and a broadcast per carried row.
template <int P>
inline void carrying_int8_tile(float* C, const ActivationScratch& act, const ReducedMatrix& W,
                               int64_t panel, const Tile& t, const CarriedPanels& cp, int64_t c,
                               const Tile& ct) {
  constexpr int CR = kCarriedInputRows;
  const int8_t* w = W.q + panel * t.panel_stride;
  const int8_t* cw = cp.W_ih->q + c * ct.panel_stride;
  const uint8_t* xq = cp.x->q;
  __m512i acc[1][P], carried[CR][1];
  for (int p = 0; p < P; ++p) acc[0][p] = _mm512_setzero_si512();
  for (int r = 0; r < CR; ++r) carried[r][0] = _mm512_setzero_si512();
  auto row_group = [&](int64_t g) LSTMFAST_LAMBDA_INLINE {
    int32_t four;
    std::memcpy(&four, act.q + g * 4, 4);
    const __m512i a = _mm512_set1_epi32(four);
    for (int p = 0; p < P; ++p)
      acc[0][p] = dpbusd(acc[0][p], a, _mm512_loadu_si512(w + p * t.panel_stride + g * 64));
  };
  auto carried_group = [&](int64_t g) LSTMFAST_LAMBDA_INLINE {
    const __m512i wv = _mm512_loadu_si512(cw + g * 64);
    for (int r = 0; r < CR; ++r) {
      int32_t four;
      std::memcpy(&four, xq + r * ct.lda + g * 4, 4);
      carried[r][0] = dpbusd(carried[r][0], _mm512_set1_epi32(four), wv);
    }
  };
  const int64_t both = t.groups < ct.groups ? t.groups : ct.groups;
  for (int64_t g = 0; g < both; ++g) {
    row_group(g);
    carried_group(g);
  }
  for (int64_t g = both; g < t.groups; ++g) row_group(g);
  for (int64_t g = both; g < ct.groups; ++g) carried_group(g);
  store_int8_sums<CR, 1>(cp.xproj, cp.ldx, carried, cp.x->scale, cp.x->zero, *cp.W_ih, c * 16);
  store_int8_sums<1, P>(C, 0, acc, act.scale, act.zero, W, panel * 16);
}

// The tiles of panels p..p1-1 in groups of Q (then smaller ones), tile m of the
// tiles carrying the carried panels [c0 + carried m / tiles, c0 + carried (m + 1) /
// tiles): the first in its loop, any more on their own; a tile with none is
// int8_tile's.
template <int Q>
inline void carrying_tiles(float* C, const ActivationScratch& act, const ReducedMatrix& W,
                           int64_t p, int64_t p1, const Tile& t, const CarriedPanels& cp,
                           const Tile& ct, int64_t& m, int64_t tiles) {
  const int64_t carried = cp.c1 - cp.c0;
  for (; p + Q <= p1; p += Q, ++m) {
    const int64_t a = cp.c0 + carried * m / tiles, b = cp.c0 + carried * (m + 1) / tiles;
    if (a == b) {
      int8_tile<1, Q>(C, 0, act, 0, W, p, t);
      continue;
    }
    carrying_int8_tile<Q>(C, act, W, p, t, cp, a, ct);
    if (b - a > 1) panels_of<true>(cp.xproj, cp.ldx, *cp.x, kCarriedInputRows, *cp.W_ih, a + 1, b);
  }
  if constexpr (Q > 1) carrying_tiles<Q / 2>(C, act, W, p, p1, t, cp, ct, m, tiles);
}

void carrying_panels(float* C, const ActivationScratch& act, const ReducedMatrix& W, int64_t p0,
                     int64_t p1, const CarriedPanels& cp) {
  constexpr int P = panels_for_rows<1>();
  int64_t tiles = 0, left = p1 - p0;
  for (int q = P; q >= 1; q /= 2) {
    tiles += left / q;
    left %= q;
  }
  if (tiles == 0) {
    panels_of<true>(cp.xproj, cp.ldx, *cp.x, kCarriedInputRows, *cp.W_ih, cp.c0, cp.c1);
    return;
  }
  int64_t m = 0;
  carrying_tiles<P>(C, act, W, p0, p1, tile_of<true>(W), cp, tile_of<true>(*cp.W_ih), m, tiles);
}
#endif

#define LSTMFAST_STR2(x) #x
#define LSTMFAST_STR(x) LSTMFAST_STR2(x)

}  // namespace

extern const ReducedProducts reduced_products;
const ReducedProducts reduced_products = {LSTMFAST_STR(LSTMFAST_ISA),
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
                                          true,
#else
                                          false,
#endif
#if defined(__AMX_TILE__)
                                          16,
#else
                                          0,
#endif
                                          &prepare_rows, &panels,
#if defined(__AVX512VNNI__)
                                          &carrying_panels};
#else
                                          nullptr};
#endif

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
