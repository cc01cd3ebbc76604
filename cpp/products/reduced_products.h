// Products with reduced-precision weights (lstmfast.h: ReducedMatrix), for
// inference: C[n, M] = A[n, K] W[M, K]^T with A float32. reduced_products.cpp is
// compiled once per instruction set, its extensions included (AVX-VNNI,
// AVX512_VNNI, AVX512_BF16), and dispatch.h hands out the table of the one in use.
//
// A product runs in two passes, so that the rows of A are prepared once and
// then read by every panel of W (and, on the pool, by every thread):
//   1. prepare_rows converts rows of A into ActivationScratch:
//        int8:     quantized per row to 0..127 with a zero point (A ~ scale (q - zero));
//        bfloat16: rounded to bfloat16, nearest even;
//   2. panels computes panels of 16 outputs (kReducedPanel) for the prepared rows:
//        int8:     the u8 x s8 products summed exactly in int32, the zero point
//                  taken out with W's row sums, the sum scaled back to float32;
//        bfloat16: the products of two bfloat16 values (exact in float32) summed
//                  in float32.
// The contract (reference.py, "Reduced precision"): int8 results are identical on
// every instruction set; bfloat16 ones agree to the float32 rounding of the sums.
//
// Activations are quantized to 0..127, not 0..255: AVX2 has no instruction that
// sums u8 x s8 products in int32 directly, and vpmaddubsw sums pairs of them in
// int16 with saturation; 127 x 128 x 2 < 2^15 cannot saturate. With VNNI, 256-bit
// or 512-bit (vpdpbusd sums four products in int32) the same 7-bit activations keep every
// instruction set on the same integers. torch's dynamic quantization (fbgemm,
// reduce_range) uses the same 7-bit range.
#pragma once

#include <cstdint>

#include "lstmfast.h"

namespace lstmfast {

// Rows of A prepared for the products of one weight W (rows W.K_padded wide, zero
// past W.K): the int8 or the bfloat16 fields, by W's precision.
struct ActivationScratch {
  uint8_t* q = nullptr;      // q: [rows, K_padded] int8 activations, values 0..127
  float* scale = nullptr;    // scale: [rows] per row
  int32_t* zero = nullptr;   // zero: [rows] zero point per row
  uint16_t* bf16 = nullptr;  // bf16: [rows, K_padded] bfloat16 bit patterns

  // The same rows from row r on, for a product of those rows alone (K_padded: that
  // of the W they were prepared for).
  ActivationScratch from_row(int64_t r, int64_t K_padded) const {
    ActivationScratch rows = *this;
    if (q) rows.q += r * K_padded;
    if (scale) rows.scale += r;
    if (zero) rows.zero += r;
    if (bf16) rows.bf16 += r * K_padded;
    return rows;
  }
};

// What the recurrent product of one row carries along (ReducedProducts::
// carrying_panels): panels c0..c1-1 of W_ih for kCarriedInputRows prepared rows of x,
// into their rows of xproj. With one row a step's product reads each weight of W_hh
// from L2 for one multiply-add and waits on the loads, while the input projection,
// 8 rows for each weight, waits on the multiply-adds: in one loop each fills the
// other's idle units.
constexpr int64_t kCarriedInputRows = 8;
struct CarriedPanels {
  float* xproj;                 // the first of the rows, ldx apart
  int64_t ldx;
  const ActivationScratch* x;   // the rows prepared for W_ih, from the first
  const ReducedMatrix* W_ih;
  int64_t c0, c1;
};

// The products of one instruction set.
struct ReducedProducts {
  const char* name;  // the instruction set they were compiled for
  // Multiplies bfloat16 in hardware (vdpbf16ps): whole bfloat16 layers then run on
  // it; without, a layer of many rows runs on its weights widened to float32 (stack.cpp).
  bool native_bf16;
  // Rows a tile needs to run at its rate: AMX's take 16, 0 for the others (whose
  // tiles of a few rows are as fast). A layer's threads split its rows only when each
  // gets that many (reduced_steps); with fewer they share each step's panels, and
  // project their inputs in chunks of steps rather than a few rows a step.
  int64_t full_tile_rows;
  // Rows r0..r1-1 of A (lda apart, W.K values each) into rows r0..r1-1 of act.
  void (*prepare_rows)(const ActivationScratch& act, const float* A, int64_t lda,
                       const ReducedMatrix& W, int64_t r0, int64_t r1);
  // C[b, 16 p .. 16 p + 15] for panels p0..p1-1 of W and prepared rows 0..n-1 (C's
  // rows ldc apart; columns past W.M are not written).
  void (*panels)(float* C, int64_t ldc, const ActivationScratch& act, int64_t n,
                 const ReducedMatrix& W, int64_t p0, int64_t p1);
  // panels(C, 0, act, 1, W, p0, p1) for one row while the carried panels are
  // computed in the same loops, W and W_ih int8 (never bfloat16); null where the
  // kernels do not carry (only AVX512_VNNI's int8 tiles do: measured there, see
  // reduced_steps).
  void (*carrying_panels)(float* C, const ActivationScratch& act, const ReducedMatrix& W,
                          int64_t p0, int64_t p1, const CarriedPanels& carried);
};

// The tables of the builds (reduced_products.cpp, one per instruction set).
namespace generic {
extern const ReducedProducts reduced_products;
}
namespace avx2 {
extern const ReducedProducts reduced_products;
}
namespace avx2_vnni {
extern const ReducedProducts reduced_products;
}
namespace avx512 {
extern const ReducedProducts reduced_products;
}
namespace avx512_vnni {
extern const ReducedProducts reduced_products;
}
namespace avx512_bf16 {
extern const ReducedProducts reduced_products;
}
namespace avx512_amx {
extern const ReducedProducts reduced_products;
}

}  // namespace lstmfast
