// The private extension module lstmfast._core. Thin by design: argument checks
// with clear messages, GIL released around every kernel, no math here. Long only
// because every entry point's checks and docstrings are spelled out one by one.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "runtime/dispatch.h"
#include "runtime/gemm.h"
#include "lstmfast.h"
#include "runtime/thread_pool.h"
#include "runtime/workspace.h"

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


// ---------------------------------------------------------------------------
// Recurrent stacks: rnn_forward / rnn_backward (lstmfast._fused wraps them).

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    out += (i ? ", " : "") + std::to_string(shape[i]) + (shape.size() == 1 ? "," : "");
  return out + ")";
}

// An expected shape of at most four dimensions, held in place: a one-step call checks
// a dozen shapes, and vectors of them cost it an allocation each.
struct Dims {
  int64_t d[4] = {};
  size_t n = 0;
  Dims() = default;
  Dims(std::initializer_list<int64_t> dims) {
    for (int64_t v : dims) d[n++] = v;
  }
  size_t size() const { return n; }
  int64_t operator[](size_t i) const { return d[i]; }
  bool operator!=(const std::vector<int64_t>& shape) const {
    if (shape.size() != n) return true;
    for (size_t i = 0; i < n; ++i)
      if (shape[i] != d[i]) return true;
    return false;
  }
};

std::string dims_str(const Dims& shape) {
  return shape_str(std::vector<int64_t>(shape.d, shape.d + shape.n));
}

std::string type_name(py::handle obj) {
  return std::string(py::str(py::type::handle_of(obj).attr("__name__")));
}

// The name of an argument, for messages: a string, or a function building one
// (so that names are only put together when a check fails).
inline const std::string& name_str(const std::string& name) { return name; }
inline std::string name_str(const char* name) { return name; }
template <typename F>
std::string name_str(const F& name) {
  return name();
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

lstmfast::Mode parse_mode(const std::string& mode) {
  if (const lstmfast::CellInfo* cell = lstmfast::find_cell(mode.c_str())) return cell->mode;
  std::string names;
  for (int m = 0; m < lstmfast::kModes; ++m)
    names += std::string(m ? ", '" : "'") + lstmfast::cell_info(lstmfast::Mode(m)).name + "'";
  throw py::value_error("mode must be one of " + names + ", got '" + mode + "'");
}

// `a` as a C-contiguous array of Real: `a` itself when it is one, else a copy. Unlike
// array_t::ensure, which returns a null array (and clears the error) when the copy
// fails, this raises the Python error (MemoryError for a copy too large to allocate).
template <typename Real, int Flags = py::array::c_style>
py::array_t<Real, Flags> c_contiguous(const py::array& a) {
  return py::array_t<Real, Flags>(py::reinterpret_borrow<py::object>(a));
}

// `obj` as a C-contiguous array of Real with the given shape (copied only when
// its layout is not C-contiguous); TypeError for another dtype, ValueError for
// another shape, both naming the argument.
template <typename Real, typename Name>
py::array_t<Real, py::array::c_style> checked(py::handle obj, const Name& name,
                                              const Dims& shape) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name_str(name) + ": expected a numpy array, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<Real>()))
    throw py::type_error(name_str(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<Real>())) + " (that of x), got " +
                         std::string(py::str(a.dtype())));
  bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t d = 0; same && d < shape.size(); ++d) same = a.shape(d) == shape[d];
  if (!same)
    throw py::value_error(name_str(name) + ": expected shape " + dims_str(shape) + ", got " +
                          shape_str(shape_of(a)));
  // Most arguments already are what the kernels read: taken as they are, without
  // numpy's conversion machinery (which a cell's one-step call would pay per array).
  if (a.flags() & py::array::c_style)
    return py::reinterpret_borrow<py::array_t<Real, py::array::c_style>>(a);
  return c_contiguous<Real>(a);
}

// "a,b,c" as {"a", "b", "c"} ("" as {}).
std::vector<std::string> split_list(const char* names) {
  std::vector<std::string> out;
  std::string name;
  for (const char* p = names;; ++p) {
    if (*p == ',' || *p == '\0') {
      if (!name.empty()) out.push_back(name);
      name.clear();
      if (*p == '\0') break;
    } else {
      name += *p;
    }
  }
  return out;
}

// The number of names in "a,b,c" (split_list's, without making them).
size_t list_length(const char* names) {
  size_t count = 0;
  bool in_name = false;
  for (const char* p = names; *p; ++p) {
    if (*p != ',' && !in_name) ++count;
    in_name = *p != ',';
  }
  return count;
}

// The parameters of a layer-direction by slot, as Params and Grads keep them:
// torch's five (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), then the cell's
// extra and optional ones in the cell table's order (CellInfo: the peephole LSTM's
// weight_ci, weight_cf, weight_co; LN_LSTM's four layer norms).
// Made once per mode (the first call holds the GIL, which guards the statics).
const std::vector<std::string>& param_slots(lstmfast::Mode mode) {
  static std::vector<std::string> by_mode[lstmfast::kModes];
  std::vector<std::string>& slots = by_mode[static_cast<int>(mode)];
  if (slots.empty()) {
    slots = {"weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"};
    const lstmfast::CellInfo& cell = lstmfast::cell_info(mode);
    for (const char* list : {cell.extra_params, cell.optional_params})
      for (std::string& name : split_list(list)) slots.push_back(std::move(name));
  }
  return slots;
}

// The name torch gives parameter `slot` of layer-direction i ("weight_hh_l0_reverse").
std::string param_key(const std::string& slot, int64_t i, int64_t D) {
  return slot + "_l" + std::to_string(i / D) + (i % D ? "_reverse" : "");
}

// `params` (a dict from torch's parameter names to arrays) by layer-direction and
// slot (None where absent); ValueError for a name no slot of this stack has.
template <typename Name>
std::vector<std::vector<py::object>> params_by_slot(py::handle params, const Name& what,
                                                    lstmfast::Mode mode, int64_t LD, int64_t D) {
  if (!py::isinstance<py::dict>(params))
    throw py::type_error(name_str(what) + ": expected a dict from parameter names to arrays, got " +
                         type_name(params));
  py::dict dict = py::reinterpret_borrow<py::dict>(params);
  const std::vector<std::string>& slots = param_slots(mode);
  std::vector<std::vector<py::object>> out(static_cast<size_t>(LD),
                                           std::vector<py::object>(slots.size(), py::none()));
  size_t found = 0;
  for (int64_t i = 0; i < LD; ++i)
    for (size_t j = 0; j < slots.size(); ++j) {
      const std::string key = param_key(slots[j], i, D);
      if (dict.contains(key)) {
        out[i][j] = dict[py::str(key)];
        ++found;
      }
    }
  if (found != dict.size())
    for (auto item : dict) {
      const std::string key = py::str(item.first);
      bool known = false;
      for (int64_t i = 0; i < LD && !known; ++i)
        for (const std::string& slot : slots) known = known || key == param_key(slot, i, D);
      if (!known)
        throw py::value_error(name_str(what) + ": '" + key + "' is not a parameter of this " +
                              lstmfast::cell_info(mode).name + " stack (L*D = " +
                              std::to_string(LD) + ")");
    }
  return out;
}

// `obj` as a dict with keys among `keys` only (None: empty), for the option arguments.
py::dict option_dict(py::handle obj, const char* what, std::initializer_list<const char*> keys) {
  if (obj.is_none()) return py::dict();
  if (!py::isinstance<py::dict>(obj))
    throw py::type_error(std::string(what) + ": expected a dict or None, got " + type_name(obj));
  py::dict dict = py::reinterpret_borrow<py::dict>(obj);
  for (auto item : dict) {
    const std::string key = py::str(item.first);
    bool known = false;
    for (const char* k : keys) known = known || key == k;
    if (!known) {
      std::string names;
      for (const char* k : keys) names += (names.empty() ? "'" : ", '") + std::string(k) + "'";
      throw py::value_error(std::string(what) + ": unknown option '" + key + "' (known: " + names +
                            ")");
    }
  }
  return dict;
}

// d[key], or None (borrowed: d keeps it alive).
py::handle option(const py::dict& d, const char* key) {
  PyObject* value = PyDict_GetItemString(d.ptr(), key);
  return value ? py::handle(value) : py::handle(Py_None);
}

// The cache of a training forward: the C++ cache and the arrays it points into.
struct RnnCache {
  std::unique_ptr<lstmfast::StackCacheBase> cache;
  lstmfast::StackShape shape;
  py::dtype dtype;
  std::vector<py::object> keep_alive;  // x, parameters, dropout masks
};

template <typename Name>
py::list as_list(py::handle obj, const Name& name, size_t length) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
    throw py::type_error(name_str(name) + ": expected a list, got " +
                         type_name(obj));
  py::list list = py::reinterpret_steal<py::list>(PySequence_List(obj.ptr()));
  if (!list) throw py::error_already_set();
  if (list.size() != length)
    throw py::value_error(name_str(name) + ": expected " + std::to_string(length) +
                          " entries, got " + std::to_string(list.size()));
  return list;
}

// Shapes of the parameters of layer-direction i (zeros: must be None): torch's
// five, then the peephole LSTM's three or LN_LSTM's four.
std::array<Dims, 9> param_shapes(const lstmfast::StackShape& s, int64_t i) {
  const int64_t GH = lstmfast::gates_of(s.mode) * s.H;
  if (s.mode == lstmfast::Mode::LN_LSTM)
    return {Dims{GH, s.input_size(i / s.D)}, Dims{GH, s.H_out()}, Dims{GH}, Dims{GH},
            Dims{s.P, s.H}, Dims{GH}, Dims{GH}, Dims{s.H}, Dims{s.H}};
  return {Dims{GH, s.input_size(i / s.D)}, Dims{GH, s.H_out()}, Dims{GH}, Dims{GH},
          Dims{s.P, s.H}, Dims{s.H}, Dims{s.H}, Dims{s.H}, Dims{}};
}

// Raises MemoryError with `message` (the GIL must be held).
[[noreturn]] void throw_memory_error(const std::string& message) {
  PyErr_SetString(PyExc_MemoryError, message.c_str());
  throw py::error_already_set();
}

std::string sizes_str(const lstmfast::StackShape& s) {
  return "T=" + std::to_string(s.T) + ", N=" + std::to_string(s.N) + ", I=" + std::to_string(s.I) +
         ", H=" + std::to_string(s.H) + ", P=" + std::to_string(s.P) + ", L=" + std::to_string(s.L) +
         ", D=" + std::to_string(s.D);
}

// Checks, before anything is copied or allocated, that the kernels' size arithmetic
// cannot go wrong: every dimension handed to the 32-bit BLAS fits in it (ValueError
// otherwise), and a generous bound on every workspace the kernels plan (the training
// cache, the scratch of forward and backward, each a sum of products of these sizes)
// fits in int64 with room to spare (MemoryError otherwise: no allocator could serve
// it). With both, no int64 product in the kernels overflows.
void check_sizes(const lstmfast::StackShape& s, int64_t real_size) {
  constexpr int64_t kBlasMax = std::numeric_limits<int32_t>::max();
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max() / 4;
  const int64_t G = lstmfast::gates_of(s.mode);
  bool overflow = false;
  auto mul = [&](int64_t a, int64_t b) {
    int64_t r = 0;
    overflow = overflow || __builtin_mul_overflow(a, b, &r) || r > kMax;
    return overflow ? kMax : r;
  };
  auto add = [&](int64_t a, int64_t b) {
    int64_t r = 0;
    overflow = overflow || __builtin_add_overflow(a, b, &r) || r > kMax;
    return overflow ? kMax : r;
  };
  const int64_t TN = mul(s.T, s.N), GH = mul(G, s.H), DH = mul(s.D, s.H);
  const std::pair<const char*, int64_t> blas_dims[] = {
      {"T*N (sequence length * batch size)", TN},
      {"G*H (gates * hidden_size)", GH},
      {"I (input_size)", s.I},
      {"D*H (directions * hidden_size)", DH}};
  for (const auto& [what, value] : blas_dims)
    if (!overflow && value > kBlasMax)
      throw py::value_error(what + std::string(" = ") + std::to_string(value) +
                            " exceeds the 32-bit BLAS interface (at most " +
                            std::to_string(kBlasMax) + "); got " + sizes_str(s));
  // Elements per batch row and step, over-counting every per-step buffer.
  const int64_t width = add(add(mul(4, GH), mul(8, s.H)), add(mul(3, DH), s.I));
  const int64_t per_slice = add(add(mul(add(s.T, 2), mul(s.N, width)), mul(GH, s.H)),
                                add(mul(s.H, s.H), add(GH, 1024)));
  const int64_t slices = add(mul(s.L, s.D), add(s.L, 4));
  mul(real_size, mul(slices, per_slice));
  if (overflow)
    throw_memory_error("the workspace for " + sizes_str(s) +
                       " would exceed the 64-bit address space");
}

const char* precision_name(lstmfast::Precision p) {
  return p == lstmfast::Precision::Int8 ? "int8" : "bfloat16";
}

// A reduced-precision weight standing for a float weight of the given shape:
// float32 inference only (ValueError naming the parameter otherwise).
template <typename Real>
const lstmfast::ReducedMatrix* checked_reduced(py::handle obj, const std::string& name,
                                               const Dims& shape,
                                               const lstmfast::StackShape& s) {
  const auto& r = obj.cast<const lstmfast::ReducedMatrix&>();
  if (!std::is_same<Real, float>::value)
    throw py::type_error(name + ": " + precision_name(r.precision) +
                         " weights need float32 inputs, got x of dtype float64");
  if (s.training)
    throw py::value_error(name + ": " + precision_name(r.precision) +
                          " weights are for inference only; pass training=False");
  if (shape != std::vector<int64_t>{r.M, r.K})
    throw py::value_error(name + ": expected shape " + dims_str(shape) + ", got " +
                          precision_name(r.precision) + " weights of shape " +
                          shape_str({r.M, r.K}));
  return &r;
}

// A float weight packed once for the fused kernels (lstmfast.freeze): the panels, and
// a read-only copy of the weight that only this object holds, which the paths that
// read W as it lies use and which Python gets back as `weight` (the frozen layer's
// parameter). Both stay as they were made: the panels cannot go stale.
struct PackedWeight {
  py::array weight;  // float32 or float64, C-contiguous, not writeable
  lstmfast::Mode mode = lstmfast::Mode::LSTM;
  bool double_precision = false;  // weight's dtype, kept: asking numpy costs a call
  bool recurrent = false;         // weight_hh, else weight_ih
  lstmfast::PackedGates<float> f32;  // the one of weight's dtype
  lstmfast::PackedGates<double> f64;

  template <typename Real>
  const lstmfast::PackedGates<Real>& get() const {
    if constexpr (std::is_same<Real, float>::value)
      return f32;
    else
      return f64;
  }
  int64_t nbytes() const { return double_precision ? f64.nbytes() : f32.nbytes(); }
};

// Whether obj is a PackedWeight: its exact type, as nothing derives from it; cheaper
// than py::isinstance, which looks the class up by its C++ type (a frozen cell's
// one-step call checks both weights: py::isinstance there cost about 0.5 us a call).
bool is_packed_weight(py::handle obj) {
  static PyTypeObject* const type =
      reinterpret_cast<PyTypeObject*>(py::type::of<PackedWeight>().ptr());
  return Py_TYPE(obj.ptr()) == type;
}

// A packed weight standing for W_ih (recurrent false) or W_hh of the given shape in a
// call of mode s.mode and dtype Real (TypeError or ValueError naming the parameter
// otherwise); its float weight as the kernels read it.
template <typename Real>
py::array_t<Real, py::array::c_style> checked_packed(const PackedWeight& p, const std::string& name,
                                                     bool recurrent, const Dims& shape,
                                                     const lstmfast::StackShape& s) {
  const char* role[2] = {"weight_ih", "weight_hh"};
  if (p.recurrent != recurrent)
    throw py::value_error(name + ": expected " + role[recurrent] + " packed by pack_gates, got " +
                          role[p.recurrent] + " packed as such");
  const lstmfast::CellInfo& packed = lstmfast::cell_info(p.mode);
  const lstmfast::CellInfo& cell = lstmfast::cell_info(s.mode);
  if (packed.gates != cell.gates || (recurrent && packed.first_gates != cell.first_gates))
    throw py::value_error(name + ": packed for a " + packed.name + " layer, whose gates this " +
                          cell.name + " call does not share");
  return checked<Real>(p.weight, [&] { return name + " (packed)"; }, shape);
}

// The parameters come as a dict (weights_obj), or already by layer-direction and slot
// (by_slot: cell_step's).
template <typename Real>
py::tuple rnn_forward(lstmfast::StackShape s, const py::array& x_obj, py::handle h0_obj,
                      py::handle c0_obj, py::handle weights_obj,
                      const std::vector<std::vector<py::object>>* by_slot, py::handle lengths_obj,
                      py::handle masks_obj, py::handle noise_obj, py::handle rec_masks_obj,
                      py::handle zoneout_obj, py::handle zoneout_seed_obj) {
  const bool lstm = s.mode == lstmfast::Mode::LSTM;
  const bool cell_state = lstmfast::has_cell_state(s.mode);
  const int G = lstmfast::gates_of(s.mode);
  if (x_obj.ndim() != 3)
    throw py::value_error("x: expected 3 dimensions (T, N, I), got shape " +
                          shape_str(shape_of(x_obj)));
  s.T = x_obj.shape(0);
  s.N = x_obj.shape(1);
  s.I = x_obj.shape(2);
  const int64_t LD = s.L * s.D;
  const std::vector<std::string>& slots = param_slots(s.mode);
  std::vector<std::vector<py::object>> from_dict;
  if (!by_slot) from_dict = params_by_slot(weights_obj, "params", s.mode, LD, s.D);
  const std::vector<std::vector<py::object>>& weights = by_slot ? *by_slot : from_dict;
  auto param_name = [&](int64_t i, size_t j) {
    return "params['" + param_key(slots[j], i, s.D) + "']";
  };
  // H from weight_hh_l0: (G*H, H_out).
  {
    const py::object& first = weights[0][1];
    int64_t rows = -1;
    if (py::isinstance<py::array>(first)) {  // first: an array is a C check, a class a lookup
      if (py::array(first).ndim() == 2) rows = py::array(first).shape(0);
    } else if (py::isinstance<lstmfast::ReducedMatrix>(first)) {
      rows = first.cast<const lstmfast::ReducedMatrix&>().M;
    } else if (is_packed_weight(first)) {
      rows = first.cast<const PackedWeight&>().weight.shape(0);  // 2-D, as pack_gates made it
    }
    if (rows < 0 || rows % G != 0)
      throw py::value_error(param_name(0, 1) + ": expected a 2-D array of G*H rows");
    s.H = rows / G;
  }
  if (s.P < 0 || (s.P > 0 && (!lstm || s.P >= s.H)))
    throw py::value_error("proj_size = " + std::to_string(s.P) +
                          ": must be 0, or for LSTM in 1..hidden_size-1");
  check_sizes(s, sizeof(Real));
  auto x = checked<Real>(x_obj, "x", {s.T, s.N, s.I});
  // What the forward reads must outlive it: the caller holds the arrays it passed,
  // this call the copies it made of them (a layout the kernels cannot read), and a
  // training call's cache both, as backward reads them again.
  std::unique_ptr<RnnCache> rc = s.training ? std::make_unique<RnnCache>() : nullptr;
  std::vector<py::object> copies;
  auto keep = [&](py::handle given, py::object array) {
    if (rc)
      rc->keep_alive.push_back(std::move(array));
    else if (!array.is(given))
      copies.push_back(std::move(array));
  };
  keep(x_obj, x);
  std::vector<lstmfast::Params<Real>> params(static_cast<size_t>(LD));
  const size_t extra_from = 5, optional_from = extra_from +
      list_length(lstmfast::cell_info(s.mode).extra_params);
  for (int64_t i = 0; i < LD; ++i) {
    const std::vector<py::object>& entry = weights[i];
    const auto shapes = param_shapes(s, i);
    const Real* ptr[9] = {};
    const lstmfast::ReducedMatrix* reduced[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    const lstmfast::PackedGates<Real>*packed_ih = nullptr, *packed_hh = nullptr;
    for (size_t j = 0; j < slots.size(); ++j) {
      // biases and the optional parameters (peepholes) may be absent
      const bool required = j < 2 || (j == 4 && s.P > 0) || (j >= extra_from && j < optional_from);
      if (entry[j].is_none()) {
        if (required) throw py::value_error(param_name(i, j) + ": missing");
        continue;
      }
      if (j == 4 && s.P == 0)
        throw py::value_error(param_name(i, j) + ": given but proj_size is 0");
      if ((j == 2 || j == 3) && s.mode == lstmfast::Mode::LN_LSTM)
        throw py::value_error(param_name(i, j) +
                              ": LN_LSTM has no linear biases (its layer norms' biases take their "
                              "place); pass None");
      if (j < 2 && is_packed_weight(entry[j])) {
        const PackedWeight& p = entry[j].cast<const PackedWeight&>();
        auto a = checked_packed<Real>(p, param_name(i, j), j == 1, shapes[j], s);
        ptr[j] = a.data();
        (j == 0 ? packed_ih : packed_hh) = &p.get<Real>();
        keep(entry[j], entry[j]);
        continue;
      }
      if ((j == 0 || j == 1 || j == 4) && !py::isinstance<py::array>(entry[j]) &&
          py::isinstance<lstmfast::ReducedMatrix>(entry[j])) {
        reduced[j] = checked_reduced<Real>(entry[j], param_name(i, j), shapes[j], s);
        keep(entry[j], entry[j]);
        continue;
      }
      auto a = checked<Real>(entry[j], [&] { return param_name(i, j); }, shapes[j]);
      ptr[j] = a.data();
      keep(entry[j], a);
    }
    const bool any = reduced[0] || reduced[1] || reduced[4];
    if (any && (!reduced[0] || !reduced[1] || (s.P > 0 && !reduced[4])))
      throw py::type_error(param_name(i, reduced[0] ? 1 : 0) +
                           ": expected a reduced-precision weight like the others of the layer, "
                           "got a numpy array");
    if (s.mode == lstmfast::Mode::LN_LSTM) {
      params[i] = {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], reduced[0], reduced[1], reduced[4]};
      params[i].ln_g_w = ptr[5];
      params[i].ln_g_b = ptr[6];
      params[i].ln_c_w = ptr[7];
      params[i].ln_c_b = ptr[8];
    } else {
      params[i] = {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], reduced[0], reduced[1], reduced[4],
                   ptr[5], ptr[6], ptr[7]};
    }
    params[i].W_ih_p = packed_ih;
    params[i].W_hh_p = packed_hh;
  }
  auto h0 = checked<Real>(h0_obj, "h0", {LD, s.N, s.H_out()});
  py::array_t<Real, py::array::c_style> c0;
  const Real* c0_ptr = nullptr;
  if (cell_state) {
    c0 = checked<Real>(c0_obj, "c0", {LD, s.N, s.H});
    c0_ptr = c0.data();
  } else if (!c0_obj.is_none()) {
    throw py::value_error("c0: only an LSTM has a cell state; pass None");
  }
  py::array_t<int64_t, py::array::c_style> lengths;
  const int64_t* lengths_ptr = nullptr;
  if (!lengths_obj.is_none()) {
    py::array l = py::array::ensure(lengths_obj);
    if (!l || (l.dtype().kind() != 'i' && l.dtype().kind() != 'u'))
      throw py::type_error("lengths: expected an integer array");
    if (shape_of(l) != std::vector<int64_t>{s.N})
      throw py::value_error("lengths: expected shape " + shape_str({s.N}) + ", got " +
                            shape_str(shape_of(l)));
    lengths = c_contiguous<int64_t, py::array::c_style | py::array::forcecast>(l);
    lengths_ptr = lengths.data();
  }
  std::vector<const Real*> masks;
  if (!masks_obj.is_none() && s.L > 1) {
    py::list list = as_list(masks_obj, "dropout_masks", static_cast<size_t>(s.L - 1));
    for (int64_t k = 0; k + 1 < s.L; ++k) {
      auto m = checked<Real>(list[k], "dropout_masks[" + std::to_string(k) + "]",
                             {s.T, s.N, s.D * s.H_out()});
      masks.push_back(m.data());
      keep(list[k], m);
    }
  }

  // CTRNN noise: read by the forward only, so not kept alive with the cache.
  py::array_t<Real, py::array::c_style> noise;
  if (!noise_obj.is_none()) {
    if (!lstmfast::is_ctrnn(s.mode))
      throw py::value_error("noise: only a CTRNN takes noise; pass None");
    noise = checked<Real>(noise_obj, "noise", {LD, s.T, s.N, s.H});
    for (int64_t i = 0; i < LD; ++i) params[i].noise = noise.data() + i * s.T * s.N * s.H;
  }

  // Recurrent dropout: kept alive with the cache, as backward reads the masks again.
  if (!rec_masks_obj.is_none()) {
    auto rec = checked<Real>(rec_masks_obj, "recurrent_dropout_masks", {LD, s.N, s.H_out()});
    for (int64_t i = 0; i < LD; ++i) params[i].rec_mask = rec.data() + i * s.N * s.H_out();
    keep(rec_masks_obj, rec);
  }

  // Zoneout: (m_h, m_c), each None, a probability (the same for every unit: eval) or
  // masks (L*D, T, N, width), kept with the cache (backward reads them again).
  if (!zoneout_obj.is_none()) {
    py::list pair = as_list(zoneout_obj, "zoneout_masks", 2);
    const char* names[2] = {"zoneout_masks[0]", "zoneout_masks[1]"};
    const int64_t widths[2] = {s.H_out(), s.H};
    for (int which = 0; which < 2; ++which) {
      py::handle m = pair[which];
      if (m.is_none()) continue;
      if (which == 1 && !cell_state)
        throw py::value_error("zoneout_masks[1]: only an LSTM has a cell state; pass None");
      if (py::isinstance<py::float_>(m) || py::isinstance<py::int_>(m)) {
        const double p = m.cast<double>();
        if (!(p >= 0 && p <= 1))
          throw py::value_error(std::string(names[which]) + ": a probability must be in [0, 1], got " +
                                std::to_string(p));
        (which == 0 ? s.zone_p_h : s.zone_p_c) = p;
        continue;
      }
      auto a = checked<Real>(m, names[which], {LD, s.T, s.N, widths[which]});
      for (int64_t i = 0; i < LD; ++i)
        (which == 0 ? params[i].zone_h : params[i].zone_c) = a.data() + i * s.T * s.N * widths[which];
      keep(m, a);
    }
  }

  if (!zoneout_seed_obj.is_none()) {
    if (!py::isinstance<py::int_>(zoneout_seed_obj))
      throw py::type_error("zoneout_seed: expected an int, got " + type_name(zoneout_seed_obj));
    if (zoneout_obj.is_none() || params[0].zone_h || params[0].zone_c)
      throw py::value_error("zoneout_seed: draws masks with the probabilities of zoneout_masks "
                            "(numbers, not arrays)");
    const uint64_t seed = zoneout_seed_obj.cast<uint64_t>();
    s.zone_hashed = true;
    for (int64_t i = 0; i < LD; ++i) params[i].zone_seed = lstmfast::zoneout_layer_seed(seed, i);
  }

  py::array_t<Real> y({s.T, s.N, s.D * s.H_out()});
  py::array_t<Real> h_n({LD, s.N, s.H_out()});
  py::array_t<Real> c_n({cell_state ? LD : 0, s.N, s.H});
  std::unique_ptr<lstmfast::StackCache<Real>> cache;
  try {
    py::gil_scoped_release release;
    cache = lstmfast::stack_forward<Real>(
        y.mutable_data(), h_n.mutable_data(), cell_state ? c_n.mutable_data() : nullptr, x.data(),
        h0.data(), c0_ptr, params.data(), lengths_ptr, masks.empty() ? nullptr : masks.data(), s);
  } catch (const std::bad_alloc&) {
    throw_memory_error("rnn_forward: cannot allocate the workspace for " + sizes_str(s) +
                       (s.training ? " (training)" : " (inference)"));
  }
  py::object cache_obj = py::none();
  if (cache && rc) {  // a training call's
    rc->shape = s;
    rc->dtype = py::dtype::of<Real>();
    rc->cache = std::move(cache);
    cache_obj = py::cast(std::move(rc));
  }
  return py::make_tuple(y, h_n, cell_state ? py::object(c_n) : py::none(), cache_obj);
}

// rnn_backward(..., gate_grads=True): the gate gradients and the states the steps
// read (lstmfast::GateGrads) in place of the parameter gradients.
template <typename Real>
py::tuple gate_grads_backward(const RnnCache& rc, lstmfast::StackCache<Real>& cache,
                              const Real* dy, const Real* dh_n, const Real* dc_n,
                              py::handle grads_obj, bool consume, bool input_grad) {
  const lstmfast::StackShape& s = rc.shape;
  if (!grads_obj.is_none())
    throw py::value_error("grads: must be None with gate_grads=True (no parameter gradient is "
                          "computed)");
  if (consume) throw py::value_error("consume: must be False with gate_grads=True");
  if (!lstmfast::hands_back_gate_grads(cache))
    throw py::value_error(
        "gate_grads=True: this forward's backward cannot hand back gate gradients (it needs one "
        "layer and direction walked forward, of an LSTM without projection or peepholes, a GRU "
        "or an RNN, without lengths or regularizers: see RnnCache.hands_back_gate_grads)");
  const bool cell_state = lstmfast::has_cell_state(s.mode);
  const int64_t GH = lstmfast::cell_info(s.mode).gates * s.H;
  py::array_t<Real> dx(input_grad ? std::vector<int64_t>{s.T, s.N, s.I} : std::vector<int64_t>{0});
  py::array_t<Real> dh0({int64_t(1), s.N, s.H});
  py::array_t<Real> dc0({cell_state ? int64_t(1) : int64_t(0), s.N, s.H});
  py::array_t<Real> input({s.T, s.N, GH});
  // Only the GRU's recurrent gate gradients differ from the input side's (r scales W_hn h).
  const bool split = s.mode == lstmfast::Mode::GRU;
  py::array_t<Real> recurrent(split ? std::vector<int64_t>{s.T, s.N, GH} : std::vector<int64_t>{0});
  py::array_t<Real> h_prev({s.T, s.N, s.H});
  lstmfast::GateGrads<Real> out{input.mutable_data(), split ? recurrent.mutable_data() : nullptr,
                                h_prev.mutable_data()};
  try {
    py::gil_scoped_release release;
    lstmfast::stack_backward<Real>(input_grad ? dx.mutable_data() : nullptr, dh0.mutable_data(),
                                   cell_state ? dc0.mutable_data() : nullptr, nullptr, dy, dh_n,
                                   dc_n, cache, false, false, &out);
  } catch (const std::bad_alloc&) {
    throw_memory_error("rnn_backward: cannot allocate the workspace for " + sizes_str(s));
  }
  return py::make_tuple(input_grad ? py::object(dx) : py::none(), dh0,
                        cell_state ? py::object(dc0) : py::none(), input,
                        split ? py::object(recurrent) : py::none(), h_prev);
}

template <typename Real>
py::tuple rnn_backward(const RnnCache& rc, py::handle dy_obj, py::handle dh_n_obj,
                       py::handle dc_n_obj, py::handle grads_obj, bool consume, bool assign,
                       bool input_grad, bool gate_grads) {
  const lstmfast::StackShape& s = rc.shape;
  const bool cell_state = lstmfast::has_cell_state(s.mode);
  const int64_t LD = s.L * s.D;
  // Each gradient may be None (zeros): the kernels then get a null pointer.
  py::array_t<Real, py::array::c_style> dy, dh_n, dc_n;
  const Real *dy_ptr = nullptr, *dh_n_ptr = nullptr, *dc_n_ptr = nullptr;
  if (!dy_obj.is_none()) {
    dy = checked<Real>(dy_obj, "d_output", {s.T, s.N, s.D * s.H_out()});
    dy_ptr = dy.data();
  }
  if (!dh_n_obj.is_none()) {
    dh_n = checked<Real>(dh_n_obj, "d_h_n", {LD, s.N, s.H_out()});
    dh_n_ptr = dh_n.data();
  }
  if (!dc_n_obj.is_none()) {
    if (!cell_state) throw py::value_error("d_c_n: only an LSTM has a cell state; pass None");
    dc_n = checked<Real>(dc_n_obj, "d_c_n", {LD, s.N, s.H});
    dc_n_ptr = dc_n.data();
  }
  auto* cache = static_cast<lstmfast::StackCache<Real>*>(rc.cache.get());
  if (gate_grads) return gate_grads_backward<Real>(rc, *cache, dy_ptr, dh_n_ptr, dc_n_ptr, grads_obj,
                                                   consume, input_grad);
  const std::vector<std::string>& slots = param_slots(s.mode);
  const auto grads = params_by_slot(grads_obj, "grads", s.mode, LD, s.D);
  std::vector<lstmfast::Grads<Real>> g(static_cast<size_t>(LD));
  for (int64_t i = 0; i < LD; ++i) {
    const lstmfast::Params<Real>& p = cache->params[i];
    const bool ln = s.mode == lstmfast::Mode::LN_LSTM;
    const std::vector<py::object>& entry = grads[i];
    const auto shapes = param_shapes(s, i);
    const void* given[9] = {p.W_ih, p.W_hh, p.b_ih, p.b_hh, p.W_hr, p.P_i, p.P_f, p.P_o, nullptr};
    if (ln) {
      given[5] = p.ln_g_w;
      given[6] = p.ln_g_b;
      given[7] = p.ln_c_w;
      given[8] = p.ln_c_b;
    }
    Real* ptr[9] = {};
    for (size_t j = 0; j < slots.size(); ++j) {
      const std::string name = "grads['" + param_key(slots[j], i, s.D) + "']";
      if (!given[j]) {
        if (!entry[j].is_none()) throw py::value_error(name + ": the forward had no such parameter");
        continue;
      }
      if (entry[j].is_none()) throw py::value_error(name + ": missing");
      auto a = checked<Real>(entry[j], name, shapes[j]);
      if (!a.is(entry[j]) || !a.writeable())
        throw py::value_error(name + ": must be a writeable C-contiguous array (written in place)");
      ptr[j] = a.mutable_data();
    }
    if (ln) {
      g[i] = {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4]};
      g[i].dln_g_w = ptr[5];
      g[i].dln_g_b = ptr[6];
      g[i].dln_c_w = ptr[7];
      g[i].dln_c_b = ptr[8];
    } else {
      g[i] = {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7]};
    }
  }
  py::array_t<Real> dx(input_grad ? std::vector<int64_t>{s.T, s.N, s.I} : std::vector<int64_t>{0});
  py::array_t<Real> dh0({LD, s.N, s.H_out()});
  py::array_t<Real> dc0({cell_state ? LD : 0, s.N, s.H});
  try {
    py::gil_scoped_release release;
    lstmfast::stack_backward<Real>(input_grad ? dx.mutable_data() : nullptr, dh0.mutable_data(),
                                   cell_state ? dc0.mutable_data() : nullptr, g.data(),
                                   dy_ptr, dh_n_ptr, dc_n_ptr, *cache, consume, assign);
  } catch (const std::bad_alloc&) {
    throw_memory_error("rnn_backward: cannot allocate the workspace for " + sizes_str(s));
  }
  return py::make_tuple(input_grad ? py::object(dx) : py::none(), dh0,
                        cell_state ? py::object(dc0) : py::none());
}

// Reduced-precision weights (lstmfast.quantize): packing and a product test hook;
// float weights packed once (lstmfast.freeze).
void register_reduced(py::module_& m) {
  py::class_<PackedWeight>(
      m, "PackedWeight",
      "A float weight_ih or weight_hh packed once for the fused kernels of the instruction set "
      "in use (made by pack_gates); pass it to rnn_forward or cell_step in place of the weight. "
      "Kernels of another instruction set read `weight` instead.")
      .def_property_readonly("weight", [](const PackedWeight& p) { return p.weight; },
                             "The weight packed: a read-only copy of the array given.")
      .def_property_readonly("shape", [](const PackedWeight& p) {
        return py::make_tuple(p.weight.shape(0), p.weight.shape(1));
      })
      .def_property_readonly("dtype", [](const PackedWeight& p) { return p.weight.dtype(); })
      .def_property_readonly("mode", [](const PackedWeight& p) {
        return std::string(lstmfast::cell_info(p.mode).name);
      })
      .def_readonly("recurrent", &PackedWeight::recurrent)
      .def_property_readonly("target", [](const PackedWeight& p) {
        const void* kernels = p.double_precision ? p.f64.kernels : p.f32.kernels;
        return std::string(static_cast<const lstmfast::KernelTable*>(kernels)->name);
      }, "The kernels whose layout the panels have (their build: generic, avx2 or avx512).")
      .def_property_readonly("nbytes", &PackedWeight::nbytes, "Bytes of the panels.");

  m.def(
      "pack_gates",
      [](const std::string& mode, py::handle weight_obj, bool recurrent) {
        PackedWeight p;
        p.mode = parse_mode(mode);
        p.recurrent = recurrent;
        const char* name = recurrent ? "weight_hh" : "weight_ih";
        if (!py::isinstance<py::array>(weight_obj))
          throw py::type_error(std::string(name) + ": expected a numpy array, got " +
                               type_name(weight_obj));
        py::array w = py::reinterpret_borrow<py::array>(weight_obj);
        const bool f64 = w.dtype().equal(py::dtype::of<double>());
        p.double_precision = f64;
        if (w.ndim() != 2 || !(f64 || w.dtype().equal(py::dtype::of<float>())))
          throw py::type_error(std::string(name) +
                               ": expected a 2-D float32 or float64 array, got " +
                               std::to_string(w.ndim()) + "-D " + std::string(py::str(w.dtype())));
        const int64_t M = w.shape(0), K = w.shape(1), G = lstmfast::gates_of(p.mode);
        if (M < 1 || K < 1 || M % G != 0)
          throw py::value_error(std::string(name) + ": expected " + std::to_string(G) +
                                "*H rows (the gates of " + mode + ") and at least one column, " +
                                "got shape " + shape_str({M, K}));
        // A copy of its own: no one else can write what the panels were made of.
        p.weight = py::module_::import("numpy").attr("array")(w, py::arg("order") = "C");
        py::setattr(p.weight.attr("flags"), "writeable", py::bool_(false));
        {
          py::gil_scoped_release release;
          if (f64)
            p.f64 = lstmfast::pack_gates<double>(p.mode, recurrent,
                                                 static_cast<const double*>(p.weight.data()), M, K);
          else
            p.f32 = lstmfast::pack_gates<float>(p.mode, recurrent,
                                                static_cast<const float*>(p.weight.data()), M, K);
        }
        return p;
      },
      py::arg("mode"), py::arg("weight"), py::arg("recurrent"),
      "Packs weight_ih (recurrent=False) or weight_hh of a layer of `mode` once, for the fused "
      "kernels in use; the PackedWeight keeps a read-only copy of it.");

  py::class_<lstmfast::ReducedMatrix>(
      m, "ReducedWeight",
      "A weight packed in int8 or bfloat16 for inference (made by pack_int8 or pack_bfloat16); "
      "pass it to rnn_forward in place of the float32 weight it stands for.")
      .def_property_readonly("precision",
                             [](const lstmfast::ReducedMatrix& r) { return precision_name(r.precision); })
      .def_property_readonly("shape", [](const lstmfast::ReducedMatrix& r) {
        return py::make_tuple(r.M, r.K);
      })
      .def_property_readonly("nbytes", &lstmfast::ReducedMatrix::nbytes);

  m.def(
      "pack_int8",
      [](const py::array& q_obj, const py::array& scale_obj) {
        if (!q_obj.dtype().equal(py::dtype::of<int8_t>()) || q_obj.ndim() != 2)
          throw py::type_error("q: expected a 2-D int8 array, got " + std::to_string(q_obj.ndim()) +
                               "-D " + std::string(py::str(q_obj.dtype())));
        const int64_t M = q_obj.shape(0), K = q_obj.shape(1);
        if (M < 1 || K < 1)
          throw py::value_error("q: expected a non-empty matrix, got shape " + shape_str({M, K}));
        auto q = c_contiguous<int8_t>(q_obj);
        auto scale = checked<float>(scale_obj, "scale", {M});
        for (int64_t m = 0; m < M; ++m)
          if (!(scale.data()[m] > 0.0f) || !(scale.data()[m] < 3.0e38f))
            throw py::value_error("scale: expected positive finite values, got " +
                                  std::to_string(scale.data()[m]) + " at row " + std::to_string(m));
        py::gil_scoped_release release;
        return lstmfast::pack_int8(q.data(), scale.data(), M, K);
      },
      py::arg("q"), py::arg("scale"),
      "Packs W = scale[:, None] * q (q: (M, K) int8, scale: (M,) float32) for the int8 kernels.");
  m.def(
      "pack_bfloat16",
      [](const py::array& bits_obj) {
        if (!bits_obj.dtype().equal(py::dtype::of<uint16_t>()) || bits_obj.ndim() != 2)
          throw py::type_error("bits: expected a 2-D uint16 array of bfloat16 bit patterns, got " +
                               std::to_string(bits_obj.ndim()) + "-D " +
                               std::string(py::str(bits_obj.dtype())));
        const int64_t M = bits_obj.shape(0), K = bits_obj.shape(1);
        if (M < 1 || K < 1)
          throw py::value_error("bits: expected a non-empty matrix, got shape " + shape_str({M, K}));
        auto bits = c_contiguous<uint16_t>(bits_obj);
        py::gil_scoped_release release;
        return lstmfast::pack_bf16(bits.data(), M, K);
      },
      py::arg("bits"),
      "Packs W (M, K) given as bfloat16 bit patterns (the upper halves of float32) for the "
      "bfloat16 kernels.");
  m.def(
      "_reduced_matmul",
      [](const py::array& a_obj, const lstmfast::ReducedMatrix& w, int threads) {
        if (a_obj.ndim() != 2)
          throw py::value_error("a: expected a 2-D array, got " + std::to_string(a_obj.ndim()) + "-D");
        const int64_t n = a_obj.shape(0);
        auto a = checked<float>(a_obj, "a", {n, w.K});
        py::array_t<float> c({n, w.M});
        std::vector<uint8_t> act_q(static_cast<size_t>(n * w.K_padded));
        std::vector<float> act_scale(static_cast<size_t>(n));
        std::vector<int32_t> act_zero(static_cast<size_t>(n));
        std::vector<uint16_t> act_bf16(static_cast<size_t>(n * w.K_padded));
        lstmfast::ActivationScratch act;
        act.q = act_q.data();
        act.scale = act_scale.data();
        act.zero = act_zero.data();
        act.bf16 = act_bf16.data();
        const float* pa = a.data();
        float* pc = c.mutable_data();
        if (n > 0) {
          py::gil_scoped_release release;
          lstmfast::kernels().reduced_product(pc, w.M, pa, w, n, lstmfast::reduced_products(), act,
                                              threads);
        }
        return c;
      },
      py::arg("a"), py::arg("w"), py::arg("threads") = 1,
      "Test hook: a @ W.T with the reduced weight w, by the current instruction set's kernel.");
}

// "a,b,c" as ["a", "b", "c"] ("" as []).
py::list split_names(const char* names) {
  py::list out;
  for (const std::string& name : split_list(names)) out.append(name);
  return out;
}

// The cell table (lstmfast.h, CellInfo) as Python reads it: lstmfast/_cells.py.
void register_cells(py::module_& m) {
  m.def(
      "cells",
      []() {
        py::list out;
        for (int i = 0; i < lstmfast::kModes; ++i) {
          const lstmfast::CellInfo& c = lstmfast::cell_info(lstmfast::Mode(i));
          py::dict d;
          d["name"] = c.name;
          d["gates"] = c.gates;
          d["cell_state"] = c.cell_state;
          d["relu"] = c.relu;
          d["continuous_time"] = c.continuous_time;
          d["extra_params"] = split_names(c.extra_params);
          d["optional_params"] = split_names(c.optional_params);
          d["features"] = split_names(c.features);
          out.append(d);
        }
        return out;
      },
      "The cells the kernels run, one dict each, in the order of the C++ Mode: name, gates "
      "(G), cell_state, relu, continuous_time, extra_params and optional_params (parameter "
      "names beyond torch's, without the _l{k} suffix), features (among projection, "
      "zoneout, recurrent_dropout, int8, bfloat16, onnx_gates).");
}

void register_rnn(py::module_& m) {
  py::class_<RnnCache>(m, "RnnCache",
                       "What a training forward keeps for backward (opaque; pass it to "
                       "rnn_backward, which may be called more than once unless consume=True).")
      .def_property_readonly("nbytes", [](const RnnCache& c) { return c.cache->nbytes(); })
      .def_property_readonly("dtype", [](const RnnCache& c) { return c.dtype; })
      .def_property_readonly(
          "hands_back_gate_grads",
          [](const RnnCache& c) {
            if (c.dtype.equal(py::dtype::of<float>()))
              return lstmfast::hands_back_gate_grads(
                  *static_cast<lstmfast::StackCache<float>*>(c.cache.get()));
            return lstmfast::hands_back_gate_grads(
                *static_cast<lstmfast::StackCache<double>*>(c.cache.get()));
          },
          "Whether rnn_backward(..., gate_grads=True) serves: one layer and direction walked "
          "forward, of an LSTM without projection or peepholes, a GRU or an RNN, without "
          "lengths or regularizers.");

  m.def(
      "rnn_forward",
      [](const std::string& mode, py::handle x, py::handle h0, py::handle c0, py::handle params,
         int64_t num_layers, bool bidirectional, bool reverse, int64_t proj_size,
         py::handle lengths, py::handle dropout_masks, bool training, py::handle cell_options_obj,
         py::handle regularizers_obj) {
        lstmfast::StackShape s;
        s.mode = parse_mode(mode);
        const py::dict cell_options = option_dict(
            cell_options_obj, "cell_options",
            {"alpha", "leak", "noise", "layer_norm_eps", "clip", "input_forget", "hard_sigmoid"});
        const py::dict regularizers = option_dict(
            regularizers_obj, "regularizers",
            {"recurrent_dropout_masks", "zoneout_masks", "zoneout_seed"});
        auto number = [&](const char* key, double fallback) {
          py::handle v = option(cell_options, key);
          if (v.is_none()) return fallback;
          if (!py::isinstance<py::float_>(v) && !py::isinstance<py::int_>(v))
            throw py::type_error(std::string("cell_options['") + key + "']: expected a number, got " +
                                 type_name(v));
          return v.cast<double>();
        };
        const double alpha = number("alpha", 1.0), layer_norm_eps = number("layer_norm_eps", 1e-5);
        py::handle leak_obj = option(cell_options, "leak");
        if (!leak_obj.is_none() && !py::isinstance<py::str>(leak_obj))
          throw py::type_error("cell_options['leak']: expected a str, got " + type_name(leak_obj));
        const std::string leak = leak_obj.is_none() ? "outside" : leak_obj.cast<std::string>();
        py::handle noise = option(cell_options, "noise");
        py::handle recurrent_dropout_masks = option(regularizers, "recurrent_dropout_masks");
        py::handle zoneout_masks = option(regularizers, "zoneout_masks");
        py::handle zoneout_seed = option(regularizers, "zoneout_seed");
        if (leak != "outside" && leak != "inside")
          throw py::value_error("leak must be 'outside' or 'inside', got '" + leak + "'");
        if (!(alpha > 0 && alpha <= 1))
          throw py::value_error("alpha must be in (0, 1], got " + std::to_string(alpha));
        s.alpha = alpha;
        s.leak_inside = leak == "inside";
        if (!(layer_norm_eps > 0))
          throw py::value_error("layer_norm_eps must be > 0, got " + std::to_string(layer_norm_eps));
        s.ln_eps = layer_norm_eps;
        // ONNX's options: clip, input_forget, hard_sigmoid (alpha, beta)
        const double clip = number("clip", 0.0);
        if (!(clip >= 0))
          throw py::value_error("cell_options['clip'] must be > 0 (or None), got " +
                                std::to_string(clip));
        s.gates.clip = clip;
        py::handle input_forget = option(cell_options, "input_forget");
        if (!input_forget.is_none() && !py::isinstance<py::bool_>(input_forget))
          throw py::type_error("cell_options['input_forget']: expected a bool, got " +
                               type_name(input_forget));
        s.gates.input_forget = !input_forget.is_none() && input_forget.cast<bool>();
        py::handle hard = option(cell_options, "hard_sigmoid");
        if (!hard.is_none()) {
          if (!py::isinstance<py::tuple>(hard) || py::len(hard) != 2)
            throw py::type_error("cell_options['hard_sigmoid']: expected (alpha, beta), got " +
                                 type_name(hard));
          s.gates.hard_sigmoid = true;
          s.gates.hs_alpha = hard.cast<py::tuple>()[0].cast<double>();
          s.gates.hs_beta = hard.cast<py::tuple>()[1].cast<double>();
        }
        s.gates.onnx = s.gates.clip > 0 || s.gates.input_forget || s.gates.hard_sigmoid;
        if (s.gates.onnx && !lstmfast::cell_supports(s.mode, "onnx_gates"))
          throw py::value_error(std::string("cell_options: clip, input_forget and hard_sigmoid "
                                            "are not in the kernels of ") + mode);
        if (s.gates.input_forget && s.mode != lstmfast::Mode::LSTM)
          throw py::value_error("cell_options['input_forget']: only the LSTM couples its gates");
        s.L = num_layers;
        s.D = bidirectional ? 2 : 1;
        if (reverse && bidirectional)
          throw py::value_error("reverse: a bidirectional stack already runs both ways");
        s.reverse = reverse;
        s.P = proj_size;
        s.training = training;
        if (num_layers < 1 || num_layers > std::numeric_limits<int32_t>::max())
          throw py::value_error("num_layers must be in 1..2147483647, got " +
                                std::to_string(num_layers));
        if (!py::isinstance<py::array>(x))
          throw py::type_error("x: expected a numpy array, got " +
                               type_name(x));
        py::array xa = py::reinterpret_borrow<py::array>(x);
        if (xa.dtype().equal(py::dtype::of<float>()))
          return rnn_forward<float>(s, xa, h0, c0, params, nullptr, lengths, dropout_masks, noise,
                                    recurrent_dropout_masks, zoneout_masks, zoneout_seed);
        if (xa.dtype().equal(py::dtype::of<double>()))
          return rnn_forward<double>(s, xa, h0, c0, params, nullptr, lengths, dropout_masks, noise,
                                     recurrent_dropout_masks, zoneout_masks, zoneout_seed);
        throw py::type_error("x: expected dtype float32 or float64, got " +
                             std::string(py::str(xa.dtype())));
      },
      py::arg("mode"), py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("params"),
      py::kw_only(), py::arg("num_layers"), py::arg("bidirectional"), py::arg("reverse") = false,
      py::arg("proj_size") = 0, py::arg("lengths") = py::none(),
      py::arg("dropout_masks") = py::none(), py::arg("training") = false,
      py::arg("cell_options") = py::none(), py::arg("regularizers") = py::none(),
      "Forward of a stack (reverse: one direction walking each sequence from its end, as "
      "ONNX's direction='reverse'). params: a dict from torch's parameter names (weight_ih_l0, "
      "bias_hh_l1_reverse, ...) to arrays or packed reduced weights, for the names cells() "
      "gives the mode (torch's five, and its extra_params and optional_params); absent "
      "biases are zeros. cell_options: a dict with a CTRNN's alpha (dt / tau), leak "
      "('outside' or 'inside') and noise ((L*D, T, N, H) added to each step's state), and "
      "LN_LSTM's layer_norm_eps. regularizers: a dict with recurrent_dropout_masks "
      "((L*D, N, H_out) multiplying h where it enters the recurrent product), zoneout_masks "
      "((m_h, m_c), each None, a probability (eval) or (L*D, T, N, width) masks, 1 keeping "
      "the old value) and zoneout_seed (an int: masks drawn with those probabilities inside "
      "the kernels, reference.zoneout_masks_from_seed). "
      "Returns (y, h_n, c_n or None, cache or None).");

  // One step of one layer with torch's four parameters: rnn_forward with T = 1, one
  // layer, one direction and no options, without its generic argument handling (the
  // keywords, the option dicts, the parameter dict's names), which cost a cell stepped
  // in a loop more than its step (LSTM H=32: 12 us a call through rnn_forward).
  m.def(
      "cell_step",
      [](const std::string& mode, py::handle x, py::handle h0, py::handle c0, py::handle w_ih,
         py::handle w_hh, py::handle b_ih, py::handle b_hh, bool training) {
        lstmfast::StackShape s;
        s.mode = parse_mode(mode);
        s.training = training;
        if (!py::isinstance<py::array>(x))
          throw py::type_error("x: expected a numpy array, got " + type_name(x));
        py::array xa = py::reinterpret_borrow<py::array>(x);
        if (xa.ndim() != 3 || xa.shape(0) != 1)
          throw py::value_error("x: expected shape (1, N, I) (one step), got " +
                                shape_str(shape_of(xa)));
        std::vector<std::vector<py::object>> by_slot(
            1, std::vector<py::object>(param_slots(s.mode).size(), py::none()));
        const py::handle given[4] = {w_ih, w_hh, b_ih, b_hh};
        for (int j = 0; j < 4; ++j) by_slot[0][j] = py::reinterpret_borrow<py::object>(given[j]);
        const py::handle none = py::none();
        if (xa.dtype().equal(py::dtype::of<float>()))
          return rnn_forward<float>(s, xa, h0, c0, none, &by_slot, none, none, none, none, none,
                                    none);
        if (xa.dtype().equal(py::dtype::of<double>()))
          return rnn_forward<double>(s, xa, h0, c0, none, &by_slot, none, none, none, none, none,
                                     none);
        throw py::type_error("x: expected dtype float32 or float64, got " +
                             std::string(py::str(xa.dtype())));
      },
      py::arg("mode"), py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("weight_ih"),
      py::arg("weight_hh"), py::arg("bias_ih"), py::arg("bias_hh"), py::arg("training"),
      "One step of one cell: rnn_forward(mode, x, h0, c0, params, num_layers=1, "
      "bidirectional=False, training=training) with x (1, N, I) and the four parameters "
      "given by position (a bias may be None: zeros). Returns (y, h_n, c_n or None, cache "
      "or None), as rnn_forward.");

  m.def(
      "rnn_backward",
      [](const RnnCache& cache, py::handle d_output, py::handle d_h_n, py::handle d_c_n,
         py::handle grads, bool consume, bool assign, bool input_grad, bool gate_grads) {
        if (cache.dtype.equal(py::dtype::of<float>()))
          return rnn_backward<float>(cache, d_output, d_h_n, d_c_n, grads, consume, assign,
                                     input_grad, gate_grads);
        return rnn_backward<double>(cache, d_output, d_h_n, d_c_n, grads, consume, assign,
                                    input_grad, gate_grads);
      },
      py::arg("cache"), py::arg("d_output"), py::arg("d_h_n"), py::arg("d_c_n"), py::arg("grads"),
      py::arg("consume") = false, py::arg("assign") = false, py::arg("input_grad") = true,
      py::arg("gate_grads") = false,
      "BPTT of a training forward; adds parameter gradients into grads (a dict from the "
      "forward's parameter names to arrays of their shapes), or writes them over grads when "
      "assign=True (whatever grads held). Returns (dx, dh0, dc0 or None); dx is None, and not "
      "computed, with input_grad=False. "
      "consume=True writes the gate gradients over the cache's saved gates (less memory); the "
      "cache then serves no further backward (ValueError). "
      "gate_grads=True (grads None; where cache.hands_back_gate_grads): no parameter gradient "
      "is computed; returns (dx, dh0, dc0, dG_x, dG_h, h_prev): the gate gradients of the input "
      "side (T, N, G*H), of the recurrent side where they differ (the GRU's; else None: dG_x "
      "serves) and the state each step read (T, N, H). The weight gradients are then "
      "dG_x^T x and dG_h^T h_prev, summed over every row of every step (gate_weight_gradients), "
      "the biases' the column sums.");

  m.def(
      "gate_weight_gradients",
      [](py::handle dW_obj, py::handle db_obj, py::handle dG_obj, py::handle inputs_obj,
         bool assign) {
        if (!py::isinstance<py::array>(dG_obj))
          throw py::type_error("dG: expected a numpy array, got " + type_name(dG_obj));
        auto run = [&](auto zero) {
          using Real = decltype(zero);
          auto dG = py::reinterpret_borrow<py::array>(dG_obj);
          if (dG.ndim() != 2)
            throw py::value_error("dG: expected 2 dimensions (rows, gate rows), got " +
                                  std::to_string(dG.ndim()));
          const int64_t rows = dG.shape(0), gate_rows = dG.shape(1);
          if (!py::isinstance<py::array>(inputs_obj))
            throw py::type_error("inputs: expected a numpy array, got " + type_name(inputs_obj));
          const auto in = py::reinterpret_borrow<py::array>(inputs_obj);
          if (in.ndim() != 2)
            throw py::value_error("inputs: expected 2 dimensions (rows, width), got " +
                                  std::to_string(in.ndim()));
          const int64_t width = in.shape(1);
          auto g = checked<Real>(dG_obj, "dG", {rows, gate_rows});
          auto x = checked<Real>(inputs_obj, "inputs", {rows, width});
          auto writable = [](py::handle obj, const char* name, const Dims& shape) {
            auto a = checked<Real>(obj, name, shape);
            if (!a.is(obj) || !a.writeable())
              throw py::value_error(std::string(name) +
                                    ": must be a writeable C-contiguous array (written in place)");
            return a;
          };
          auto dW = writable(dW_obj, "dW", {gate_rows, width});
          py::array_t<Real, py::array::c_style> db;
          if (!db_obj.is_none()) db = writable(db_obj, "db", {gate_rows});
          Real* db_ptr = db_obj.is_none() ? nullptr : db.mutable_data();
          py::gil_scoped_release release;
          lstmfast::gate_weight_gradients<Real>(dW.mutable_data(), db_ptr, g.data(), x.data(), rows,
                                                gate_rows, width, assign);
        };
        auto dG = py::reinterpret_borrow<py::array>(dG_obj);
        if (dG.dtype().equal(py::dtype::of<double>()))
          run(double());
        else
          run(float());
      },
      py::arg("dW"), py::arg("db"), py::arg("dG"), py::arg("inputs"), py::arg("assign") = false,
      "dW (+)= dG^T inputs and db (+)= the column sums of dG (db may be None), written over "
      "with assign=True: the weight gradients of many rows at once from the gate gradients "
      "rnn_backward(..., gate_grads=True) handed back (dG [rows, G*H], inputs [rows, I or H]), "
      "on the kernels' threads.");

  m.def("set_num_threads", &lstmfast::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &lstmfast::get_num_threads);
  m.def("_set_serial_step_work", &lstmfast::set_serial_step_work, py::arg("work"),
        "Tests: calls whose steps are at most `work` multiply-adds run on the calling thread "
        "(0: every call on its threads; negative: the default).");
}

// ---------------------------------------------------------------------------
// The thread pool's test hooks.

void register_pool(py::module_& m) {
  m.def("_pool_set_never_spin", &lstmfast::pool_set_never_spin, py::arg("never"),
        "Tests: every wait of the pool sleeps at once instead of spinning first.");
  m.def("_pool_set_fit_to_cores", &lstmfast::pool_set_fit_to_cores, py::arg("fit"),
        "Tests: False runs every job on all its threads, however busy the machine.");
  m.def("_pool_set_others_running", &lstmfast::pool_set_others_running, py::arg("threads"),
        "Tests: other runnable threads the pool counts, as if read (-1: it reads them).");
  m.def("_pool_set_runnable_reading", &lstmfast::pool_set_runnable_reading, py::arg("threads"),
        "Tests: the machine's running threads the pool reads, ours included, in place of "
        "/proc/loadavg (-1: it reads that).");
  m.def("_pool_sleeps", &lstmfast::pool_sleeps, "Tests: the pool's waits that went to sleep so far.");
  m.def("_pool_set_counting", &lstmfast::pool_set_counting, py::arg("on"),
        "Diagnosis: count the pool's jobs and waits from now on (zeroed when switched on).");
  m.def(
      "_pool_counts",
      []() {
        const lstmfast::PoolCounts c = lstmfast::pool_counts();
        py::dict d;
        d["jobs"] = c.jobs;
        d["jobs_fewer_threads"] = c.jobs_fewer_threads;
        d["jobs_alone"] = c.jobs_alone;
        d["same_cpu"] = c.same_cpu;
        d["moves"] = c.moves;
        d["prewakes"] = c.prewakes;
        d["jobs_openmp"] = c.jobs_openmp;
        for (auto [name, w] : {std::pair{"barrier", c.barrier}, std::pair{"idle", c.idle},
                               std::pair{"finish", c.finish}}) {
          d[py::str(std::string(name) + "_waits")] = w[0];
          d[py::str(std::string(name) + "_sleeps")] = w[1];
          d[py::str(std::string(name) + "_wait_ns")] = w[2];
        }
        return d;
      },
      "Diagnosis: what the pool did since _pool_set_counting(True).");
  m.def(
      "_pool_check_barriers",
      [](int threads, int steps, long late_ns) {
        int ran = 1;
        long violations;
        {
          py::gil_scoped_release release;
          violations = lstmfast::pool_check_barriers(threads, steps, &ran, late_ns);
        }
        return py::make_tuple(ran, violations);
      },
      py::arg("threads"), py::arg("steps"), py::arg("late_ns") = 0,
      "Tests: `steps` barriers on `threads` pool threads, the last one busy for late_ns "
      "before each; returns (threads run, violations).");
  m.def("_pool_set_use_openmp", &lstmfast::pool_set_use_openmp, py::arg("use"),
        "Tests: where an OpenMP runtime is loaded, run jobs as its parallel regions never (0), "
        "when the cores are busy (1, the default) or always (2).");
  m.def("_pool_openmp_found", &lstmfast::pool_openmp_found,
        "Whether jobs run on a loaded OpenMP runtime's team (torch's) now.");
  m.def("_pool_prepare", &lstmfast::pool_prepare, py::arg("threads"),
        "Tests: what a call does as it starts (wakes the sleeping workers).");
  m.def("_pool_sleeping_workers", &lstmfast::pool_sleeping_workers,
        "Tests: the pool's workers asleep between jobs now.");
  m.def("_pool_wake_cost_ns", &lstmfast::pool_wake_cost_ns,
        "What waking a sleeping worker has cost lately (ns; 0 before the first).");
  m.def("_pool_set_wake_cost_ns", &lstmfast::pool_set_wake_cost_ns, py::arg("ns"),
        "Tests: fixes the wake-up cost the pool has learned at ns (negative: learned again).");
  m.def("_pool_set_publish_delay_ns", &lstmfast::pool_set_publish_delay_ns, py::arg("ns"),
        "Tests: a pause while a job is published to the workers (0: none).");
  m.def("_pool_set_prewake_spin_ns", &lstmfast::pool_set_prewake_spin_ns, py::arg("ns"),
        "Tests: how long workers woken as a call starts spin for its job (-1: default).");
  m.def(
      "_pool_spin_limits",
      [](const std::vector<long>& idle_waits_ns) {
        std::vector<long> limits(idle_waits_ns.size());
        const lstmfast::SpinLimits l = lstmfast::pool_spin_limits(
            idle_waits_ns.data(), static_cast<int>(idle_waits_ns.size()), limits.data());
        py::dict d;
        d["job_ns"] = l.job_ns;
        d["idle_floor_ns"] = l.idle_floor_ns;
        d["idle_ceiling_ns"] = l.idle_ceiling_ns;
        d["idle_limits_ns"] = limits;
        return d;
      },
      py::arg("idle_waits_ns"),
      "Tests: the waiting policy; idle_limits_ns[i]: a fresh worker's idle spin after the "
      "waits idle_waits_ns[:i + 1].");
  m.def(
      "_pool_colocation_action",
      [](int tid, int my_cpu, const std::vector<int>& cpus, const std::vector<int>& allowed) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int c : allowed) CPU_SET(c, &set);
        const lstmfast::Colocated a = lstmfast::colocation_action(
            tid, my_cpu, cpus.data(), static_cast<int>(cpus.size()), &set);
        return std::string(a == lstmfast::Colocated::kSpin   ? "spin"
                           : a == lstmfast::Colocated::kMove ? "move"
                                                             : "yield");
      },
      py::arg("tid"), py::arg("my_cpu"), py::arg("cpus"), py::arg("allowed"),
      "Tests: what thread tid of a job, waiting on CPU my_cpu, does when its threads were "
      "last seen on `cpus` and the process may use `allowed`.");
}

// ---------------------------------------------------------------------------
// Instruction sets.

template <typename Real>
py::array_t<Real> activation(int which, const py::array& x_obj) {
  auto x = c_contiguous<Real>(x_obj);
  py::array_t<Real> y(shape_of(x));
  const Real* px = x.data();
  Real* py_ = y.mutable_data();
  const int64_t n = x.size();
  {
    py::gil_scoped_release release;
    lstmfast::kernels().get<Real>().activation(which, px, py_, n);
  }
  return y;
}

void register_simd(py::module_& m) {
  m.def("simd_target", []() { return std::string(lstmfast::simd_target()); },
        "The instruction set the kernels use.");
  m.def("simd_targets", &lstmfast::simd_targets,
        "The instruction sets compiled in and supported by this CPU, best last.");
  m.def(
      "cpu_features",
      []() {
        py::dict d;
        for (const auto& [name, has] : lstmfast::cpu_features()) d[py::str(name)] = has;
        return d;
      },
      "The instruction-set extensions that matter here (avx2, fma, avx512f, avx512_vnni, "
      "avx512_bf16, avx_vnni, amx) -> whether this CPU has each.");
  m.def("compiled_simd_targets", &lstmfast::compiled_simd_targets,
        "The instruction sets compiled in, whether this CPU supports them or not, worst first.");
  m.def("set_simd_target", &lstmfast::set_simd_target, py::arg("name"),
        "Use the named instruction set (for tests); ValueError if unknown or unsupported.");
  m.def(
      "simd_target_builds",
      [](const std::string& name) {
        const lstmfast::SimdTarget& t = lstmfast::find_compiled_simd_target(name);
        return py::make_tuple(t.kernels->name, t.products->name);
      },
      py::arg("name"),
      "The builds a target runs: (its cell kernels', its reduced products'). Targets that "
      "extend avx512 for the reduced products alone share avx512's cell kernels.");
  m.def(
      "_activation",
      [](const std::string& name, const py::array& x) -> py::object {
        const int which = name == "exp" ? 0 : name == "sigmoid" ? 1 : name == "tanh" ? 2 : -1;
        if (which < 0)
          throw py::value_error("_activation: name must be 'exp', 'sigmoid' or 'tanh', got '" +
                                name + "'");
        if (x.dtype().equal(py::dtype::of<float>())) return activation<float>(which, x);
        if (x.dtype().equal(py::dtype::of<double>())) return activation<double>(which, x);
        throw py::type_error("_activation: x must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("name"), py::arg("x"),
      "Test hook: exp, sigmoid or tanh of the current instruction set's vector math.");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lstmfast's compiled kernels (private; use the lstmfast package)";
  m.attr("__version__") = LSTMFAST_VERSION;
  register_blas(m);
  register_reduced(m);
  register_rnn(m);
  register_simd(m);
  register_cells(m);
  register_pool(m);
}
