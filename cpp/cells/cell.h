// The cells' kernels: forward and backward (BPTT) of one layer in one direction,
// one pair per cell file (lstm.cpp, gru.cpp, rnn.cpp, ctrnn.cpp, ln_lstm.cpp,
// gru_reset_before.cpp), each compiled once per instruction set; kernel_table.cpp
// collects them for dispatch. Arguments are documented in lstmfast.h
// (LayerForwardFn, LayerBackwardFn).
#pragma once

#include "runtime/kernel_unit.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// Declares NAME_forward and NAME_backward (defined in the cell's file).
#define LSTMFAST_DECLARE_CELL(NAME)                                                          \
  template <typename Real>                                                                   \
  void NAME##_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n,                            \
                      const LayerBuffers<Real>& buf, const Real* x, const Real* h0,          \
                      const Real* c0, const LayerWeights<Real>& w, const LayerShape& s);     \
  template <typename Real>                                                                   \
  void NAME##_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,         \
                       const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,          \
                       const Real* dh_n, const Real* dc_n, const Real* x,                    \
                       const LayerWeights<Real>& w, const LayerShape& s);

// Instantiates them for float and double, at the end of the cell's file.
#define LSTMFAST_INSTANTIATE_CELL_FOR(NAME, Real)                                            \
  template void NAME##_forward<Real>(Real*, int64_t, Real*, Real*, const LayerBuffers<Real>&, \
                                     const Real*, const Real*, const Real*,                   \
                                     const LayerWeights<Real>&, const LayerShape&);           \
  template void NAME##_backward<Real>(Real*, Real*, Real*, const LayerGrads<Real>&,           \
                                      const LayerBuffers<Real>&, const Real*, int64_t,        \
                                      const Real*, const Real*, const Real*,                  \
                                      const LayerWeights<Real>&, const LayerShape&);
#define LSTMFAST_INSTANTIATE_CELL(NAME)        \
  LSTMFAST_INSTANTIATE_CELL_FOR(NAME, float)   \
  LSTMFAST_INSTANTIATE_CELL_FOR(NAME, double)

LSTMFAST_DECLARE_CELL(lstm)
LSTMFAST_DECLARE_CELL(gru)
LSTMFAST_DECLARE_CELL(rnn)
LSTMFAST_DECLARE_CELL(ctrnn)
LSTMFAST_DECLARE_CELL(ln_lstm)
LSTMFAST_DECLARE_CELL(gru_reset_before)

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
