// The stack: layers x directions x lengths x dropout masks. Drives the
// one-layer-one-direction kernels of the chosen instruction set (dispatch.h);
// arguments are documented in lstmfast.h. Longer than most files: it also plans
// every buffer of a call (the memory layout must be read in one place to be
// checked), and the forward and backward walks over layers mirror each other.
//
// Per call: rows are sorted by length once (a permutation, no data moved: the
// kernels index x and y through it), biases are combined once, all memory is
// planned up front (the training cache in one block, scratch in this thread's
// reusable block), and the two directions of a layer run in turn, each on the
// whole thread pool.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>

#if defined(__linux__)
#include <sched.h>
#endif

#include "runtime/denormals.h"
#include "runtime/dispatch.h"
#include "runtime/gemm.h"
#include "lstmfast.h"
#include "runtime/thread_pool.h"
#include "runtime/workspace.h"

namespace lstmfast {

namespace {

// The cells, in Mode's order (lstmfast.h: CellInfo).
constexpr const char* kPeepholes = "weight_ci,weight_cf,weight_co";
constexpr const char* kLayerNorms = "ln_gates_weight,ln_gates_bias,ln_cell_weight,ln_cell_bias";
constexpr const char* kAllFeatures = "zoneout,recurrent_dropout,int8,bfloat16,onnx_gates";
// Columns: mode, name, G, cell_state, relu, saved_blocks, second_product, first_gates,
// backward_on_stored_weights, continuous_time, extra_params, optional_params, features
// (lstmfast.h, CellInfo).
constexpr CellInfo kCells[] = {
    {Mode::LSTM, "LSTM", 4, true, false, 4, false, 4, false, false, "", kPeepholes,
     "projection,zoneout,recurrent_dropout,int8,bfloat16,onnx_gates"},
    {Mode::GRU, "GRU", 3, false, false, 4, false, 3, true, false, "", "", kAllFeatures},
    {Mode::RNN_TANH, "RNN_TANH", 1, false, false, 0, false, 1, false, false, "", "", kAllFeatures},
    {Mode::RNN_RELU, "RNN_RELU", 1, false, true, 0, false, 1, false, false, "", "", kAllFeatures},
    {Mode::CTRNN_TANH, "CTRNN_TANH", 1, false, false, 1, false, 1, false, true, "", "",
     "recurrent_dropout,int8,bfloat16"},
    {Mode::CTRNN_RELU, "CTRNN_RELU", 1, false, true, 1, false, 1, false, true, "", "",
     "recurrent_dropout,int8,bfloat16"},
    {Mode::LN_LSTM, "LN_LSTM", 4, true, false, 4, false, 4, false, false, kLayerNorms, "",
     "recurrent_dropout,int8,bfloat16"},
    {Mode::GRU_RESET_BEFORE, "GRU_RESET_BEFORE", 3, false, false, 3, true, 2, true, false, "", "",
     kAllFeatures},
};
static_assert(sizeof(kCells) / sizeof(kCells[0]) == kModes, "one row of kCells per Mode");

}  // namespace

const CellInfo& cell_info(Mode mode) { return kCells[static_cast<int>(mode)]; }

const CellInfo* find_cell(const char* name) {
  for (const CellInfo& cell : kCells)
    if (std::strcmp(cell.name, name) == 0) return &cell;
  return nullptr;
}

int gates_of(Mode mode) { return cell_info(mode).gates; }

bool cell_supports(Mode mode, const char* feature) {
  const std::string list = std::string(",") + cell_info(mode).features + ",";
  return list.find(std::string(",") + feature + ",") != std::string::npos;
}

namespace {
// "LSTM, GRU, RNN_TANH, RNN_RELU": the cells that support `feature`, for messages.
std::string cells_supporting(const char* feature) {
  std::string names;
  for (const CellInfo& cell : kCells)
    if (cell_supports(cell.mode, feature)) names += (names.empty() ? "" : ", ") + std::string(cell.name);
  return names;
}
}  // namespace

uint64_t zoneout_layer_seed(uint64_t seed, int64_t ld) {
  uint64_t x = seed + static_cast<uint64_t>(ld) + 0x9E3779B97F4A7C15ull;  // splitmix64
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

namespace {

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

std::atomic<int> g_num_threads{default_threads()};

// CPUs this process may run on (its affinity mask on Linux), read once.
int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return default_threads();
}

// Threads for the per-step work. The pool's workers meet at a spinning barrier
// every step, so workers beyond the CPUs the process can use would only wait for
// one another to be scheduled (a 2-core machine ran a small training step 100x
// slower with 16 threads): never more than available_cpus().
int step_threads() {
  static const int cpus = available_cpus();
  return std::max(1, std::min(get_num_threads(), cpus));
}

// OpenBLAS's threads wait for one another in every GEMM as the pool's do at every
// step, spinning and then yielding. On a machine with no free core for a second
// thread the pool runs its jobs on the caller alone (thread_pool.h), and the
// GEMMs around them must follow: training of LSTM T=100 N=1 I=H=128 on 2 cores
// with 3 other busy processes took 64-72 ms with OpenBLAS on 2 threads, 14.8 ms
// on 1 (the pool on 1 thread in both; 14.1 ms at set_num_threads(1)). Opens a
// single-threaded region for the call when that is the case.
void blas_alone_without_a_free_core(std::optional<BlasSingleThreaded>& region) {
  if (get_num_threads() > 1 && pool_usable_threads(step_threads()) <= 1) region.emplace();
}

// Multiply-adds of a forward of the stack (its products; the gate math is in proportion).
double forward_work(const StackShape& s) {
  double work = 0;
  for (int64_t k = 0; k < s.L; ++k)
    work += double(s.D) * double(s.T) * double(s.N) * double(gates_of(s.mode) * s.H) *
            double(s.input_size(k) + s.H_out());
  return work;
}

// Multiply-adds of one step of layer k, one direction (the directions run in turn,
// each on every thread).
double layer_step_work(const StackShape& s, int64_t k) {
  return double(s.N) * double(gates_of(s.mode) * s.H) * double(s.input_size(k) + s.H_out());
}

// ... and of the stack's widest layer.
double step_work(const StackShape& s) {
  double widest = 0;
  for (int64_t k = 0; k < s.L; ++k) widest = std::max(widest, layer_step_work(s, k));
  return widest;
}

// Multiply-adds of a step up to which a call runs on the calling thread alone: a
// second thread halves a step's products but adds a barrier at every step, which
// costs more than such a step's share. Measured on a Zen 4 (2 cores), T=100,
// I=H, float32 inference, one thread against two, the best of two rounds of 200
// calls: GRU H=32 N=1 (6K a step) 30 against 38 us, RNN H=64 N=1 (8K) 41 against
// 48, RNN H=32 N=8 (16K) 62 against 72; above, two threads win: RNN H=96 N=1 (18K)
// 1.06x, GRU H=64 N=1 (25K) 1.36x, LSTM H=64 N=1 (33K) 1.44x.
constexpr double kSerialStepWork = 16384;
// The floor in force (set_serial_step_work: tests set it to 0, so that a small
// case runs on the threads it asks for).
std::atomic<double> g_serial_step_work{kSerialStepWork};

// A core's multiply-adds per nanosecond that the choice below assumes: below what
// the kernels do at any shape (10-50 on the machines measured), so that a call
// looks longer than it is, and goes alone only when it surely is short.
constexpr double kWorkPerNs = 8;

// Threads for a call's jobs: step_threads(), but 1 for steps of at most
// kSerialStepWork (a layer's own steps decide its LayerShape::threads: layer_shape),
// and 1 when the pool's workers sleep (the calls come apart) and the call would be
// done alone before a woken worker could start (twice what waking one has cost
// lately, thread_pool.h): on a virtual machine a halted CPU took 0.3 to 1.5 ms to
// start a worker, longer than a whole LSTM T=100 N=1 H=128 forward (0.5 ms on one
// thread). Returns the count, and wakes the workers when it is more than 1, so
// their wake-up overlaps the call's serial work.
// threads_for: the same for a job of `work` multiply-adds whose steps are `step` each.
int threads_for(double step, double work) {
  const int threads = step_threads();
  if (threads <= 1 || step <= g_serial_step_work.load()) return 1;
  if (pool_sleeping_workers() > 0 && work / kWorkPerNs < 2 * pool_wake_cost_ns()) return 1;
  pool_prepare(threads);
  return threads;
}

int call_threads(const StackShape& s, double work) { return threads_for(step_work(s), work); }

// Throws std::invalid_argument unless ok. The message is a literal, or a function
// that puts it together: the checks run on every call (a cell stepped in a loop pays
// them per step), and building their messages cost more than the step of a small cell.
void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}
template <typename Message>
void require(bool ok, const Message& message) {
  if (!ok) throw std::invalid_argument(message());
}

void check_shape(const StackShape& s) {
  auto str = [](int64_t v) { return std::to_string(v); };
  require(s.L >= 1, [&] { return "num_layers must be >= 1, got " + str(s.L); });
  require(s.D == 1 || s.D == 2, [&] { return "directions must be 1 or 2, got " + str(s.D); });
  require(s.T >= 1, [&] { return "x must have at least one time step, got T = " + str(s.T); });
  require(s.N >= 1, [&] { return "x must have at least one batch row, got N = " + str(s.N); });
  require(s.I >= 1, [&] { return "input_size must be >= 1, got " + str(s.I); });
  require(s.H >= 1, [&] { return "hidden_size must be >= 1, got " + str(s.H); });
  require(s.P >= 0, [&] { return "proj_size must be >= 0, got " + str(s.P); });
  require(s.P == 0 || s.mode == Mode::LSTM, "proj_size > 0 is only supported for LSTM");
  require(s.mode != Mode::LN_LSTM || s.ln_eps > 0,
          [&] { return "layer_norm_eps must be > 0, got " + std::to_string(s.ln_eps); });
  require(s.P < s.H || s.P == 0, [&] {
    return "proj_size (" + str(s.P) + ") must be smaller than hidden_size (" + str(s.H) + ")";
  });
  // Written so that NaN fails too.
  require(!is_ctrnn(s.mode) || (s.alpha > 0 && s.alpha <= 1),
          [&] { return "alpha must be in (0, 1], got " + std::to_string(s.alpha); });
}

// LN_LSTM: all four layer-norm parameters of every layer-direction and no linear
// biases; no other cell takes them.
template <typename Real>
void check_layer_norms(const Params<Real>* params, const StackShape& s) {
  const bool ln = s.mode == Mode::LN_LSTM;
  for (int64_t i = 0; i < s.L * s.D; ++i) {
    const Params<Real>& p = params[i];
    const int given = (p.ln_g_w != nullptr) + (p.ln_g_b != nullptr) + (p.ln_c_w != nullptr) +
                      (p.ln_c_b != nullptr);
    require(given == (ln ? 4 : 0), ln ? "LN_LSTM needs its four layer-norm parameters for every "
                                        "layer and direction"
                                      : "layer-norm parameters are only for LN_LSTM");
    require(!ln || (p.b_ih == nullptr && p.b_hh == nullptr),
            "LN_LSTM has no linear biases (its layer norms' biases take their place)");
  }
}

// Whether layer-direction 0 is given what `of` picks (a pointer); every other must agree.
template <typename Real, typename Of>
bool given_to_all_or_none(const Params<Real>* params, const StackShape& s, Of of,
                          const char* what) {
  const bool given = of(params[0]) != nullptr;
  for (int64_t i = 1; i < s.L * s.D; ++i)
    require((of(params[i]) != nullptr) == given,
            [&] {
              return std::string(what) + " must be given for every layer and direction or none";
            });
  return given;
}

// Recurrent dropout masks: every layer-direction or none, with float weights.
template <typename Real>
void check_recurrent_dropout(const Params<Real>* params, const StackShape& s) {
  const bool masked = given_to_all_or_none(
      params, s, [](const Params<Real>& p) { return p.rec_mask; }, "recurrent dropout masks");
  require(!masked || params[0].W_hh_r == nullptr,
          "recurrent dropout is not supported with reduced-precision weights");
}

// Zoneout: masks for every layer-direction or none, for h of LSTM, GRU and RNN and c of
// LSTM, with float weights.
template <typename Real>
void check_zoneout(const Params<Real>* params, const StackShape& s) {
  const bool on_h = given_to_all_or_none(
                        params, s, [](const Params<Real>& p) { return p.zone_h; }, "zoneout masks") ||
                    s.zone_p_h != 0;
  const bool on_c = given_to_all_or_none(
                        params, s, [](const Params<Real>& p) { return p.zone_c; }, "zoneout masks") ||
                    s.zone_p_c != 0;
  require(!(on_h || on_c) || cell_supports(s.mode, "zoneout"),
          [&] {
            return std::string("zoneout is supported for ") + cells_supporting("zoneout") +
                   ", not " + cell_info(s.mode).name;
          });
  require(!on_c || has_cell_state(s.mode), "zoneout of c is for LSTM, which has a cell state");
  require(!(on_h || on_c) || params[0].W_hh_r == nullptr,
          "zoneout is not supported with reduced-precision weights");
  require(s.zone_p_h >= 0 && s.zone_p_h <= 1 && s.zone_p_c >= 0 && s.zone_p_c <= 1,
          "zoneout probabilities must be in [0, 1]");
  require(!s.zone_hashed || (params[0].zone_h == nullptr && params[0].zone_c == nullptr),
          "zoneout: masks are given or drawn from a seed, not both");
}

// CTRNN noise: every layer-direction or none, and only for a CTRNN.
template <typename Real>
void check_noise(const Params<Real>* params, const StackShape& s) {
  const bool noise =
      given_to_all_or_none(params, s, [](const Params<Real>& p) { return p.noise; }, "noise");
  require(!noise || is_ctrnn(s.mode), "noise is only supported for CTRNN");
}

// Peepholes: LSTM only, all three vectors of every layer-direction or none.
template <typename Real>
void check_peepholes(const Params<Real>* params, const StackShape& s) {
  const bool peephole = params[0].P_i != nullptr;
  for (int64_t i = 0; i < s.L * s.D; ++i) {
    const Params<Real>& p = params[i];
    const int given = (p.P_i != nullptr) + (p.P_f != nullptr) + (p.P_o != nullptr);
    require(given == (peephole ? 3 : 0),
            "peephole vectors must be given, all three, for every layer and direction or none");
  }
  require(!peephole || s.mode == Mode::LSTM, "peepholes are only supported for LSTM");
}

// Reduced weights: all layer-directions or none, float32 inference, the shapes
// of the float weights they stand for.
template <typename Real>
void check_reduced(const Params<Real>* params, const StackShape& s) {
  const bool reduced = params[0].W_hh_r != nullptr;
  const int64_t GH = gates_of(s.mode) * s.H;
  auto fits = [](const ReducedMatrix* r, int64_t M, int64_t K) {
    return r && r->M == M && r->K == K;
  };
  for (int64_t i = 0; i < s.L * s.D; ++i) {
    const Params<Real>& p = params[i];
    require((p.W_hh_r != nullptr) == reduced,
            "reduced-precision weights must be given for every layer and direction or none");
    if (!reduced) continue;
    require(std::is_same<Real, float>::value, "reduced-precision weights need float32 inputs");
    require(!s.training, "reduced-precision weights are for inference only (training=False)");
    require(fits(p.W_ih_r, GH, s.input_size(i / s.D)) && fits(p.W_hh_r, GH, s.H_out()) &&
                (s.P == 0 ? p.W_hr_r == nullptr : fits(p.W_hr_r, s.P, s.H)),
            [&] {
              return "reduced-precision weights of layer-direction " + std::to_string(i) +
                     " do not have the shapes of the layer's weights";
            });
    const bool int8 = p.W_hh_r->precision == Precision::Int8;
    require(cell_supports(s.mode, int8 ? "int8" : "bfloat16"),
            [&] {
              return std::string(int8 ? "int8" : "bfloat16") + " weights are supported for " +
                     cells_supporting(int8 ? "int8" : "bfloat16") + ", not " +
                     cell_info(s.mode).name;
            });
    require(p.W_ih_r->precision == p.W_hh_r->precision &&
                p.W_hh_r->precision == params[0].W_hh_r->precision,
            "reduced-precision weights must all have one precision");
  }
}

// W [M, K] row-major float32 from a packed bfloat16 matrix (lstmfast.h): each
// 32-bit lane of a panel holds k and k + 1 of one row, which become the floats
// (lane << 16) and (lane & 0xFFFF0000). Row by row: the 16 rows of a panel
// written side by side are 4 KB apart for K = 1024, where L1 has only a few lines
// for all of them (measured 4 ns per weight that way, K = 512).
void widen_bf16(float* W, const ReducedMatrix& r) {
  const int64_t pairs = r.K_padded / 2;
  std::vector<uint32_t> row(static_cast<size_t>(2 * pairs));
  for (int64_t m = 0; m < r.M; ++m) {
    const uint32_t* lanes = reinterpret_cast<const uint32_t*>(r.bf16) +
                            (m / kReducedPanel) * pairs * kReducedPanel + m % kReducedPanel;
    for (int64_t j = 0; j < pairs; ++j) {
      const uint32_t both = lanes[j * kReducedPanel];
      row[2 * j] = both << 16;
      row[2 * j + 1] = both & 0xFFFF0000u;
    }
    std::memcpy(W + m * r.K, row.data(), static_cast<size_t>(r.K) * sizeof(float));
  }
}

// x[0..n) rounded to bfloat16 into out (simd.h: round_to_bfloat16, in scalar form:
// this unit is compiled for no instruction set in particular). float32 only.
template <typename Real>
void round_rows_to_bfloat16(Real* out, const Real* x, int64_t n) {
  if constexpr (std::is_same<Real, float>::value) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, 4);
      bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
      if (x[i] == x[i]) std::memcpy(out + i, &bits, 4);
      else out[i] = x[i];
    }
  }
}

// Rows from which a bfloat16 product runs faster on its weights widened to
// float32 once per call (OpenBLAS's sgemm, or the fused float path) than in
// place: in place, every row tile widens the weights again in registers, and
// with AVX2 nothing multiplies bfloat16 itself. Below it (a short call, whose
// products run in place anyway: small_products.h's kDirectRowSteps), and for the step of
// a few rows, the kernels stream half the bytes of float32.
constexpr int64_t kWidenBf16Rows = 32;
// Batch rows up to which the step multiplies by bfloat16 weights in place (as
// kernel_unit.h's kSmallGemmRows); with more, the whole layer runs on widened weights.
constexpr int64_t kBf16InPlaceBatch = 4;

// Scratch for the float32 forms of a bfloat16 layer's weights (null: not widened).
struct WideWeights {
  float* W_ih = nullptr;
  float* W_hh = nullptr;
  float* W_hr = nullptr;
};

// Points w at widened float32 weights for the products that take them.
template <typename Real>
void widen_weights(LayerWeights<Real>& w, const WideWeights& wide) {
  if constexpr (std::is_same<Real, float>::value) {
    auto widen = [](const float*& W, const ReducedMatrix*& r, float* into) {
      if (!into || !r) return;
      widen_bf16(into, *r);
      W = into;
      r = nullptr;
    };
    widen(w.W_ih, w.W_ih_r, wide.W_ih);
    widen(w.W_hh, w.W_hh_r, wide.W_hh);
    widen(w.W_hr, w.W_hr_r, wide.W_hr);
  }
}

// Rows sorted by length, longest first (stable), so the rows still running at
// any step are a prefix. Both stay empty when every row has all T steps (the
// fast path); rows stays empty when the order is already sorted.
void sort_rows(std::vector<int64_t>& sorted, std::vector<int64_t>& rows, const int64_t* lengths,
               int64_t T, int64_t N) {
  sorted.clear();
  rows.clear();
  if (!lengths) return;
  bool all_full = true;
  for (int64_t b = 0; b < N; ++b) {
    require(lengths[b] >= 1 && lengths[b] <= T,
            [&] {
              return "lengths[" + std::to_string(b) + "] = " + std::to_string(lengths[b]) +
                     " is outside 1..T = 1.." + std::to_string(T);
            });
    all_full = all_full && lengths[b] == T;
  }
  if (all_full) return;
  rows.resize(static_cast<size_t>(N));
  std::iota(rows.begin(), rows.end(), int64_t(0));
  std::stable_sort(rows.begin(), rows.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  sorted.resize(static_cast<size_t>(N));
  bool identity = true;
  for (int64_t b = 0; b < N; ++b) {
    sorted[b] = lengths[rows[b]];
    identity = identity && rows[b] == b;
  }
  if (identity) rows.clear();
}

// With lengths, the first packed row of each time (LayerShape::offsets): the
// input projection then multiplies only the rows that run, about half of T x N
// for lengths spread evenly over 1..T.
void packed_offsets(std::vector<int64_t>& offsets, const std::vector<int64_t>& lengths,
                    int64_t T) {
  offsets.clear();
  if (lengths.empty()) return;
  offsets.resize(static_cast<size_t>(T + 1));
  int64_t running = static_cast<int64_t>(lengths.size());  // rows with length > t
  offsets[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    while (running > 0 && lengths[running - 1] <= t) --running;
    offsets[t + 1] = offsets[t] + running;
  }
}

// packed[offsets[t] + b] = in[t, rows[b]] for the rows b still running at time t.
template <typename Real>
void pack_inputs(Real* packed, const Real* in, int64_t width, const StackCache<Real>& c) {
  const int64_t T = c.shape.T, N = c.shape.N;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t running = c.offsets[t + 1] - c.offsets[t];
    for (int64_t b = 0; b < running; ++b) {
      const int64_t row = c.rows.empty() ? b : c.rows[b];
      std::memcpy(packed + (c.offsets[t] + b) * width, in + (t * N + row) * width,
                  static_cast<size_t>(width) * sizeof(Real));
    }
  }
}

// out[t, rows[b]] = packed[offsets[t] + b] for the running rows, zero elsewhere.
template <typename Real>
void unpack_rows(Real* out, const Real* packed, int64_t width, const StackCache<Real>& c) {
  const int64_t T = c.shape.T, N = c.shape.N;
  std::memset(out, 0, static_cast<size_t>(T * N * width) * sizeof(Real));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t running = c.offsets[t + 1] - c.offsets[t];
    for (int64_t b = 0; b < running; ++b) {
      const int64_t row = c.rows.empty() ? b : c.rows[b];
      std::memcpy(out + (t * N + row) * width, packed + (c.offsets[t] + b) * width,
                  static_cast<size_t>(width) * sizeof(Real));
    }
  }
}

// bias = b_ih + b_hh (the GRU's n block: b_in alone, b_hn kept apart), once per call.
template <typename Real>
void combine_biases(StackCache<Real>& c) {
  const StackShape& s = c.shape;
  const bool gru = s.mode == Mode::GRU;
  const int64_t H = s.H, GH = gates_of(s.mode) * H, stride = GH + H;
  c.biases.assign(static_cast<size_t>(s.L * s.D * stride), Real(0));
  c.weights.resize(static_cast<size_t>(s.L * s.D));
  for (int64_t i = 0; i < s.L * s.D; ++i) {
    const Params<Real>& p = c.params[i];
    Real* bias = c.biases.data() + i * stride;
    Real* b_hn = bias + GH;
    for (int64_t j = 0; j < GH; ++j) {
      if (p.b_ih) bias[j] += p.b_ih[j];
      if (p.b_hh && !(gru && j >= 2 * H)) bias[j] += p.b_hh[j];
    }
    if (gru && p.b_hh)
      for (int64_t j = 0; j < H; ++j) b_hn[j] = p.b_hh[2 * H + j];
    c.weights[i] = {p.W_ih, p.W_hh, p.W_hr, bias, b_hn, p.W_ih_r, p.W_hh_r, p.W_hr_r};
    if (p.W_hh_r) c.weights[i].products = &reduced_products();
    // Panels packed by other kernels (a target forced since) have another layout.
    const void* in_use = &kernels();
    if (p.W_ih_p && p.W_hh_p && p.W_ih_p->kernels == in_use && p.W_hh_p->kernels == in_use) {
      c.weights[i].W_ih_p = p.W_ih_p->panels;
      c.weights[i].W_hh_p = p.W_hh_p->panels;
    }
    c.weights[i].noise = p.noise;
    c.weights[i].rec_mask = p.rec_mask;
    c.weights[i].zone_h = p.zone_h;
    c.weights[i].zone_c = p.zone_c;
    c.weights[i].zone_seed = p.zone_seed;
  }
  // Layer-norm parameters side by side per layer-direction (LayerWeights::ln).
  c.layer_norms.clear();
  if (s.mode == Mode::LN_LSTM) {
    c.layer_norms.resize(static_cast<size_t>(s.L * s.D * 10 * H));
    for (int64_t i = 0; i < s.L * s.D; ++i) {
      Real* ln = c.layer_norms.data() + i * 10 * H;
      const Params<Real>& p = c.params[i];
      std::copy(p.ln_g_w, p.ln_g_w + 4 * H, ln);
      std::copy(p.ln_g_b, p.ln_g_b + 4 * H, ln + 4 * H);
      std::copy(p.ln_c_w, p.ln_c_w + H, ln + 8 * H);
      std::copy(p.ln_c_b, p.ln_c_b + H, ln + 9 * H);
      c.weights[i].ln = ln;
    }
  }
  // Peepholes side by side per layer-direction, so a kernel reads them at one stride.
  c.peepholes.clear();
  if (c.params[0].P_i) {
    c.peepholes.resize(static_cast<size_t>(s.L * s.D * 3 * H));
    for (int64_t i = 0; i < s.L * s.D; ++i) {
      Real* peep = c.peepholes.data() + i * 3 * H;
      const Params<Real>& p = c.params[i];
      std::copy(p.P_i, p.P_i + H, peep);
      std::copy(p.P_f, p.P_f + H, peep + H);
      std::copy(p.P_o, p.P_o + H, peep + 2 * H);
      c.weights[i].peephole = peep;
    }
  }
}

template <typename Real>
LayerShape layer_shape(const StackCache<Real>& c, int64_t layer, int64_t direction, int threads) {
  const StackShape& s = c.shape;
  LayerShape l;
  l.T = s.T;
  l.N = s.N;
  l.I = s.input_size(layer);
  l.H = s.H;
  l.P = s.P;
  l.reverse = s.walks_backward(direction);
  l.relu = cell_info(s.mode).relu;
  l.alpha = s.alpha;
  l.leak_inside = s.leak_inside;
  l.ln_eps = s.ln_eps;
  l.zone_p_h = s.zone_p_h;
  l.zone_p_c = s.zone_p_c;
  l.zone_hashed = s.zone_hashed;
  l.gates = s.gates;
  l.training = s.training;
  l.lengths = c.lengths.empty() ? nullptr : c.lengths.data();
  l.rows = c.rows.empty() ? nullptr : c.rows.data();
  l.offsets = c.offsets.empty() ? nullptr : c.offsets.data();
  l.threads = layer_step_work(s, layer) <= g_serial_step_work.load() ? 1 : threads;
  return l;
}

template <typename Real>
int64_t steps(const StackCache<Real>& c) {
  return c.lengths.empty() ? c.shape.T : c.lengths[0];
}

// The directions one after the other, each on every step thread. Running them
// concurrently on one thread each (on a std::thread per call) measured no faster
// at 2 threads (LSTM T=100 N=8 I=H=256 bidirectional inference: 13.3 ms
// concurrent, 13.0 ms in turn), and the per-call thread started with empty
// scratch each time, so its speed depended on the allocator's state.
template <typename F>
void for_directions(int64_t D, F&& f) {
  for (int64_t d = 0; d < D; ++d) f(d);
}

// A backward of at most this many row-steps (steps x rows: a cell stepped in a
// decoder loop, a few frames) runs on the calling thread and multiplies dG by W_hh
// as it lies (dh_product_stored). Packing W_hh for the fused dh product reads and
// writes all 4H x H of it (16 MB per call for an LSTMCell of 1024), which one step
// cannot repay, and a barrier per step costs more than a step's work at one row.
// The forward of such calls takes the in-place path for the same reasons
// (kDirectRowSteps in small_products.h).
constexpr int64_t kShortBackwardRowSteps = 16;

template <typename Real>
bool short_backward(const StackCache<Real>& c) {
  return steps(c) * c.shape.N <= kShortBackwardRowSteps;
}

// Elements of a weight from which a short backward still runs on every thread, each
// multiplying dG by its share of the weight's columns (dh_product_stored for W_hh,
// stored_product_on_pool for W_ih): streaming such a weight through one core takes
// longer than waking the others, as in the forward (direct_gemm's
// kDirectSerialWeights). A decoder's LSTMCell(1536, 1024) at N=4, two threads: the
// step's backward without its weight gradients 3.0 ms on one thread.
constexpr int64_t kShortBackwardSerialWeights = int64_t(1) << 20;

template <typename Real>
bool short_backward_alone(const StackCache<Real>& c) {
  const StackShape& s = c.shape;
  return short_backward(c) &&
         gates_of(s.mode) * s.H * s.H_out() < kShortBackwardSerialWeights;
}

// Runs body(tid, nt) on `threads` pool threads (on the calling thread alone for one),
// OpenBLAS single-threaded meanwhile: each thread's GEMMs are its own.
template <typename F>
void run_with_blas_alone(int threads, F& body) {
  struct Call {
    static void task(void* ctx, int tid) { (*static_cast<F*>(ctx))(tid, pool_threads()); }
  };
  BlasSingleThreaded single;
  if (threads <= 1)
    body(0, 1);
  else
    pool_run(threads, &Call::task, &body);
}

// Rows of A below which the product of many steps is not cut (one block of rows).
constexpr int64_t kStoredProductBlockRows = 64;

// C[rows, cols] = A[rows, K] B[K, cols] (+ C when accumulate), B as it lies (the
// kernels' product): for a short backward with a big B (kShortBackwardSerialWeights)
// each thread takes whole cache lines of B's columns; for the rows of many steps
// (dx of a whole sequence) the threads take blocks of rows, OpenBLAS single-threaded
// in each. Called with OpenBLAS's own threads, that product ran beside the threads
// that had just run the backward's job, spinning: torch's OpenMP team in a torch
// process (LSTM T=100 N=32 I=H=256, 2 threads: the backward 45 ms instead of 36, its
// dx product about 17 ms instead of 8). The blocks are as many as the threads set
// (step_threads), whatever threads the job gets (fewer when others hold the cores):
// how a block's sums run depends on its rows, and each call at one setting must
// give the same bits.
template <typename Real>
void stored_product_on_pool(Real* C, const Real* A, const Real* B, int64_t rows, int64_t K,
                            int64_t cols, bool accumulate, int threads, bool short_call) {
  const auto& kernels_of = kernels().get<Real>();
  if (!short_call) {
    const int64_t blocks = std::min<int64_t>(
        step_threads(), std::max<int64_t>(1, rows / kStoredProductBlockRows));
    if (blocks <= 1) return kernels_of.product(C, cols, A, K, B, cols, rows, K, cols, accumulate);
    auto by_rows = [&](int tid, int nt) {
      for (int64_t i = tid; i < blocks; i += nt) {
        const int64_t r0 = rows * i / blocks, r1 = rows * (i + 1) / blocks;
        kernels_of.product(C + r0 * cols, cols, A + r0 * K, K, B, cols, r1 - r0, K, cols,
                           accumulate);
      }
    };
    const double work = double(rows) * double(K) * double(cols);
    return run_with_blas_alone(threads > 1 ? threads_for(work, work) : 1, by_rows);
  }
  constexpr int64_t kLine = 64 / sizeof(Real);
  // Each share at least two lines: the product's last vector may start before a share's
  // end minus its width, which must stay inside the share.
  if (threads <= 1 || K * cols < kShortBackwardSerialWeights || cols < 2 * kLine * threads) {
    kernels_of.product(C, cols, A, K, B, cols, rows, K, cols, accumulate);
    return;
  }
  auto body = [&](int tid, int nt) {
    const int64_t lines = (cols + kLine - 1) / kLine;
    const int64_t c0 = lines * tid / nt * kLine;
    const int64_t c1 = std::min(cols, lines * (tid + 1) / nt * kLine);
    if (c1 > c0) kernels_of.product(C + c0, cols, A, K, B + c0, cols, rows, K, c1 - c0, accumulate);
  };
  run_with_blas_alone(threads, body);
}

template <typename Real>
void multiply(Real* a, const Real* mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] *= mask[i];
}

// The recurrent dropout mask of layer-direction i in sorted rows (LayerBuffers::mask_sorted).
template <typename Real>
void sort_mask(Real* mask_sorted, const StackCache<Real>& c, int64_t i) {
  const int64_t N = c.shape.N, width = c.shape.H_out();
  const Real* mask = c.weights[i].rec_mask;
  for (int64_t b = 0; b < N; ++b) {
    const int64_t row = c.rows.empty() ? b : c.rows[b];
    std::memcpy(mask_sorted + b * width, mask + row * width, static_cast<size_t>(width) * sizeof(Real));
  }
}

// Runs layout(carver) twice: to size this thread's scratch block, then to cut it.
template <typename F>
void carve_scratch(F&& layout) {
  Carver count;
  layout(count);
  Carver carve(thread_scratch(count.bytes()));
  layout(carve);
}

}  // namespace

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
  g_num_threads.store(n);
}

int get_num_threads() { return g_num_threads.load(); }

void set_serial_step_work(double work) {
  g_serial_step_work.store(work < 0 ? kSerialStepWork : work);
}

template <typename Real>
std::unique_ptr<StackCache<Real>> stack_forward(Real* y, Real* h_n, Real* c_n, const Real* x,
                                                const Real* h0, const Real* c0,
                                                const Params<Real>* params, const int64_t* lengths,
                                                const Real* const* dropout_masks,
                                                const StackShape& shape) {
  check_shape(shape);
  const int threads = call_threads(shape, forward_work(shape));
  check_reduced(params, shape);
  check_peepholes(params, shape);
  check_noise(params, shape);
  check_layer_norms(params, shape);
  check_recurrent_dropout(params, shape);
  check_zoneout(params, shape);
  std::optional<BlasSingleThreaded> blas_alone;
  if (threads <= 1)
    blas_alone.emplace();
  else
    blas_alone_without_a_free_core(blas_alone);
  auto cache = std::make_unique<StackCache<Real>>();
  StackCache<Real>& c = *cache;
  c.shape = shape;
  const StackShape& s = c.shape;
  const bool lstm = s.mode == Mode::LSTM, training = s.training;
  const bool cell_state = has_cell_state(s.mode), ln = s.mode == Mode::LN_LSTM;
  const bool rec_masked = params[0].rec_mask != nullptr;  // recurrent dropout (training only)
  const bool zoned_h = params[0].zone_h != nullptr || shape.zone_p_h != 0;
  const int64_t L = s.L, D = s.D, T = s.T, N = s.N, H = s.H, P = s.P, H_out = s.H_out();
  const int64_t GH = gates_of(s.mode) * H, Y = T * N * D * H_out;
  sort_rows(c.lengths, c.rows, lengths, T, N);
  packed_offsets(c.offsets, c.lengths, T);
  const int64_t S = steps(c);
  c.params.assign(params, params + L * D);
  combine_biases(c);
  if (dropout_masks && L > 1) c.masks.assign(dropout_masks, dropout_masks + L - 1);
  c.inputs.assign(static_cast<size_t>(L), nullptr);
  c.inputs[0] = x;
  c.saved.resize(static_cast<size_t>(L * D));

  // What backward needs: h (and c, m, gates) of every step, and each layer's input.
  if (training) {
    std::vector<Real*> inputs(static_cast<size_t>(L), nullptr);
    auto layout = [&](Carver& cv) {
      for (int64_t i = 0; i < L * D; ++i) {
        LayerBuffers<Real>& b = c.saved[i];
        b.h = cv.take<Real>((S + 1) * N * H_out);
        if (cell_state) b.c = cv.take<Real>((S + 1) * N * H);
        if (P) b.m = cv.take<Real>(S * N * H);
        const CellInfo& cell = cell_info(s.mode);
        if (cell.saved_blocks && !(cell.continuous_time && s.leak_inside))
          b.gates = cv.take<Real>(S * N * cell.saved_blocks * H);
        if (cell.second_product) b.u = cv.take<Real>(S * N * H);
        if (ln) b.ln = cv.take<Real>(S * N * (5 * H + 2));
        if (rec_masked) b.hm = cv.take<Real>((S + 1) * N * H_out);
        // h~ of every step, or with a clip the pre-activation (rnn.cpp)
        if ((zoned_h || s.gates.clip > 0) && (s.mode == Mode::RNN_TANH || s.mode == Mode::RNN_RELU))
          b.gates = cv.take<Real>(S * N * H);
      }
      for (int64_t k = 1; k < L; ++k) inputs[k] = cv.take<Real>(Y);
    };
    Carver count;
    layout(count);
    c.block = cache_block(count.bytes());
    Carver carve(c.block.data());
    layout(carve);
    for (int64_t k = 1; k < L; ++k) c.inputs[k] = inputs[k];
  }

  // Scratch: per direction the input projection and the current step's recurrent
  // projection (and, for inference, two slots of state); for inference two
  // buffers between layers, used in turn.
  LayerBuffers<Real> scratch[2];
  WideWeights wide[2];  // bfloat16 weights widened for this call (see kWidenBf16Rows)
  Real* between[2] = {nullptr, nullptr};
  Real* packed_in = nullptr;  // with lengths: the running rows of a layer's input
  Real* rounded_in = nullptr;  // a layer's input rounded to bfloat16, for widened W_ih
  // A training LSTM or GRU in x's order projects its inputs straight into its
  // saved gates: each step reads a row's pre-activations there before it writes
  // the row's gates.
  const bool project_into_gates =
      training && (lstm || s.mode == Mode::GRU || s.mode == Mode::GRU_RESET_BEFORE) &&
      c.lengths.empty();
  // Reduced weights (inference): products with them need no packed or transposed
  // float weights; int8 ones quantize their left operand into act_*.
  const bool reduced = params[0].W_hh_r != nullptr;
  const bool int8 = reduced && params[0].W_hh_r->precision == Precision::Int8;
  const int64_t widest = std::max({s.I, D * H_out, H});
  const int64_t widest_input = L > 1 ? std::max(s.I, D * H_out) : s.I;
  // bfloat16 layers: which products run on weights widened to float32 (see
  // kWidenBf16Rows). The step's product when the batch is more than a few rows
  // (then the layer takes the float path whole), the input projection when it
  // has many rows.
  // With bfloat16 in hardware nothing is widened.
  const bool bf16 = reduced && !int8 && !reduced_products().native_bf16;
  const bool widen_all = bf16 && N > kBf16InPlaceBatch;
  const bool widen_input = bf16 && (widen_all || (c.offsets.empty() ? T * N : c.offsets[T]) >= kWidenBf16Rows);
  ActivationScratch acts[2], acts_state[2];
  carve_scratch([&](Carver& cv) {
    for (int64_t d = 0; d < D; ++d) {
      if (!(project_into_gates && !s.walks_backward(d))) scratch[d].xproj = cv.take<Real>(T * N * GH);
      scratch[d].rec = cv.take<Real>(N * GH);
      if (rec_masked) scratch[d].mask_sorted = cv.take<Real>(N * H_out);
      if (widen_input) wide[d].W_ih = cv.take<float>(GH * widest);
      if (widen_all) {
        wide[d].W_hh = cv.take<float>(GH * H_out);
        if (P) wide[d].W_hr = cv.take<float>(P * H);
      }
      if (reduced && !widen_all) {
        const int64_t row = (widest + 3) / 4 * 4;
        for (auto [act, rows] : {std::pair{&acts[d], T * N}, std::pair{&acts_state[d], N}}) {
          if (int8) {
            act->q = cv.take<uint8_t>(rows * row);
            act->scale = cv.take<float>(rows);
            act->zero = cv.take<int32_t>(rows);
          } else {
            act->bf16 = cv.take<uint16_t>(rows * row);
          }
        }
        scratch[d].act = &acts[d];
        scratch[d].act_state = &acts_state[d];
      } else if (P) {  // the projected LSTM: few rows on transposed weights, else packed panels
        scratch[d].W_hh_t = cv.take<Real>(H_out * GH);
        scratch[d].W_hr_t = cv.take<Real>(H * P);
        scratch[d].W_hh_p = cv.take<Real>(packed_size(gates_of(s.mode), H, H_out));
        scratch[d].W_hr_p = cv.take<Real>(packed_size(1, P, H));
      } else {  // the fused kernel's packed panels
        scratch[d].W_hh_p = cv.take<Real>(packed_size(gates_of(s.mode), H, H_out));
        scratch[d].W_ih_p = cv.take<Real>(packed_size(gates_of(s.mode), H, widest_input));
      }
      if (!training) {
        if (cell_info(s.mode).second_product) {  // one step's gates and u (see saved_blocks)
          scratch[d].gates = cv.take<Real>(N * cell_info(s.mode).saved_blocks * H);
          scratch[d].u = cv.take<Real>(N * H);
        }
        scratch[d].h = cv.take<Real>(2 * N * H_out);
        if (rec_masked || widen_all) scratch[d].hm = cv.take<Real>(2 * N * H_out);
        if (cell_state) scratch[d].c = cv.take<Real>(2 * N * H);
        if (P) scratch[d].m = cv.take<Real>(N * H);
      }
    }
    if (!training)
      for (int64_t i = 0; i < std::min<int64_t>(L - 1, 2); ++i) between[i] = cv.take<Real>(Y);
    if (!c.offsets.empty())
      packed_in = cv.take<Real>(c.offsets[T] * std::max(s.I, L > 1 ? D * H_out : int64_t(0)));
    if (widen_input) rounded_in = cv.take<Real>(T * N * widest);
  });

  ScopedFlushDenormals flush;
  const CellKernels<Real>& cell = kernels().get<Real>().cell(s.mode);
  const Real* in = x;
  for (int64_t k = 0; k < L; ++k) {
    Real* out = k == L - 1 ? y : training ? const_cast<Real*>(c.inputs[k + 1]) : between[k % 2];
    if (!c.lengths.empty()) std::memset(out, 0, static_cast<size_t>(Y) * sizeof(Real));
    const Real* layer_in = in;
    if (packed_in) {
      pack_inputs(packed_in, in, s.input_size(k), c);
      layer_in = packed_in;
    }
    if (rounded_in) {  // the input projection multiplies widened bfloat16 weights
      round_rows_to_bfloat16(rounded_in, layer_in,
                             (c.offsets.empty() ? T * N : c.offsets[T]) * s.input_size(k));
      layer_in = rounded_in;
    }
    for_directions(D, [&](int64_t d) {
      const int64_t i = k * D + d;
      LayerBuffers<Real> b = training ? c.saved[i] : scratch[d];
      b.xproj = scratch[d].xproj ? scratch[d].xproj : b.gates;
      b.rec = scratch[d].rec;
      b.W_hh_t = scratch[d].W_hh_t;
      b.W_hr_t = scratch[d].W_hr_t;
      b.W_hh_p = scratch[d].W_hh_p;
      b.W_ih_p = scratch[d].W_ih_p;
      b.W_hr_p = scratch[d].W_hr_p;
      b.act = scratch[d].act;
      b.act_state = scratch[d].act_state;
      b.mask_sorted = scratch[d].mask_sorted;
      if (b.mask_sorted) sort_mask(b.mask_sorted, c, i);
      LayerWeights<Real> w = c.weights[i];
      if (b.W_hh_p && w.W_hh_p) {  // packed once: read in place, never written
        b.W_hh_p = const_cast<Real*>(w.W_hh_p);
        b.W_ih_p = const_cast<Real*>(w.W_ih_p);
      } else {
        w.W_ih_p = w.W_hh_p = nullptr;  // the path of this call reads no panels
      }
      widen_weights(w, wide[d]);
      LayerShape ls = layer_shape(c, k, d, threads);
      ls.round_bf16 = widen_all;
      cell.forward(out + d * H_out, D * H_out, h_n + i * N * H_out, c_n ? c_n + i * N * H : nullptr,
                   b, layer_in, h0 ? h0 + i * N * H_out : nullptr, c0 ? c0 + i * N * H : nullptr,
                   w, ls);
    });
    if (k < L - 1 && !c.masks.empty()) multiply(out, c.masks[k], Y);
    in = out;
  }
  if (!training) {
    cache.reset();
    return cache;
  }
  // Backward needs no noise: the cache keeps no pointer to it (the caller may free it).
  for (Params<Real>& p : c.params) p.noise = nullptr;
  for (LayerWeights<Real>& w : c.weights) w.noise = nullptr;
  return cache;
}

template <typename Real>
void stack_backward(Real* dx, Real* dh0, Real* dc0, const Grads<Real>* grads, const Real* dy,
                    const Real* dh_n, const Real* dc_n, StackCache<Real>& c, bool consume,
                    bool assign, const GateGrads<Real>* gate_grads) {
  const StackShape& s = c.shape;
  if (!s.training) throw std::invalid_argument("backward needs the cache of a training forward");
  require(!gate_grads || (hands_back_gate_grads(c) && !consume),
          "gate gradients are handed back only by one layer and direction walked forward, "
          "without lengths, projection, peepholes or regularizers, and without consume");
  if (c.consumed.load())
    throw std::invalid_argument(
        "this forward's saved state was used up by a backward that consumed it");
  const int threads = call_threads(s, 2 * forward_work(s));  // BPTT: about twice the forward
  std::optional<BlasSingleThreaded> blas_alone;
  if (threads <= 1)
    blas_alone.emplace();
  else
    blas_alone_without_a_free_core(blas_alone);
  const bool lstm = s.mode == Mode::LSTM, gru = s.mode == Mode::GRU;
  const bool cell_state = has_cell_state(s.mode), ln = s.mode == Mode::LN_LSTM;
  const bool rec_masked = c.weights[0].rec_mask != nullptr;
  const bool zoned = c.weights[0].zone_h || c.weights[0].zone_c || s.zone_p_h != 0 ||
                     s.zone_p_c != 0;
  // Gate gradients written over the saved gates (LSTM and GRU save 4H per row-step).
  const bool in_place = consume && (lstm || gru);
  const int64_t L = s.L, D = s.D, T = s.T, N = s.N, H = s.H, P = s.P, H_out = s.H_out();
  const int64_t GH = gates_of(s.mode) * H, Y = T * N * D * H_out, S = steps(c);

  // Scratch per direction: the gate gradients of every step in x's order
  // (dG_x; an LSTM consuming the cache in order writes them over its gates), in
  // step order when that differs from x's order and the GRU's recurrent ones
  // (dG; over the gates when consuming), the running dh (dc), and two buffers
  // between layers, used in turn.
  LayerBuffers<Real> scratch[2];
  Real* dG_x[2] = {nullptr, nullptr};
  Real* between[2] = {nullptr, nullptr};
  Real* packed_in = nullptr;  // with lengths: the running rows of a layer's input, and of dx
  Real* packed_dx = nullptr;
  carve_scratch([&](Carver& cv) {
    for (int64_t d = 0; d < D; ++d) {
      const bool in_order = !s.walks_backward(d) && c.lengths.empty();
      if (!(in_place && lstm && in_order) && !gate_grads) dG_x[d] = cv.take<Real>(T * N * GH);
      if ((gru || !in_order) && !in_place) scratch[d].dG = cv.take<Real>(S * N * GH);
      if (gru && !in_order) scratch[d].dG_in = cv.take<Real>(S * N * GH);
      if (!P && !cell_info(s.mode).backward_on_stored_weights && !short_backward(c))  // see dh_product_stored
        scratch[d].W_hh_c = cv.take<Real>(packed_size(gates_of(s.mode), H, H));
      scratch[d].dh = cv.take<Real>(N * H_out);
      if (cell_state) scratch[d].dc = cv.take<Real>(N * H);
      if (ln) scratch[d].dln_rows = cv.take<Real>(S * N * 5 * H);
      if (rec_masked) {
        scratch[d].mask_sorted = cv.take<Real>(N * H_out);
        scratch[d].dh_rec = cv.take<Real>(N * H_out);
      }
      if (zoned) {
        scratch[d].zone_dh = cv.take<Real>(N * H_out);
        if (cell_state) scratch[d].zone_dc = cv.take<Real>(N * H);
        if (lstm) scratch[d].zone_c_raw = cv.take<Real>(N * H);
      }
      if (P) {
        scratch[d].dhs = cv.take<Real>(S * N * P);
        scratch[d].dm = cv.take<Real>(N * H);
      }
      scratch[d].dsum = cv.take<Real>(GH);
      if (cell_info(s.mode).second_product) scratch[d].du = cv.take<Real>(N * H);
      if (!c.peepholes.empty()) scratch[d].dpeep = cv.take<Real>(3 * H);
    }
    for (int64_t i = 0; i < std::min<int64_t>(L - 1, 2); ++i) between[i] = cv.take<Real>(Y);
    if (!c.offsets.empty()) {
      const int64_t width = std::max(s.I, L > 1 ? D * H_out : int64_t(0));
      packed_in = cv.take<Real>(c.offsets[T] * width);
      packed_dx = cv.take<Real>(c.offsets[T] * width);
    }
  });

  if (consume && c.consumed.exchange(true))
    throw std::invalid_argument(
        "this forward's saved state was used up by a backward that consumed it");
  if (gate_grads) {
    dG_x[0] = gate_grads->input;
    // One layer walked forward without lengths: step k's rows are x's rows of time k.
    std::memcpy(gate_grads->h_prev, c.saved[0].h, static_cast<size_t>(S * N * H_out) * sizeof(Real));
  }
  ScopedFlushDenormals flush;
  const CellKernels<Real>& cell = kernels().get<Real>().cell(s.mode);
  for (int64_t k = L - 1; k >= 0; --k) {
    const Real* dy_k = k == L - 1 ? dy : between[k % 2];
    Real* dx_k = k == 0 ? dx : between[(k - 1) % 2];
    const int64_t I = s.input_size(k);
    Real* dG_x_layer[2] = {dG_x[0], dG_x[1]};
    for (int64_t d = 0; d < D; ++d)
      if (!dG_x_layer[d]) dG_x_layer[d] = c.saved[k * D + d].gates;
    const Real* layer_in = c.inputs[k];
    if (packed_in) {
      pack_inputs(packed_in, layer_in, I, c);
      layer_in = packed_in;
    }
    for_directions(D, [&](int64_t d) {
      const int64_t i = k * D + d;
      LayerBuffers<Real> b = c.saved[i];
      b.dG = scratch[d].dG;
      b.dG_in = scratch[d].dG_in;
      b.W_hh_c = scratch[d].W_hh_c;
      b.dh = scratch[d].dh;
      b.dc = scratch[d].dc;
      b.dhs = scratch[d].dhs;
      b.dm = scratch[d].dm;
      b.du = scratch[d].du;
      b.dsum = scratch[d].dsum;
      b.dpeep = scratch[d].dpeep;
      b.dln_rows = scratch[d].dln_rows;
      b.mask_sorted = scratch[d].mask_sorted;
      b.dh_rec = scratch[d].dh_rec;
      b.zone_dh = scratch[d].zone_dh;
      b.zone_dc = scratch[d].zone_dc;
      b.zone_c_raw = scratch[d].zone_c_raw;
      if (b.mask_sorted) sort_mask(b.mask_sorted, c, i);
      const Grads<Real> g = gate_grads ? Grads<Real>{} : grads[i];
      const LayerGrads<Real> dw{g.dW_ih,   g.dW_hh,   g.dW_hr,   g.db_ih, g.db_hh, Real(assign ? 0 : 1),
                                g.dP_i,    g.dP_f,    g.dP_o,    g.dln_g_w, g.dln_g_b, g.dln_c_w,
                                g.dln_c_b, gate_grads != nullptr,
                                gate_grads ? gate_grads->recurrent : nullptr};
      LayerShape shape = layer_shape(c, k, d, threads);
      if (short_backward_alone(c)) shape.threads = 1;
      cell.backward(dG_x_layer[d], dh0 ? dh0 + i * N * H_out : nullptr, dc0 ? dc0 + i * N * H : nullptr,
                    dw, b, dy_k ? dy_k + d * H_out : nullptr, D * H_out,
                    dh_n ? dh_n + i * N * H_out : nullptr, dc_n ? dc_n + i * N * H : nullptr,
                    layer_in, c.weights[i], shape);
    });
    // dx = sum over directions of dG_x W_ih: one GEMM each, over all steps (over
    // the running rows, then put in place, when x was packed). A caller whose input
    // needs no gradient (data, not a layer below) passes dx null: this product is a
    // third of the layer's non-recurrent work, and a stepped cell's W_ih read.
    if (!dx_k) continue;
    const int64_t rows = packed_in ? c.offsets[T] : T * N;
    Real* dx_rows = packed_in ? packed_dx : dx_k;
    for (int64_t d = 0; d < D; ++d)
      stored_product_on_pool(dx_rows, dG_x_layer[d], c.weights[k * D + d].W_ih, rows, GH, I, d > 0,
                             threads, short_backward(c));
    if (packed_in) unpack_rows(dx_k, packed_dx, I, c);
    if (k > 0 && !c.masks.empty()) multiply(dx_k, c.masks[k - 1], Y);
  }
}

template <typename Real>
PackedGates<Real> pack_gates(Mode mode, bool recurrent, const Real* W, int64_t M, int64_t K) {
  const CellInfo& cell = cell_info(mode);
  if (M < 1 || K < 1 || M % cell.gates != 0)
    throw std::invalid_argument("pack_gates: expected " + std::to_string(cell.gates) +
                                "*H rows (the gates of " + cell.name +
                                ") and at least one column, got (" + std::to_string(M) + ", " +
                                std::to_string(K) + ")");
  const int G = cell.gates, G0 = recurrent ? cell.first_gates : G;
  const int64_t H = M / G;
  PackedGates<Real> p;
  p.kernels = &kernels();
  constexpr int64_t kAlign = 64 / sizeof(Real);  // a panel row is one cache line of AVX-512
  p.storage.resize(static_cast<size_t>(packed_size(G, H, K) + kAlign));
  Real* panels = p.storage.data();
  panels += (kAlign - (reinterpret_cast<uintptr_t>(panels) / sizeof(Real)) % kAlign) % kAlign;
  kernels().get<Real>().pack_gates(panels, W, G, G0, H, K);
  p.panels = panels;
  return p;
}

template <typename Real>
bool hands_back_gate_grads(const StackCache<Real>& c) {
  const StackShape& s = c.shape;
  const LayerWeights<Real>& w = c.weights[0];
  const bool plain_cell = s.mode == Mode::LSTM || s.mode == Mode::GRU ||
                          s.mode == Mode::RNN_TANH || s.mode == Mode::RNN_RELU;
  return s.training && plain_cell && s.L == 1 && s.D == 1 && s.P == 0 && !s.walks_backward(0) &&
         c.lengths.empty() && c.peepholes.empty() && !w.rec_mask && !w.zone_h && !w.zone_c &&
         s.zone_p_h == 0 && s.zone_p_c == 0;
}

template <typename Real>
void gate_weight_gradients(Real* dW, Real* db, const Real* dG, const Real* inputs, int64_t rows,
                           int64_t gate_rows, int64_t width, bool assign) {
  const Real beta = assign ? Real(0) : Real(1);
  // Each thread its gate rows of dW (one single-threaded OpenBLAS GEMM) and of db:
  // OpenBLAS's own threads would wait beside the pool's, which may still spin after
  // the backward's last step.
  auto body = [&](int tid, int nt) {
    const int64_t first = gate_rows * tid / nt, last = gate_rows * (tid + 1) / nt;
    if (last <= first) return;
    gemm<Real>(true, false, last - first, width, rows, Real(1), dG + first, gate_rows, inputs,
               width, beta, dW + first * width, width);
    if (!db) return;
    if (assign) std::fill(db + first, db + last, Real(0));
    for (int64_t r = 0; r < rows; ++r) {
      const Real* g = dG + r * gate_rows;
      for (int64_t j = first; j < last; ++j) db[j] += g[j];
    }
  };
  const double work = double(rows) * double(gate_rows) * double(width);
  run_with_blas_alone(threads_for(work, work), body);  // one step: the whole product
}

#define LSTMFAST_INSTANTIATE(Real)                                                               \
  template bool hands_back_gate_grads<Real>(const StackCache<Real>&);                            \
  template void gate_weight_gradients<Real>(Real*, Real*, const Real*, const Real*, int64_t,     \
                                            int64_t, int64_t, bool);                             \
  template PackedGates<Real> pack_gates<Real>(Mode, bool, const Real*, int64_t, int64_t);      \
  template std::unique_ptr<StackCache<Real>> stack_forward<Real>(                                \
      Real*, Real*, Real*, const Real*, const Real*, const Real*, const Params<Real>*,           \
      const int64_t*, const Real* const*, const StackShape&);                                    \
  template void stack_backward<Real>(Real*, Real*, Real*, const Grads<Real>*, const Real*,       \
                                     const Real*, const Real*, StackCache<Real>&, bool, bool,  \
                                     const GateGrads<Real>*);
LSTMFAST_INSTANTIATE(float)
LSTMFAST_INSTANTIATE(double)
#undef LSTMFAST_INSTANTIATE

}  // namespace lstmfast
