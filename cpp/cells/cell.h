// The cells' kernels: forward and backward (BPTT) of one layer in one direction,
// one pair per cell file (lstm.cpp, gru.cpp, rnn.cpp, ctrnn.cpp, ln_lstm.cpp), each
// compiled once per instruction set; kernel_table.cpp collects them for dispatch.
// Arguments are documented in lstmfast.h (LayerForwardFn, LayerBackwardFn).
#pragma once

#include "runtime/kernel_unit.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// The kernels this unit family defines (explicitly instantiated for float and double).
template <typename Real>
void lstm_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                  const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                  const LayerShape& s);
template <typename Real>
void lstm_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                   const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                   const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                   const LayerShape& s);
template <typename Real>
void gru_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                 const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                 const LayerShape& s);
template <typename Real>
void gru_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                  const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                  const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                  const LayerShape& s);
template <typename Real>
void rnn_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                 const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                 const LayerShape& s);
template <typename Real>
void rnn_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                  const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                  const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                  const LayerShape& s);

template <typename Real>
void ctrnn_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                   const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                   const LayerShape& s);
template <typename Real>
void ctrnn_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                    const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s);

template <typename Real>
void ln_lstm_forward(Real* y, int64_t ldy, Real* h_n, Real* c_n, const LayerBuffers<Real>& buf,
                     const Real* x, const Real* h0, const Real* c0, const LayerWeights<Real>& w,
                     const LayerShape& s);
template <typename Real>
void ln_lstm_backward(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                      const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                      const Real* dh_n, const Real* dc_n, const Real* x,
                      const LayerWeights<Real>& w, const LayerShape& s);

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
