// Thin, typed wrappers over OpenBLAS (scipy-openblas32 build, symbols prefixed
// `scipy_`). Every matrix is row-major. Sizes are int64 here and checked to fit
// the 32-bit BLAS interface before the call.
#pragma once

#include <cstdint>

namespace lstmfast {

// C[M, N] = alpha * op(A) * op(B) + beta * C, row-major (K = 0 gives beta * C).
//   trans_a: op(A) = A^T when true, A is then [K, M] with leading dimension lda
//   trans_b: op(B) = B^T when true, B is then [N, K] with leading dimension ldb
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
          const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// Threads used by OpenBLAS inside the large GEMMs. While a BlasSingleThreaded
// region is open anywhere in the process, a new count is remembered and applied
// when the last region closes.
void blas_set_num_threads(int n);
int blas_get_num_threads();

// OpenBLAS runs single-threaded while at least one of these is alive: the kernels
// open one around regions where their own threads already use every core (the two
// directions running concurrently). OpenBLAS has only a process-wide count, so the
// regions are counted and the previous count is restored when the last one closes.
class BlasSingleThreaded {
 public:
  BlasSingleThreaded();
  ~BlasSingleThreaded();
  BlasSingleThreaded(const BlasSingleThreaded&) = delete;
  BlasSingleThreaded& operator=(const BlasSingleThreaded&) = delete;
};
// OpenBLAS's build string and the CPU core type it dispatched to.
const char* blas_config();
const char* blas_corename();

}  // namespace lstmfast
