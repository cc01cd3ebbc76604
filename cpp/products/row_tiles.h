// Row tiles of a product: the rows of a step cut into register tiles of at most R
// rows, each tile's height a compile-time constant of its micro-kernel. Used by the
// float tiles (small_products.h, recurrent_product.h) and the int8 and bfloat16 ones
// (reduced_products.cpp). Included only by the per-ISA kernel units.
#pragma once

#include <cstdint>
#include <type_traits>

namespace lstmfast {
namespace LSTMFAST_ISA {

// f(b, rows) for the row tiles of 0..n-1: as few tiles as R rows allow, their
// heights as even as can be (n = 8, R = 6: 4 + 4, not 6 + 2; a tile of few rows
// waits on the FMA latency and reloads the panel for little work: the bfloat16
// LSTM and GRU at N = 8, I = H = 256, one thread, ran 2-3% faster on 4 + 4 than on
// 6 + 2, Zen 4); rows is a std::integral_constant, so each tile height is a
// compile-time constant of the micro-kernel.
template <int M, typename F>
inline void last_row_tile(int64_t b, int64_t rest, F& f) {
  if constexpr (M > 0) {
    if (rest == M)
      f(b, std::integral_constant<int, M>{});
    else
      last_row_tile<M - 1>(b, rest, f);
  }
}
template <int R, typename F>
inline void for_row_tiles(int64_t n, F&& f) {
  const int64_t tiles = (n + R - 1) / R;
  int64_t b = 0;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t left = tiles - i, rows = (n - b + left - 1) / left;
    if (rows == R)
      f(b, std::integral_constant<int, R>{});
    else
      last_row_tile<R - 1>(b, rows, f);
    b += rows;
  }
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
