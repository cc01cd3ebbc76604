// The C++ API of lstmfast's fused recurrent kernels. Knows nothing of Python.
//
// Two levels:
//   * the stack (stack.cpp): layers x directions x lengths x dropout masks, the
//     whole of torch.nn.LSTM/GRU/RNN's forward and backward;
//   * one layer in one direction (lstm.cpp, gru.cpp, rnn.cpp, compiled once per
//     instruction set and reached through dispatch.h), which the stack calls.
//
// Letters (README "Shapes, letters and gate order" maps them to torch's names):
//   T time steps, N batch rows, I input features, H hidden units,
//   P LSTM projection size (0 = none), H_out = P if P > 0 else H (width of h),
//   G gates per unit (LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1), D directions,
//   L layers, S = steps actually taken = max length (T without lengths).
// Every array is row-major and contiguous unless a leading dimension (ld*) is given.
// Weights are in torch's layout: a batch of rows times a weight is x W^T.
//
// Arguments are documented once, here, as `name: [shape] meaning`.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace lstmfast {

// The cells. Adding one (README "Adding a cell"): a value here, its row in
// stack.cpp's kCells, its kernel file (forward and BPTT side by side, as rnn.cpp)
// and its entry in kernel_table.cpp.
enum class Mode { LSTM, GRU, RNN_TANH, RNN_RELU, CTRNN_TANH, CTRNN_RELU, LN_LSTM, GRU_RESET_BEFORE };
constexpr int kModes = 8;

// What the stack, the bindings and Python know of a cell; the kernels know the
// rest. Exported to Python as _core.cells(), which the package reads instead of
// keeping tables of its own (the NumPy reference keeps its own, tested to agree).
struct CellInfo {
  Mode mode;
  const char* name;        // the mode's name in Python ("LSTM", "CTRNN_RELU", ...)
  int gates;               // G: pre-activation blocks of H per unit (x W_ih^T is [., G*H])
  bool cell_state;         // keeps c beside h (LSTM)
  bool relu;               // LayerShape::relu for the kernel: relu instead of tanh
  int saved_blocks;        // training saves [S, N, saved_blocks * H] in LayerBuffers::gates
                           //   (LSTM i, f, g, o; GRU r, z, n, gh_n; CTRNN phi(z) with the
                           //   leak outside, as h cannot give it back)
  bool second_product;     // a step has two recurrent products, the second on u = f(first)
                           //   (LayerBuffers::u; GRU_RESET_BEFORE: r * h times W_hn)
  int first_gates;         // G0: gates of the first product (the kernel's kFirstGates): G
                           //   without a second product
  bool backward_on_stored_weights;  // dh = dG W_hh reads W_hh as stored, not packed
                                    //   (dh_product_stored: the GRUs' memory)
  bool continuous_time;    // takes alpha, leak and per-step noise (docs/cells.md, CTRNN)
  // Parameters beyond torch's weight_ih, weight_hh, bias_ih, bias_hh (and weight_hr),
  // comma-separated, each named as torch names the others (name_l{k}[_reverse]):
  //   extra_params:    always present;  optional_params: present when given
  const char* extra_params;
  const char* optional_params;
  // Features, comma-separated: projection, zoneout, recurrent_dropout, int8, bfloat16,
  // onnx_gates (GateOptions: hard sigmoid, clip, input_forget)
  // (training, lengths, both directions and layer dropout every cell has).
  const char* features;
};
const CellInfo& cell_info(Mode mode);
// The cell of a Python mode name; nullptr when there is none.
const CellInfo* find_cell(const char* name);

// G: 4 (LSTM), 3 (GRU), 1 (RNN, CTRNN).
int gates_of(Mode mode);
// Whether the cell's CellInfo::features names `feature`.
bool cell_supports(Mode mode, const char* feature);
// Continuous-time RNN (docs/cells.md): CTRNN_TANH or CTRNN_RELU.
inline bool is_ctrnn(Mode mode) { return cell_info(mode).continuous_time; }
// Whether the cell carries c beside h (LSTM, LN_LSTM).
inline bool has_cell_state(Mode mode) { return cell_info(mode).cell_state; }

// ---------------------------------------------------------------------------
// One layer, one direction.

// Sizes and the order in which rows and times are visited.
//
// Rows are processed in "sorted" order: sorted row b is batch row rows[b], and
// lengths[] is non-increasing, so the rows still running at step s are always a
// prefix 0..n(s)-1 and the recurrent GEMM runs on that prefix. Arrays indexed by
// time and batch row (x, y, dy, h0, h_n, ...) stay in the caller's order; the
// per-step state buffers are in sorted order, indexed by step s (not time t).
// At step s sorted row b reads and writes time t = s (forward) or
// t = lengths[b] - 1 - s (reverse: each sequence starts at its own end).
// ONNX's options of the LSTM, GRU and RNN nodes that the kernels compute
// (docs/onnx.md), at inference and in training. The cells take their ONNX path
// (cells/onnx_gates.h) when `onnx` is set.
struct GateOptions {
  bool onnx = false;          // any option below is set
  bool hard_sigmoid = false;  // the gates' activation min(max(hs_alpha a + hs_beta, 0), 1)
  double hs_alpha = 0.2, hs_beta = 0.5;  //   instead of sigmoid
  double clip = 0;            // > 0: every pre-activation of the gates and the candidate
                              //   is bounded to [-clip, clip] first; 0: none
  bool input_forget = false;  // LSTM: f = 1 - i
};

struct LayerShape {
  int64_t T = 0;                     // time steps of x and y
  int64_t N = 0;                     // batch rows
  int64_t I = 0;                     // input features of this layer
  int64_t H = 0;                     // hidden units
  int64_t P = 0;                     // LSTM projection size, 0 for none
  bool reverse = false;              // walk each sequence backwards in time
  bool relu = false;                 // RNN, CTRNN: relu instead of tanh
  double alpha = 1;                  // CTRNN: dt / tau, in (0, 1]
  bool leak_inside = false;          // CTRNN: h' = phi((1-alpha) h + alpha z) instead of
                                     //   (1-alpha) h + alpha phi(z) (docs/cells.md)
  double ln_eps = 1e-5;              // LN_LSTM: the layer norms' epsilon, > 0
  double zone_p_h = 0, zone_p_c = 0;  // zoneout (LayerWeights::zone_h) without masks: the keep-old
                                      //   factor of every unit of h, of c (eval: the probabilities)
  bool zone_hashed = false;           // zoneout masks drawn from LayerWeights::zone_seed with those
                                      //   probabilities (training) instead of the factors themselves
  bool training = false;             // keep every step's state for backward
  bool round_bf16 = false;           // the products multiply bfloat16 weights widened to float32: their
                                     //   left operands are rounded to bfloat16 first (h through
                                     //   LayerBuffers::hm, m in place; x by the stack)
  const int64_t* lengths = nullptr;  // lengths: [N] steps of sorted row b, non-increasing, each in 1..T; nullptr = all T
  const int64_t* rows = nullptr;     // rows: [N] batch row held by sorted row b; nullptr = identity
  const int64_t* offsets = nullptr;  // offsets: [T+1] with lengths: x holds only the inputs of running
                                     //   rows, time by time (PackedSequence's layout in sorted order):
                                     //   sorted row b at time t is row offsets[t] + b; nullptr = x is [T, N, I]
  int threads = 1;                   // threads of the persistent pool this layer may use (thread_pool.h)
  GateOptions gates;                 // ONNX's options (inference)

  int64_t H_out() const { return P > 0 ? P : H; }
  int64_t steps() const { return lengths ? lengths[0] : T; }
};

// ---------------------------------------------------------------------------
// Reduced-precision weights (inference only: lstmfast.quantize).

enum class Precision { Int8, BFloat16 };

// Columns of W (outputs) per panel of a packed reduced matrix: two AVX2 vectors,
// one AVX-512 vector, of 32-bit lanes.
constexpr int64_t kReducedPanel = 16;

// A weight W [M, K] (a row per output, torch's layout) held in reduced precision,
// packed once (pack_int8, pack_bf16) into panels of kReducedPanel outputs so that
// a product reads it in order; zero past M and past K.
//   int8: W[m, k] = scale[m] * q[m, k], q symmetric in -128..127 (per output row).
//     Panel p holds, for each group of 4 k, the 4 values of its 16 outputs in turn:
//     [M_panels, K_padded / 4, 16, 4] (the operand order of vpmaddubsw / vpdpbusd).
//     Activations are quantized per row and per call to 0..127 with a zero point
//     (reduced_products.h); row_sum corrects for it.
//   bfloat16: the upper 16 bits of float32 W, pairs of k interleaved:
//     [M_panels, K_padded / 2, 16, 2] (the operand order of vdpbf16ps).
struct ReducedMatrix {
  Precision precision = Precision::Int8;
  int64_t M = 0, K = 0;
  int64_t K_padded = 0;             // K rounded up to 4 (int8) or 2 (bfloat16)
  int64_t panels = 0;               // ceil(M / kReducedPanel)
  const int8_t* q = nullptr;        // int8 panels
  const uint16_t* bf16 = nullptr;   // bfloat16 panels
  const float* scale = nullptr;     // int8: [panels * 16] per output row, zero past M
  const int32_t* row_sum = nullptr; // int8: [panels * 16] sum over k of q[m, k]
  std::vector<int64_t> storage;     // owns what the pointers point at (8-byte aligned)

  ReducedMatrix() = default;
  ReducedMatrix(ReducedMatrix&&) = default;  // the storage moves, the pointers stay valid
  ReducedMatrix& operator=(ReducedMatrix&&) = default;
  ReducedMatrix(const ReducedMatrix&) = delete;

  int64_t nbytes() const { return static_cast<int64_t>(storage.size() * sizeof(int64_t)); }
};

// Rows of a left operand prepared for the products with one reduced weight, and
// the products of one instruction set (both in reduced_products.h).
struct ActivationScratch;
struct ReducedProducts;

// Inputs per row (K) up to which int8 products cannot overflow their int32 sums.
constexpr int64_t kMaxInt8Inputs = (int64_t(1) << 31) / (127 * 128) - 1;

// q: [M, K] row-major int8;  scale: [M] positive and finite; K <= kMaxInt8Inputs.
ReducedMatrix pack_int8(const int8_t* q, const float* scale, int64_t M, int64_t K);
// bits: [M, K] row-major bfloat16 bit patterns.
ReducedMatrix pack_bf16(const uint16_t* bits, int64_t M, int64_t K);

// ---------------------------------------------------------------------------
// Float weights packed once (inference: lstmfast.freeze).

// W_ih or W_hh of one layer-direction laid out once into the gate panels that the
// fused kernels of one instruction set read (recurrent_product.h: pack_gate_panels),
// which a call otherwise makes from W at its start: for a stream's short calls, more
// than the steps cost. Calls on the kernels that packed them read the panels; calls
// on other kernels (a forced target), and the paths that read W as it lies (few
// steps of a projected LSTM, the training backward), read W, which the caller keeps
// alive and unchanged beside the panels.
template <typename Real>
struct PackedGates {
  const void* kernels = nullptr;  // the kernel table (dispatch.h) that packed them
  const Real* panels = nullptr;   // [packed_size(G, H, K)], 64-byte aligned, in storage: W_hh's
                                  //   first G0 gates (CellInfo::first_gates), then the other
                                  //   G - G0 at packed_size(G0, H, K); W_ih's G together
  std::vector<Real> storage;

  PackedGates() = default;
  PackedGates(PackedGates&&) = default;  // the storage moves, the pointer stays valid
  PackedGates& operator=(PackedGates&&) = default;
  PackedGates(const PackedGates&) = delete;

  int64_t nbytes() const { return static_cast<int64_t>(storage.size() * sizeof(Real)); }
};

// W: [M, K] row-major, M = G*H of `mode`'s cell; packed by the kernels in use.
// Throws std::invalid_argument when M is not a multiple of G or a size is not positive.
template <typename Real>
PackedGates<Real> pack_gates(Mode mode, bool recurrent, const Real* W, int64_t M, int64_t K);

// Parameters of one layer and direction (pointers into the caller's arrays).
// With reduced weights (float32 inference only) the *_r pointers are set and the
// float pointers are null.
template <typename Real>
struct LayerWeights {
  const Real* W_ih = nullptr;  // W_ih: [G*H, I] input weights
  const Real* W_hh = nullptr;  // W_hh: [G*H, H_out] recurrent weights
  const Real* W_hr = nullptr;  // W_hr: [P, H] LSTM projection; nullptr when P = 0
  const Real* bias = nullptr;  // bias: [G*H] b_ih + b_hh, except the GRU's n block which is b_in alone; never null
  const Real* b_hn = nullptr;  // b_hn: [H] GRU only: the bias inside r * (W_hn h + b_hn); never null for GRU
  const ReducedMatrix* W_ih_r = nullptr;  // reduced forms of W_ih, W_hh, W_hr (see above)
  const ReducedMatrix* W_hh_r = nullptr;
  const ReducedMatrix* W_hr_r = nullptr;
  const ReducedProducts* products = nullptr;  // with reduced weights: the products to use (dispatch.h)
  const Real* W_ih_p = nullptr;  // W_ih_p, W_hh_p: both or neither: W_ih and W_hh packed once
  const Real* W_hh_p = nullptr;  //   (PackedGates::panels) by the kernels in use, read in place of
                                 //   LayerBuffers' W_ih_p and W_hh_p, which are then not packed
  const Real* peephole = nullptr;  // peephole: LSTM [3H] P_i, P_f, P_o (docs/cells.md); nullptr = none
  const Real* noise = nullptr;     // noise: CTRNN [T, N, H] added to each step's state, in x's order
                                   //   (y's indexing); forward only: backward never reads it
  const Real* ln = nullptr;        // ln: LN_LSTM [10H] gamma_g, beta_g (4H each), gamma_c, beta_c (H each)
  const Real* rec_mask = nullptr;  // rec_mask: [N, H_out] recurrent dropout (docs/cells.md), caller's rows:
                                   //   multiplies h where it enters h W_hh^T, every step, every gate
  const Real* zone_h = nullptr;    // zone_h: [T, N, H_out] zoneout of h in x's order (y's indexing), 1 keeps
                                   //   the old value: h' = m h + (1 - m) h~ (docs/cells.md, ESPnet); or
                                   //   nullptr: LayerShape::zone_p_h for every unit
  const Real* zone_c = nullptr;    // zone_c: [T, N, H] the same for c (LSTM)
  uint64_t zone_seed = 0;          // zone_seed: with LayerShape::zone_hashed, the masks are not arrays but
                                   //   drawn with probabilities zone_p_h, zone_p_c from this layer-direction's
                                   //   seed by zoneout_keep (regularizers.h), in forward and again in backward
};

// Gradients of one layer and direction: ADDED into (the caller zeroes them), or
// written over when beta is 0 (the caller then need not clear them).
template <typename Real>
struct LayerGrads {
  Real* dW_ih = nullptr;  // dW_ih: [G*H, I]
  Real* dW_hh = nullptr;  // dW_hh: [G*H, H_out]
  Real* dW_hr = nullptr;  // dW_hr: [P, H]; nullptr when P = 0
  Real* db_ih = nullptr;  // db_ih: [G*H]; nullptr without bias
  Real* db_hh = nullptr;  // db_hh: [G*H]; nullptr without bias
  Real beta = 1;          // 1: add into the gradients; 0: overwrite them
  Real* dP_i = nullptr;   // dP_i, dP_f, dP_o: [H] each, peephole LSTM only
  Real* dP_f = nullptr;
  Real* dP_o = nullptr;
  Real* dln_g_w = nullptr;  // dln_g_w, dln_g_b: [4H] LN_LSTM, the gate layer norm's weight and bias
  Real* dln_g_b = nullptr;
  Real* dln_c_w = nullptr;  // dln_c_w, dln_c_b: [H] the cell layer norm's
  Real* dln_c_b = nullptr;
  // Weight gradients handed back as gate gradients (GateGrads): no product with x or
  // h, no bias sums; the recurrent gate gradients go to dG_rec when the cell's
  // differ from the input side's (the GRU's), else nowhere (dG_x holds them).
  bool deferred = false;
  Real* dG_rec = nullptr;  // [S*N, G*H]
};

// Buffers of one layer and direction. The saved part (h, c, m, gates when
// training) is what BPTT needs and lives in the training cache; the rest is scratch.
template <typename Real>
struct LayerBuffers {
  // forward
  Real* xproj = nullptr;  // xproj: [T, N, G*H] scratch: x W_ih^T for all steps (one GEMM); or gates
                          //   itself (training in x's order, LSTM or GRU, rows 4H apart): each step reads
                          //   a row's pre-activations there before it writes the row's gates
  Real* rec = nullptr;    // rec: [N, G*H] scratch: h W_hh^T of the current step
  Real* W_hh_t = nullptr; // W_hh_t: LSTM with P > 0, [H_out, G*H] scratch: W_hh^T laid out once per call for the few-row GEMM
  Real* W_hr_t = nullptr; // W_hr_t: [H, P] scratch: W_hr^T likewise (LSTM with P > 0)
  Real* W_hh_p = nullptr; // W_hh_p: [packed_size(G, H, H_out)] scratch: W_hh packed once per call into
                          //   gate-interleaved panels for the fused recurrent kernel (recurrent_product.h)
  Real* W_ih_p = nullptr; // W_ih_p: [packed_size(G, H, I)] scratch: W_ih packed likewise, for the input projection
                          //   of a few steps at a time on the pool; nullptr: projected at once by OpenBLAS
  Real* W_hr_p = nullptr; // W_hr_p: LSTM with P > 0, [packed_size(1, P, H)] scratch: W_hr packed likewise (one
                          //   gate of P units), for the projection of m on the pool
  Real* h = nullptr;      // h: [S+1, N, H_out] training / [2, N, H_out] inference: h per step, sorted rows, slot 0 = h0
  Real* c = nullptr;      // c: LSTM, like h with width H: the cell state
  Real* m = nullptr;      // m: LSTM with P > 0: [S, N, H] training / [N, H] inference: o * tanh(c) before the projection
  Real* gates = nullptr;  // gates: training, [S, N, 4H]: LSTM (i, f, g, o) activated; GRU (r, z, n, W_hn h + b_hn);
                          //   CTRNN with the leak outside [S, N, H]: phi(z); RNN unused;
                          //   GRU_RESET_BEFORE [S, N, 3H] r, z, n (inference: [N, 3H], one step)
  Real* u = nullptr;      // u: the second recurrent product's input (CellInfo::second_product),
                          //   training [S, N, H], inference [N, H]: GRU_RESET_BEFORE r * h
  // backward (scratch)
  Real* dG = nullptr;     // dG: [S, N, G*H] gradient of the recurrent pre-activations (h W_hh^T), per step, sorted rows;
                          //   nullptr (LSTM, GRU) when the backward consumes the cache: then written over gates
                          //   (row stride 4H), whose values each step reads before it writes
  Real* dG_in = nullptr;  // dG_in: GRU [S, N, 3H] gradient of the input pre-activations (x W_ih^T); differs from dG by r in the n block
  Real* W_hh_c = nullptr; // W_hh_c: LSTM without P, RNN: [packed_size(G, H, H)] scratch: W_hh packed once per
                          //   backward by column blocks for dh = dG W_hh (recurrent_product.h)
  Real* dh = nullptr;     // dh: [N, H_out] gradient flowing into h of the current step
  Real* dc = nullptr;     // dc: LSTM [N, H] gradient flowing into c of the current step
  Real* dhs = nullptr;    // dhs: LSTM with P > 0: [S, N, P] total gradient of h per step (for dW_hr)
  Real* dm = nullptr;     // dm: LSTM with P > 0: [N, H] gradient of m of the current step
  Real* dsum = nullptr;   // dsum: [G*H] scratch for bias gradients
  Real* dpeep = nullptr;  // dpeep: peephole LSTM [3H] scratch: the peephole gradients' sums
  Real* ln = nullptr;     // ln: LN_LSTM training [S, N, 5H + 2]: z_g (4H) and z_c (H), the two layer
                          //   norms' normalized inputs, then their 1 / sqrt(var + eps)
  Real* dln_rows = nullptr;  // dln_rows: LN_LSTM backward scratch [S, N, 5H]: the gradients of the two
                             //   layer norms' outputs, per row-step, for their parameter gradients
  // recurrent dropout (LayerWeights::rec_mask) or LayerShape::round_bf16; all null without
  Real* hm = nullptr;         // hm: like h: h times the mask (or rounded to bfloat16), what the
                              //   recurrent product reads
  Real* mask_sorted = nullptr;  // mask_sorted: [N, H_out] the mask in sorted rows (filled by the stack)
  Real* dh_rec = nullptr;     // dh_rec: backward scratch [N, H_out]: dG W_hh before the mask
  Real* du = nullptr;         // du: backward scratch [N, H]: the gradient of u (second_product)
  // zoneout (LayerWeights::zone_h); all null without it
  Real* zone_dh = nullptr;    // zone_dh: backward scratch [N, H_out]: the part of a step's dh that skips the cell
  Real* zone_dc = nullptr;    // zone_dc: [N, H] the same of dc (LSTM)
  Real* zone_c_raw = nullptr; // zone_c_raw: [N, H] LSTM: c~ of the step, recomputed (c holds the zoned c)
  // reduced weights (scratch): the left operand of a product prepared for it, [x_rows]
  // rows of round_up(max(I, H_out, H), 4) (reduced_products.h); null without
  const ActivationScratch* act = nullptr;
  const ActivationScratch* act_state = nullptr;  // likewise [N] rows: h for the recurrent product
                                                 //   while act holds rows of x (reduced_steps)
};

// Elements of the packed recurrent weights W_hh_p: G * K * H rounded up to the
// widest vector (16 floats), enough for every instruction set's panels.
inline int64_t packed_size(int64_t G, int64_t H, int64_t K) { return G * K * ((H + 15) / 16 * 16); }

// Forward of one layer in one direction (lstm_forward, gru_forward, rnn_forward).
//   y: [T, N, ldy] output h at each of a row's steps (columns 0..H_out-1); positions
//      past a row's length are not written (the caller zeroes them)
//   h_n: [N, H_out] h at each row's last step;  c_n: LSTM [N, H] likewise (ignored otherwise)
//   x: [T, N, I] input (packed [offsets[T], I] with s.offsets);  h0: [N, H_out] initial h;
//   c0: LSTM [N, H] initial c
template <typename Real>
using LayerForwardFn = void (*)(Real* y, int64_t ldy, Real* h_n, Real* c_n,
                                const LayerBuffers<Real>& buf, const Real* x, const Real* h0,
                                const Real* c0, const LayerWeights<Real>& w, const LayerShape& s);

// Backward of one layer in one direction, from the buffers its training forward filled.
//   dG_x: [T, N, G*H] out: gradient of x W_ih^T in x's order (zero past a row's
//         length); the caller forms dx = dG_x W_ih (summing the directions)
//   dh0: [N, H_out], dc0: LSTM [N, H] out: gradients of h0 and c0
//   dw: parameter gradients, added into
//   dy: [T, N, lddy] gradient of y (columns 0..H_out-1); nullptr = zeros
//   dh_n: [N, H_out], dc_n: LSTM [N, H] gradients of h_n and c_n; nullptr = zeros
//   x: [T, N, I] the forward's input
// With s.offsets, dG_x and x hold only the running rows (packed as the forward's x).
template <typename Real>
using LayerBackwardFn = void (*)(Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                                 const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy,
                                 const Real* dh_n, const Real* dc_n, const Real* x,
                                 const LayerWeights<Real>& w, const LayerShape& s);

// ---------------------------------------------------------------------------
// The stack: L layers x D directions, lengths, dropout between layers.

struct StackShape {
  Mode mode = Mode::LSTM;
  int64_t L = 1;  // layers
  int64_t D = 1;  // directions
  int64_t T = 0, N = 0, I = 0, H = 0, P = 0;
  bool training = false;  // keep what backward needs in the returned cache
  double alpha = 1;          // CTRNN (LayerShape)
  bool leak_inside = false;  // CTRNN (LayerShape)
  double ln_eps = 1e-5;      // LN_LSTM (LayerShape)
  double zone_p_h = 0, zone_p_c = 0;  // zoneout without masks (LayerShape)
  bool zone_hashed = false;           // (LayerShape); Params::zone_seed per layer-direction
  bool reverse = false;  // D = 1 walking each sequence from its end (ONNX's direction="reverse")
  GateOptions gates;     // (LayerShape)

  int64_t H_out() const { return P > 0 ? P : H; }
  // Whether direction d walks the steps from last to first (LayerShape::reverse).
  bool walks_backward(int64_t d) const { return (d == 1) != reverse; }
  int64_t input_size(int64_t layer) const { return layer == 0 ? I : D * H_out(); }
};

// Parameters of layer k, direction d at index k*D + d (torch's names in comments).
template <typename Real>
struct Params {
  const Real* W_ih = nullptr;  // weight_ih_l{k}[_reverse]: [G*H, I of layer k]
  const Real* W_hh = nullptr;  // weight_hh_l{k}[_reverse]: [G*H, H_out]
  const Real* b_ih = nullptr;  // bias_ih_l{k}[_reverse]: [G*H]; nullptr without bias
  const Real* b_hh = nullptr;  // bias_hh_l{k}[_reverse]: [G*H]; nullptr without bias
  const Real* W_hr = nullptr;  // weight_hr_l{k}[_reverse]: [P, H]; nullptr when P = 0
  const ReducedMatrix* W_ih_r = nullptr;  // reduced forms (LayerWeights): float32 inference only,
  const ReducedMatrix* W_hh_r = nullptr;  //   all three set (W_hr_r when P > 0) and W_ih, W_hh,
  const ReducedMatrix* W_hr_r = nullptr;  //   W_hr null
  const Real* P_i = nullptr;  // weight_ci_l{k}[_reverse]: [H] peephole LSTM (all three, or none)
  const Real* P_f = nullptr;  // weight_cf_l{k}[_reverse]: [H]
  const Real* P_o = nullptr;  // weight_co_l{k}[_reverse]: [H]
  const Real* noise = nullptr;  // CTRNN: [T, N, H] additive noise of this layer-direction
                                //   (LayerWeights::noise); all or none; not kept for backward
  const Real* ln_g_w = nullptr;  // ln_gates_weight_l{k}[_reverse]: [4H] LN_LSTM (all four)
  const Real* ln_g_b = nullptr;  // ln_gates_bias_l{k}[_reverse]: [4H]
  const Real* ln_c_w = nullptr;  // ln_cell_weight_l{k}[_reverse]: [H]
  const Real* ln_c_b = nullptr;  // ln_cell_bias_l{k}[_reverse]: [H]
  const Real* rec_mask = nullptr;  // [N, H_out] recurrent dropout mask (LayerWeights::rec_mask);
                                   //   all layer-directions or none
  const Real* zone_h = nullptr;    // [T, N, H_out] zoneout masks (LayerWeights::zone_h), all or none
  const Real* zone_c = nullptr;    // [T, N, H] (LSTM)
  uint64_t zone_seed = 0;          // with StackShape::zone_hashed (LayerWeights::zone_seed)
  const PackedGates<Real>* W_ih_p = nullptr;  // W_ih and W_hh packed once (lstmfast.freeze),
  const PackedGates<Real>* W_hh_p = nullptr;  //   beside W_ih and W_hh; or nullptr
};

template <typename Real>
struct Grads {
  Real* dW_ih = nullptr;  // like Params, added into
  Real* dW_hh = nullptr;
  Real* db_ih = nullptr;  // nullptr without bias
  Real* db_hh = nullptr;
  Real* dW_hr = nullptr;  // nullptr when P = 0
  Real* dP_i = nullptr;   // peephole LSTM only
  Real* dP_f = nullptr;
  Real* dP_o = nullptr;
  Real* dln_g_w = nullptr;  // LN_LSTM only
  Real* dln_g_b = nullptr;
  Real* dln_c_w = nullptr;
  Real* dln_c_b = nullptr;
};

// What a backward hands back in place of its weight gradients (stack_backward's
// gate_grads): a cell stepped in a loop keeps them, and its weights' gradients are
// multiplied once per backward pass over all its steps (gate_weight_gradients)
// instead of summed step by step, each step reading and writing all of them.
// Only where hands_back_gate_grads says so.
template <typename Real>
struct GateGrads {
  Real* input = nullptr;      // [T, N, G*H] out: the input side's, in x's order (dW_ih, db_ih)
  Real* recurrent = nullptr;  // [T, N, G*H] out: the recurrent side's where they differ (GRU:
                              //   r scales the n gate's), else nullptr (dW_hh, db_hh)
  Real* h_prev = nullptr;     // [T, N, H] out: the state each step multiplied W_hh by
};

// What a training forward keeps for backward (opaque; workspace.h).
class StackCacheBase {
 public:
  virtual ~StackCacheBase() = default;
  virtual int64_t nbytes() const = 0;  // memory held
};
template <typename Real>
class StackCache;

// Forward of the stack.
//   y: [T, N, D*H_out] out: last layer's output, forward direction first; 0 past a row's length
//   h_n: [L*D, N, H_out] out: h at each row's last step, index layer*D + direction
//   c_n: [L*D, N, H] out: LSTM cell state likewise (nullptr otherwise)
//   x: [T, N, I] input;  h0: [L*D, N, H_out];  c0: [L*D, N, H] (LSTM)
//   params: [L*D] parameters
//   lengths: [N] each in 1..T, any order; nullptr = all T (PackedSequence semantics)
//   dropout_masks: [L-1] pointers to [T, N, D*H_out] masks multiplying layer k's output
//      before layer k+1; nullptr = none
// Returns the cache when shape.training, else nullptr. The cache refers to x,
// params and dropout_masks: they must stay alive and unchanged until backward.
// Throws std::invalid_argument on bad sizes or lengths.
template <typename Real>
std::unique_ptr<StackCache<Real>> stack_forward(Real* y, Real* h_n, Real* c_n, const Real* x,
                                                const Real* h0, const Real* c0,
                                                const Params<Real>* params, const int64_t* lengths,
                                                const Real* const* dropout_masks,
                                                const StackShape& shape);

// Backward of the stack. Without consume it may be called more than once, and
// concurrently, per cache. With consume it writes the gate gradients over the
// saved gates instead of into scratch of the same size (the memory a training
// step needs drops by that much) and the cache can serve no further backward.
//   dx: [T, N, I] out;  dh0: [L*D, N, H_out] out;  dc0: [L*D, N, H] out (LSTM; else nullptr)
//   grads: [L*D] parameter gradients, ADDED into
//   dy: [T, N, D*H_out] gradient of y;  dh_n: [L*D, N, H_out];  dc_n: [L*D, N, H]; each nullptr = zeros
// Throws std::invalid_argument when the cache was consumed already.
// assign: the parameter gradients are written over instead of added into.
// gate_grads: the parameter gradients are not computed (grads unused) and the gate
// gradients come back there instead; needs hands_back_gate_grads and no consume.
template <typename Real>
void stack_backward(Real* dx, Real* dh0, Real* dc0, const Grads<Real>* grads, const Real* dy,
                    const Real* dh_n, const Real* dc_n, StackCache<Real>& cache, bool consume,
                    bool assign = false, const GateGrads<Real>* gate_grads = nullptr);

// Whether a backward of this cache can hand back gate gradients (GateGrads): one
// layer, one direction walked from the first step, no lengths, of an LSTM (without
// projection or peepholes), GRU or RNN, without regularizers. Their weight
// gradients are then products of the gate gradients with x and h alone.
template <typename Real>
bool hands_back_gate_grads(const StackCache<Real>& cache);

// dW[G*H, width] = dG^T inputs (+ dW unless assign), and db[G*H] = the column sums
// of dG (likewise; db may be nullptr): the weight gradients of the rows of many
// steps at once (GateGrads), dG [rows, G*H] and inputs [rows, width]. On the pool,
// each thread a share of the gate rows.
template <typename Real>
void gate_weight_gradients(Real* dW, Real* db, const Real* dG, const Real* inputs, int64_t rows,
                           int64_t gate_rows, int64_t width, bool assign);

// The zoneout seed of layer-direction ld (Params::zone_seed) from a call's seed:
// splitmix64(seed + ld) (regularizers.h: zoneout_keep).
uint64_t zoneout_layer_seed(uint64_t seed, int64_t ld);

// Threads for a call's jobs (the directions run in turn, each on all of them).
void set_num_threads(int n);
int get_num_threads();
// For tests: calls whose steps are at most `work` multiply-adds run on the calling
// thread alone (stack.cpp, call_threads); negative restores the default.
void set_serial_step_work(double work);

}  // namespace lstmfast
