// Thin, typed wrappers over OpenBLAS (scipy-openblas32 build, symbols prefixed
// `scipy_`). Every matrix is row-major. Sizes are int64 here and checked to fit
// the 32-bit BLAS interface before the call.
#pragma once

#include <cstdint>

namespace lstmfast {

// C[M, N] = alpha * op(A) * op(B) + beta * C, row-major.
//   trans_a: op(A) = A^T when true, A is then [K, M] with leading dimension lda
//   trans_b: op(B) = B^T when true, B is then [N, K] with leading dimension ldb
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
          const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// Threads used by OpenBLAS inside the large GEMMs.
void blas_set_num_threads(int n);
int blas_get_num_threads();
// OpenBLAS's build string and the CPU core type it dispatched to.
const char* blas_config();
const char* blas_corename();

}  // namespace lstmfast
