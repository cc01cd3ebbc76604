// Run-time choice of the instruction set: each per-ISA build of the kernels
// (the cell files, kernel_table.cpp compiled with -DLSTMFAST_ISA=<name>)
// exports one table of function pointers; the best one this CPU supports is
// chosen once, on first use. Tests can force any other supported one.
#pragma once

#include <string>
#include <vector>

#include "lstmfast.h"

namespace lstmfast {

template <typename Real>
struct CellKernels {
  LayerForwardFn<Real> forward;
  LayerBackwardFn<Real> backward;
};

// Test hook: y = f(x) elementwise for n values, f = exp (which 0), sigmoid (1),
// tanh (2) of this instruction set's simd.h.
template <typename Real>
using ActivationFn = void (*)(int which, const Real* x, Real* y, int64_t n);

// C[n, cols] = A[n, K] B[K, cols] (+ C when accumulate), all row-major with rows
// ldc, lda, ldb apart: the input gradient dx = dG W_ih. Few rows (a cell step's
// backward) use B as it lies, as OpenBLAS would pack all of W_ih for them.
template <typename Real>
using ProductFn = void (*)(Real* C, int64_t ldc, const Real* A, int64_t lda, const Real* B,
                           int64_t ldb, int64_t n, int64_t K, int64_t cols, bool accumulate);

template <typename Real>
struct TypedKernels {
  CellKernels<Real> cells[kModes];  // indexed by Mode
  ActivationFn<Real> activation;
  ProductFn<Real> product;

  const CellKernels<Real>& cell(Mode mode) const { return cells[static_cast<int>(mode)]; }
};

// C[n, M] = A[n, K] W^T with reduced weights (recurrent_gemm.h: reduced_product);
// buf.act_* give the int8 scratch for n rows.
using ReducedProductFn = void (*)(float* C, int64_t ldc, const float* A, const ReducedMatrix& W,
                                  int64_t n, const LayerBuffers<float>& buf, int threads);

struct KernelTable {
  const char* name;
  TypedKernels<float> f32;
  TypedKernels<double> f64;
  ReducedProductFn reduced_product;

  template <typename Real>
  const TypedKernels<Real>& get() const;
};
template <>
inline const TypedKernels<float>& KernelTable::get<float>() const {
  return f32;
}
template <>
inline const TypedKernels<double>& KernelTable::get<double>() const {
  return f64;
}

// The tables of the builds (defined in kernel_table.cpp, one per instruction set).
namespace generic {
extern const KernelTable kernel_table;
}
namespace avx2 {
extern const KernelTable kernel_table;
}
namespace avx512 {
extern const KernelTable kernel_table;
}

// The table in use: the best supported one unless set_simd_target chose another.
const KernelTable& kernels();
// Its name: "generic", "avx2" or "avx512".
const char* simd_target();
// The instruction sets compiled into this build AND supported by this CPU, best last.
std::vector<std::string> simd_targets();
// Use the named table from now on (process-wide); throws std::invalid_argument
// when it is unknown, not compiled or not supported by this CPU.
void set_simd_target(const std::string& name);

}  // namespace lstmfast
