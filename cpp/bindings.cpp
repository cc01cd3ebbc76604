// The private extension module lstmfast._core. Thin by design: argument checks
// with clear messages, GIL released around every kernel, no math here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "gemm.h"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// C = A @ B through the BLAS the kernels use; exposed so tests can prove the wiring.
template <typename T>
py::array_t<T> matmul(const CArray<T>& a, const CArray<T>& b) {
  if (a.ndim() != 2 || b.ndim() != 2)
    throw py::value_error("matmul: a and b must be 2-D, got " + std::to_string(a.ndim()) +
                          "-D and " + std::to_string(b.ndim()) + "-D");
  const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
  if (b.shape(0) != K)
    throw py::value_error("matmul: inner dimensions differ: a is (" + std::to_string(M) + ", " +
                          std::to_string(K) + "), b is (" + std::to_string(b.shape(0)) + ", " +
                          std::to_string(N) + ")");
  py::array_t<T> c({M, N});
  const T* pa = a.data();
  const T* pb = b.data();
  T* pc = c.mutable_data();
  {
    py::gil_scoped_release release;
    if (K == 0) {
      for (int64_t i = 0; i < M * N; ++i) pc[i] = T(0);
    } else {
      lstmfast::gemm<T>(false, false, M, N, K, T(1), pa, K, pb, N, T(0), pc, N);
    }
  }
  return c;
}

void register_blas(py::module_& m) {
  m.def("matmul_f32", &matmul<float>, py::arg("a"), py::arg("b"));
  m.def("matmul_f64", &matmul<double>, py::arg("a"), py::arg("b"));
  m.def("blas_set_num_threads", &lstmfast::blas_set_num_threads, py::arg("n"));
  m.def("blas_get_num_threads", &lstmfast::blas_get_num_threads);
  m.def("blas_config", []() { return std::string(lstmfast::blas_config()); });
  m.def("blas_corename", []() { return std::string(lstmfast::blas_corename()); });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lstmfast's compiled kernels (private; use the lstmfast package)";
  m.attr("__version__") = LSTMFAST_VERSION;
  register_blas(m);
}
