// Products with reduced-precision weights (lstmfast.h: ReducedMatrix), for
// inference: C[n, M] = A[n, K] W[M, K]^T with A float32.
//
//   int8:     A is quantized per row (quantize_rows), the products are summed
//             exactly in int32, and the sum is scaled back to float32.
//   bfloat16: W is widened to float32 in registers; A stays float32.
//
// Each kernel computes one panel of 16 outputs for a tile of up to 4 rows, k
// innermost, and reads its panel in order: at batch 1 the step streams W once,
// in a quarter (int8) or half (bfloat16) of the bytes of float32.
//
// Activations are quantized to 0..127, not 0..255: AVX2 has no instruction that
// sums u8 x s8 products in int32 directly, and vpmaddubsw sums pairs of them in
// int16 with saturation; 127 x 128 x 2 < 2^15 cannot saturate. torch's dynamic
// quantization (fbgemm, reduce_range) uses the same 7-bit range. Every path then
// sums the same integers, so int8 results are identical on every instruction set.
//
// Included only by the per-ISA kernel units (see cell.h).
#pragma once

#include "cell.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lstmfast {
namespace LSTMFAST_ISA {

constexpr int64_t kActivationLevels = 127;

// q[b, :K] = rows r0..r1-1 of A (lda apart) quantized: A[b, k] ~ scale[b] *
// (q[b, k] - zero[b]) with q in 0..127 and the range widened to include 0, so
// that 0 is exact (rows of zeros, ReLU outputs). q[b, K:ldq] = 0.
inline void quantize_rows(uint8_t* q, int64_t ldq, float* scale, int32_t* zero, const float* A,
                          int64_t lda, int64_t r0, int64_t r1, int64_t K) {
  for (int64_t b = r0; b < r1; ++b) {
    const float* a = A + b * lda;
    uint8_t* qb = q + b * ldq;
    float lo = 0.0f, hi = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      lo = a[k] < lo ? a[k] : lo;
      hi = a[k] > hi ? a[k] : hi;
    }
    float s = (hi - lo) / static_cast<float>(kActivationLevels);
    if (!(s > 0.0f) || !(s < 3.0e38f)) s = 1.0f;  // all zeros, or not finite: garbage in, no UB
    float z = __builtin_nearbyintf(-lo / s);
    z = z <= 127.0f ? z : 127.0f;  // only when s was reset above: no int overflow below
    for (int64_t k = 0; k < K; ++k) {
      float v = __builtin_nearbyintf(a[k] / s) + z;
      v = v >= 0.0f ? v : 0.0f;  // NaN goes to 0
      v = v <= 127.0f ? v : 127.0f;
      qb[k] = static_cast<uint8_t>(v);
    }
    for (int64_t k = K; k < ldq; ++k) qb[k] = 0;
    scale[b] = s;
    zero[b] = static_cast<int32_t>(z);
  }
}

// C[b, m] for panels p0..p1-1 of W and rows 0..n-1, from activations quantized by
// quantize_rows (q rows ldq = W.K_padded apart).
inline void int8_panels(float* C, int64_t ldc, const uint8_t* q, int64_t ldq, const float* sa,
                        const int32_t* za, int64_t n, const ReducedMatrix& W, int64_t p0,
                        int64_t p1);

// C[b, m] for panels p0..p1-1 of W and rows 0..n-1 of A (lda apart).
inline void bf16_panels(float* C, int64_t ldc, const float* A, int64_t lda, int64_t n,
                        const ReducedMatrix& W, int64_t p0, int64_t p1);

// Rows of A kept in cache while the panels pass over them (the input projection
// has T*N rows): 64 rows of K = 1024 are 64 KB of int8 activations.
constexpr int64_t kReducedRowBlock = 64;

// Stores a tile's results: out[16] for row b, only the columns below M.
inline void store_panel_row(float* c, const float* out, int64_t columns) {
  for (int64_t j = 0; j < columns; ++j) c[j] = out[j];
}

#if defined(__AVX2__)

// int8: R rows x 16 outputs, two vectors of 8 int32 sums per row. Two groups of
// 4 k per pass, summed apart before they join the row's sums: the chain of adds
// into each accumulator is then half as long (measured with AVX2, R = 4,
// K = 512: 42 GMAC/s one group per pass, 58-76 two; four per pass spilled).
template <int R>
inline void int8_tile(float* C, int64_t ldc, const uint8_t* q, int64_t ldq, const float* sa,
                      const int32_t* za, const int8_t* panel, int64_t groups, const float* scale,
                      const int32_t* row_sum, int64_t columns) {
  const __m256i ones = _mm256_set1_epi16(1);
  auto weights = [&](int64_t g, int half) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + g * 64 + half * 32));
  };
  auto activations = [&](int r, int64_t g) {
    int32_t four;
    __builtin_memcpy(&four, q + r * ldq + g * 4, 4);
    return _mm256_set1_epi32(four);
  };
  // u8 x s8 products of one group, 4 per int32 lane (pairs summed in int16 first)
  auto products = [&](__m256i a, __m256i w) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), ones);
  };
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const __m256i w00 = weights(g, 0), w01 = weights(g, 1);
    const __m256i w10 = weights(g + 1, 0), w11 = weights(g + 1, 1);
    for (int r = 0; r < R; ++r) {
      const __m256i a0 = activations(r, g), a1 = activations(r, g + 1);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_add_epi32(products(a0, w00), products(a1, w10)));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_add_epi32(products(a0, w01), products(a1, w11)));
    }
  }
  if (g < groups) {
    const __m256i w0 = weights(g, 0), w1 = weights(g, 1);
    for (int r = 0; r < R; ++r) {
      const __m256i a = activations(r, g);
      acc[r][0] = _mm256_add_epi32(acc[r][0], products(a, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], products(a, w1));
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[16];
    for (int v = 0; v < 2; ++v) {
      const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_sum + 8 * v));
      const __m256i exact = _mm256_sub_epi32(acc[r][v], _mm256_mullo_epi32(_mm256_set1_epi32(za[r]), sums));
      const __m256 scales = _mm256_mul_ps(_mm256_set1_ps(sa[r]), _mm256_loadu_ps(scale + 8 * v));
      const __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), scales);
      if (columns == 16)
        _mm256_storeu_ps(C + r * ldc + 8 * v, value);
      else
        _mm256_store_ps(out + 8 * v, value);
    }
    if (columns < 16) store_panel_row(C + r * ldc, out, columns);
  }
}

// bfloat16: R rows x 16 outputs; each 32-bit lane of the panel holds the weights
// of k and k + 1 of one output, widened by a shift and a mask.
template <int R>
inline void bf16_tile(float* C, int64_t ldc, const float* A, int64_t lda, const uint16_t* panel,
                      int64_t K, int64_t columns) {
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t pairs = K / 2;
  auto step = [&](int64_t j, bool odd_k_exists) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + j * 32));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + j * 32 + 16));
    const __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    const __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    const __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
    const __m256 odd1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
    for (int r = 0; r < R; ++r) {
      const __m256 a0 = _mm256_broadcast_ss(A + r * lda + 2 * j);
      acc[r][0] = _mm256_fmadd_ps(a0, even0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a0, even1, acc[r][1]);
      if (odd_k_exists) {
        const __m256 a1 = _mm256_broadcast_ss(A + r * lda + 2 * j + 1);
        acc[r][0] = _mm256_fmadd_ps(a1, odd0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a1, odd1, acc[r][1]);
      }
    }
  };
  for (int64_t j = 0; j < pairs; ++j) step(j, true);
  if (K % 2) step(pairs, false);  // the last k has no partner: A[K] is not read
  for (int r = 0; r < R; ++r) {
    if (columns == 16) {
      _mm256_storeu_ps(C + r * ldc, acc[r][0]);
      _mm256_storeu_ps(C + r * ldc + 8, acc[r][1]);
    } else {
      alignas(32) float out[16];
      _mm256_store_ps(out, acc[r][0]);
      _mm256_store_ps(out + 8, acc[r][1]);
      store_panel_row(C + r * ldc, out, columns);
    }
  }
}

#else  // portable: the same order of operations, one lane at a time

template <int R>
inline void int8_tile(float* C, int64_t ldc, const uint8_t* q, int64_t ldq, const float* sa,
                      const int32_t* za, const int8_t* panel, int64_t groups, const float* scale,
                      const int32_t* row_sum, int64_t columns) {
  for (int r = 0; r < R; ++r) {
    int32_t acc[16] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* a = q + r * ldq + g * 4;
      const int8_t* w = panel + g * 64;
      for (int j = 0; j < 16; ++j)
        acc[j] += a[0] * w[4 * j] + a[1] * w[4 * j + 1] + a[2] * w[4 * j + 2] + a[3] * w[4 * j + 3];
    }
    for (int64_t j = 0; j < columns; ++j)
      C[r * ldc + j] = static_cast<float>(acc[j] - za[r] * row_sum[j]) * (sa[r] * scale[j]);
  }
}

template <int R>
inline void bf16_tile(float* C, int64_t ldc, const float* A, int64_t lda, const uint16_t* panel,
                      int64_t K, int64_t columns) {
  for (int r = 0; r < R; ++r) {
    float acc[16] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[r * lda + k];
      const uint16_t* w = panel + (k / 2) * 32 + k % 2;
      for (int j = 0; j < 16; ++j) {
        const uint32_t bits = static_cast<uint32_t>(w[2 * j]) << 16;
        float weight;
        __builtin_memcpy(&weight, &bits, 4);
        acc[j] += a * weight;
      }
    }
    store_panel_row(C + r * ldc, acc, columns);
  }
}

#endif

// f(b, rows) over tiles of up to 4 rows of 0..n-1, rows a compile-time constant.
template <typename F>
inline void for_four_row_tiles(int64_t b0, int64_t b1, F&& f) {
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) f(b, std::integral_constant<int, 4>{});
  switch (b1 - b) {
    case 3:
      f(b, std::integral_constant<int, 3>{});
      break;
    case 2:
      f(b, std::integral_constant<int, 2>{});
      break;
    case 1:
      f(b, std::integral_constant<int, 1>{});
      break;
    default:
      break;
  }
}

inline void int8_panels(float* C, int64_t ldc, const uint8_t* q, int64_t ldq, const float* sa,
                        const int32_t* za, int64_t n, const ReducedMatrix& W, int64_t p0,
                        int64_t p1) {
  const int64_t groups = W.K_padded / 4;
  for (int64_t b0 = 0; b0 < n; b0 += kReducedRowBlock) {
    const int64_t b1 = b0 + kReducedRowBlock < n ? b0 + kReducedRowBlock : n;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t m0 = p * kReducedPanel;
      const int64_t columns = W.M - m0 < kReducedPanel ? W.M - m0 : kReducedPanel;
      const int8_t* panel = W.q + p * groups * 4 * kReducedPanel;
      for_four_row_tiles(b0, b1, [&](int64_t b, auto rows) {
        int8_tile<decltype(rows)::value>(C + b * ldc + m0, ldc, q + b * ldq, ldq, sa + b, za + b,
                                         panel, groups, W.scale + m0, W.row_sum + m0, columns);
      });
    }
  }
}

inline void bf16_panels(float* C, int64_t ldc, const float* A, int64_t lda, int64_t n,
                        const ReducedMatrix& W, int64_t p0, int64_t p1) {
  for (int64_t b0 = 0; b0 < n; b0 += kReducedRowBlock) {
    const int64_t b1 = b0 + kReducedRowBlock < n ? b0 + kReducedRowBlock : n;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t m0 = p * kReducedPanel;
      const int64_t columns = W.M - m0 < kReducedPanel ? W.M - m0 : kReducedPanel;
      const uint16_t* panel = W.bf16 + p * W.K_padded * kReducedPanel;
      for_four_row_tiles(b0, b1, [&](int64_t b, auto rows) {
        bf16_tile<decltype(rows)::value>(C + b * ldc + m0, ldc, A + b * lda, lda, panel, W.K,
                                         columns);
      });
    }
  }
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
