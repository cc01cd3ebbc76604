// The table of this instruction set's kernels (see dispatch.h), and the
// activation test hook. Compiled once per instruction set.
#include <stdexcept>
#include <string>

#include "runtime/dispatch.h"
#include "cells/cell.h"
#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {
namespace {

#define LSTMFAST_STR2(x) #x
#define LSTMFAST_STR(x) LSTMFAST_STR2(x)

template <typename Real>
void activation(int which, const Real* x, Real* y, int64_t count) {
  for_lanes<Real>(count, [&](int64_t j, int64_t n) {
    const V<Real> v = ld(x + j, n);
    st(y + j,
       which == 0   ? simd::vexp(v)
       : which == 1 ? simd::vsigmoid<Real>(v)
                    : simd::vtanh(v),
       n);
  });
}

// The (G, G0) of every cell: LSTM and LN_LSTM (4, 4), GRU (3, 3), RNN and CTRNN
// (1, 1), GRU_RESET_BEFORE's W_hh (3, 2); W_ih is always (G, G).
template <typename Real>
void pack_gates(Real* panels, const Real* W, int G, int G0, int64_t H, int64_t K) {
  const int64_t blocks = unit_blocks<Real>(H);
  if (G == 4 && G0 == 4)
    pack_recurrent_panels<Real, 4, 4>(panels, W, H, K, 0, blocks);
  else if (G == 3 && G0 == 3)
    pack_recurrent_panels<Real, 3, 3>(panels, W, H, K, 0, blocks);
  else if (G == 3 && G0 == 2)
    pack_recurrent_panels<Real, 3, 2>(panels, W, H, K, 0, blocks);
  else if (G == 1 && G0 == 1)
    pack_recurrent_panels<Real, 1, 1>(panels, W, H, K, 0, blocks);
  else
    throw std::invalid_argument("pack_gates: no cell has G = " + std::to_string(G) +
                                " gates with G0 = " + std::to_string(G0) + " in its first product");
}

template <typename Real>
constexpr TypedKernels<Real> typed() {
  static_assert(kModes == 8, "a cell was added to Mode: give it its kernels below");
  // One entry per Mode, in its order (tanh and relu share a kernel: LayerShape::relu).
  return {{{&lstm_forward<Real>, &lstm_backward<Real>},
           {&gru_forward<Real>, &gru_backward<Real>},
           {&rnn_forward<Real>, &rnn_backward<Real>},
           {&rnn_forward<Real>, &rnn_backward<Real>},
           {&ctrnn_forward<Real>, &ctrnn_backward<Real>},
           {&ctrnn_forward<Real>, &ctrnn_backward<Real>},
           {&ln_lstm_forward<Real>, &ln_lstm_backward<Real>},
           {&gru_reset_before_forward<Real>, &gru_reset_before_backward<Real>}},
          &activation<Real>,
          &times_stored_matrix<Real>,
          &pack_gates<Real>};
}

}  // namespace

extern const KernelTable kernel_table;
const KernelTable kernel_table = {LSTMFAST_STR(LSTMFAST_ISA), typed<float>(), typed<double>(),
                                  &reduced_product};

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
