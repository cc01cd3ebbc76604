#include "runtime/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

namespace lstmfast {
namespace {

blasint to_blasint(int64_t v) {
  if (v < 0 || v > std::numeric_limits<blasint>::max())
    throw std::length_error("lstmfast: a matrix dimension exceeds the 32-bit BLAS interface");
  return static_cast<blasint>(v);
}

CBLAS_TRANSPOSE op(bool t) { return t ? CblasTrans : CblasNoTrans; }

// C = beta * C, for K = 0 (BLAS implementations differ there).
template <typename T>
void scale(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
}

std::mutex g_threads_mutex;
int g_single_regions = 0;  // open BlasSingleThreaded regions
int g_wanted_threads = 0;  // the count to restore (0: unknown yet)

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                 float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) return scale(M, N, beta, C, ldc);
  scipy_cblas_sgemm(CblasRowMajor, op(trans_a), op(trans_b), to_blasint(M), to_blasint(N),
                    to_blasint(K), alpha, A, to_blasint(lda), B, to_blasint(ldb), beta, C,
                    to_blasint(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                  const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                  double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) return scale(M, N, beta, C, ldc);
  scipy_cblas_dgemm(CblasRowMajor, op(trans_a), op(trans_b), to_blasint(M), to_blasint(N),
                    to_blasint(K), alpha, A, to_blasint(lda), B, to_blasint(ldb), beta, C,
                    to_blasint(ldc));
}

// OpenBLAS is given no more threads than the CPUs the process may use: its
// threads, like the pool's, wait for one another in every GEMM, and with more of
// them than cores a wait lasts until a thread gets a core. Training of LSTM
// T=100 N=1 I=H=128 ran 9.8x slower at set_num_threads(8) than at 2 on 2 cores
// (a machine shared with other work, medians of 3 processes each).
static int blas_threads_for(int n) {
  static const int cpus = [] {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    const unsigned hc = std::thread::hardware_concurrency();
    return hc > 0 ? static_cast<int>(hc) : 1;
  }();
  return std::max(1, std::min(n, cpus));
}

void blas_set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_threads_mutex);
  g_wanted_threads = n;
  if (g_single_regions == 0) scipy_openblas_set_num_threads(blas_threads_for(n));
}

BlasSingleThreaded::BlasSingleThreaded() {
  std::lock_guard<std::mutex> lock(g_threads_mutex);
  if (g_single_regions++ == 0) {
    if (g_wanted_threads == 0) g_wanted_threads = scipy_openblas_get_num_threads();
    scipy_openblas_set_num_threads(1);
  }
}

BlasSingleThreaded::~BlasSingleThreaded() {
  std::lock_guard<std::mutex> lock(g_threads_mutex);
  if (--g_single_regions == 0) scipy_openblas_set_num_threads(blas_threads_for(g_wanted_threads));
}

int blas_get_num_threads() {
  std::lock_guard<std::mutex> lock(g_threads_mutex);
  if (g_wanted_threads == 0) g_wanted_threads = scipy_openblas_get_num_threads();
  return g_wanted_threads;
}
const char* blas_config() { return scipy_openblas_get_config(); }
const char* blas_corename() { return scipy_openblas_get_corename(); }

}  // namespace lstmfast
