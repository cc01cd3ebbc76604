// Run-time choice of the instruction set: each per-ISA build of the kernels
// (the cell files, kernel_table.cpp compiled with -DLSTMFAST_ISA=<name>) and of
// the reduced products (reduced_products.cpp) exports one table of function
// pointers; the best target this CPU supports is chosen once, on first use.
// Tests can force any other supported one.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "lstmfast.h"
#include "products/reduced_products.h"

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

// panels = W [G*H, K] laid out as the forward packs it at the start of a call
// (drivers.h: pack_recurrent_panels), G0 gates first: lstmfast::pack_gates.
template <typename Real>
using PackGatesFn = void (*)(Real* panels, const Real* W, int G, int G0, int64_t H, int64_t K);

template <typename Real>
struct TypedKernels {
  CellKernels<Real> cells[kModes];  // indexed by Mode
  ActivationFn<Real> activation;
  ProductFn<Real> product;
  PackGatesFn<Real> pack_gates;

  const CellKernels<Real>& cell(Mode mode) const { return cells[static_cast<int>(mode)]; }
};

// C[n, M] = A[n, K] W^T with reduced weights (layer_products.h: reduced_product),
// by the given products, act giving the scratch for n prepared rows.
using ReducedProductFn = void (*)(float* C, int64_t ldc, const float* A, const ReducedMatrix& W,
                                  int64_t n, const ReducedProducts& products,
                                  const ActivationScratch& act, int threads);

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

// A target: a name, the cell kernels and the reduced-precision products it runs.
// The instruction-set extensions that only the reduced products use are targets of
// their own on top of the cell kernels of the width they extend: AVX-VNNI on avx2's,
// AVX512_VNNI, AVX512_BF16 and AMX on avx512's, so that tests can force each level below
// the best one.
struct SimdTarget {
  const char* name;
  const KernelTable* kernels;
  const ReducedProducts* products;
};

// The target in use: the best supported one unless set_simd_target chose another.
const SimdTarget& simd_target_in_use();
// Its cell kernels and its reduced products.
inline const KernelTable& kernels() { return *simd_target_in_use().kernels; }
inline const ReducedProducts& reduced_products() { return *simd_target_in_use().products; }
// Its name: "generic", "avx2", "avx2_vnni", "avx512", "avx512_vnni", "avx512_bf16" or
// "avx512_amx".
const char* simd_target();
// The targets compiled into this build AND supported by this CPU, best last.
std::vector<std::string> simd_targets();
// The targets compiled into this build, supported here or not, worst first.
std::vector<std::string> compiled_simd_targets();
// The instruction-set extensions the kernels and their peers care about, each with
// whether this CPU has it: avx2, fma, avx512f, avx512_vnni, avx512_bf16, avx_vnni
// (the 256-bit VEX form of VNNI), amx (AMX-TILE, -INT8 and -BF16, and the operating
// system's leave to use them). Empty off x86.
std::vector<std::pair<std::string, bool>> cpu_features();
// The target of that name among them; throws std::invalid_argument when there is none.
const SimdTarget& find_simd_target(const std::string& name);
// The compiled target of that name, whether this CPU runs it or not (what it is
// built of); throws std::invalid_argument when there is none.
const SimdTarget& find_compiled_simd_target(const std::string& name);
// Use the named target from now on (process-wide); throws std::invalid_argument
// when it is unknown, not compiled or not supported by this CPU.
void set_simd_target(const std::string& name);

}  // namespace lstmfast
