// The time loops of a layer, written once for every cell whose step is one
// recurrent product followed by pointwise math (LSTM without projection, GRU,
// RNN, CTRNN). A cell file defines a small cell type (its per-unit forward and
// backward math and what it saves) and calls forward_layer / backward_layer; the
// drivers here choose the path and apply lengths, directions, recurrent dropout,
// zoneout and the reduced precisions:
//   direct   a short call of few rows (direct_weights): one product per step on
//            the weights in place, then the rows' math;
//   reduced  int8 or bfloat16 weights, inference (reduced_steps);
//   fused    the persistent pool (forward_on_pool): the cell's math runs in the
//            micro-kernel's epilogue, so the pre-activations stay in registers.
// The backward is backward_on_pool with the cell's pointwise per row.
//
// The cell type:
//   kGates            G: blocks of H in W_ih and W_hh (one product of G*H columns)
//   kSaved            columns of H per row that training keeps in LayerBuffers::gates
//   kCellState        the cell carries c beside h (LSTM)
//   kLeavesDh         its backward leaves a part of dh that bypasses W_hh (GRU's z,
//                     the CTRNN's leak): backward_on_pool adds dG W_hh to it
//   kSplitInputGrads  the input side's gate gradients differ from the recurrent
//                     side's (GRU: r multiplies W_hn h), so dG_in is its own buffer
//   kZoneoutRaw       with zoneout, training keeps the unzoned h~ in gates (the
//                     backward takes the activation's derivative from it: RNN)
//   kNoise            the cell adds per-step noise (LayerWeights::noise: CTRNN)
//   kFirstGates       G0 = G, or fewer when a step makes a second product
//                     (CellInfo::second_product): the first multiplies h by W_hh's
//                     first G0 gates, the cell's forward writes u of each row
//                     (row.u()), and the second multiplies u by the others
//   forward<kTraining>(row, j, lanes, rec)  units j..j+lanes-1 of one row, rec[g]
//                     the recurrent pre-activation of gate g < G0 (bias not added)
//   forward_second<kTraining>(row, j, lanes, rec)  the same after the second
//                     product: rec[g] of gate G0 + g (second-product cells only)
//   backward_row(row, k, b, j0, units)      the units' gradients of one row, from row
//   backward_second_row(row, k, b, j0, units)  after du (second-product cells only)
//   backward_step(k, n, j0, j1)             before a step's rows (optional work)
// Cells whose step does not fit (the LSTM's projection, the layer-normalized
// LSTM's whole-row statistics) keep their own loops beside the cell's use of
// these. Included only by the per-ISA kernel units (the cell files).
#pragma once

#include <type_traits>

#include "drivers/drivers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// Where one row of one step reads and writes (sorted row b at step k), as a cell's
// forward reads it: row.xp(), row.h_prev(), ... Pointers are at the row's first
// unit; gate blocks are H apart. Two kinds give the same calls: StepRows::Row works
// each pointer out when the cell asks for it (inside the micro-kernel's epilogue,
// called for every block of units of every row, a row of every pointer worked out
// and passed as a struct made an Elman RNN 15% slower), RowPointers holds them (a
// cell's own loop: the LSTM's projection).
//   xp      x W_ih^T, G blocks
//   h_prev  h of the step before;  h_next  h of this step, out;  y  the output row, out
//   c_prev, c_next   the cell state (kCellState)
//   saved   kSaved blocks kept for backward (training; a second-product cell's in
//           inference too), else nullptr
//   noise   per-step additive noise (kNoise), else nullptr
//   h_rec   h as the product saw it (times the recurrent dropout mask; second product)
//   u       the second product's input, out (second-product cells)
template <typename Real>
struct RowPointers {
  const Real* xp_ = nullptr;
  const Real* h_prev_ = nullptr;
  Real* h_next_ = nullptr;
  Real* y_ = nullptr;
  const Real* c_prev_ = nullptr;
  Real* c_next_ = nullptr;
  Real* saved_ = nullptr;
  const Real* xp() const { return xp_; }
  const Real* h_prev() const { return h_prev_; }
  Real* h_next() const { return h_next_; }
  Real* y() const { return y_; }
  const Real* c_prev() const { return c_prev_; }
  Real* c_next() const { return c_next_; }
  Real* saved() const { return saved_; }
  const Real* noise() const { return nullptr; }
  const Real* h_rec() const { return nullptr; }
  Real* u() const { return nullptr; }
};

template <typename Real>
struct BackwardRow {
  Real* dG_in;         // out: gradient of the input pre-activations (G blocks)
  Real* dG;            // out: gradient of the recurrent pre-activations (== dG_in unless split)
  Real* dh;            // in: gradient of h'; out: the part that bypasses W_hh (kLeavesDh), else unused after
  Real* dc;            // in: gradient of c'; out: gradient of c (kCellState)
  const Real* dy;      // added to dh, or nullptr (folded in already with zoneout)
  const Real* saved;   // what forward kept (kSaved blocks)
  const Real* h_prev;  // h of the step before (the product's input, unmasked)
  const Real* h_next;  // h' of the step (the saved one: zoned with zoneout)
  const Real* c_prev;  // c (kCellState)
  const Real* c_next;  // c' (kCellState)
  // second-product cells, in backward_second_row:
  const Real* du;      // the gradient of u
  const Real* h_rec;   // h as the product saw it
  Real* dh_rec;        // out: the gradient of h_rec through u, written (add_dh_rec: added)
  bool add_dh_rec;
};

// Whether a cell makes a second product per step.
template <class Cell>
constexpr bool kSecondProduct = Cell::kFirstGates < Cell::kGates;

// Row stride of xproj: the saved row's when the projection is written into the
// saved gates (LayerBuffers::xproj), else G blocks.
template <class Cell, typename Real>
inline int64_t cell_xproj_stride(const LayerBuffers<Real>& buf, int64_t H) {
  return buf.xproj == buf.gates ? Cell::kSaved * H : Cell::kGates * H;
}

// A second-product cell keeps its gates in inference too (one step's: slot 0).
template <class Cell, typename Real>
inline Real* cell_saved(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k, int64_t b,
                        bool training) {
  if (Cell::kSaved == 0 || !buf.gates || !(training || kSecondProduct<Cell>)) return nullptr;
  return buf.gates + ((training ? k : 0) * s.N + b) * Cell::kSaved * s.H;
}

// Rows of u of step k (second-product cells): every step's in training, one in inference.
template <class Cell, typename Real>
inline Real* cell_u(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k, bool training) {
  if constexpr (kSecondProduct<Cell>)
    return buf.u + (training ? k : 0) * s.N * s.H;
  else
    return nullptr;
}

// The unzoned h~ of step k for zoneout (kZoneoutRaw), else nullptr.
template <class Cell, typename Real>
inline Real* cell_zoneout_raw(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k) {
  if constexpr (Cell::kZoneoutRaw)
    return s.training ? buf.gates + k * s.N * s.H : nullptr;
  else
    return nullptr;
}

// The forward of one row from the rows of buf.rec (the direct and reduced paths),
// units j0..j1-1 (all by default); kSecond: the second product's part (rec from
// gate G0 on).
template <class Cell, bool kTraining, bool kSecond = false, class Row, typename Real>
inline void cell_forward_row(const Cell& cell, const Row& row, const Real* rec, int64_t H,
                             int64_t j0 = 0, int64_t j1 = -1) {
  constexpr int G = kSecond ? Cell::kGates - Cell::kFirstGates : Cell::kFirstGates;
  if (j1 < 0) j1 = H;
  auto gate_math = [&](int64_t j, int64_t lanes, const V<Real>* acc) LSTMFAST_LAMBDA_INLINE {
    if constexpr (kSecond)
      cell.template forward_second<kTraining>(row, j, lanes, acc);
    else
      cell.template forward<kTraining>(row, j, lanes, acc);
  };
  // Two blocks of units a pass, the products of both read before either's gate
  // math: their chains of activations overlap (int8 LSTM T=100 N=8 I=H=256, one
  // thread, Zen 4: 2.79 -> 2.67 ms; three or four blocks a pass gained less).
  constexpr int64_t W = kWidth<Real>;
  for (; j0 + 2 * W <= j1; j0 += 2 * W) {
    V<Real> acc[2][G];
    for (int u = 0; u < 2; ++u)
      for (int g = 0; g < G; ++g) acc[u][g] = ld(rec + g * H + j0 + u * W, W);
    for (int u = 0; u < 2; ++u) gate_math(j0 + u * W, W, acc[u]);
  }
  for_lanes<Real>(j1 - j0, [&](int64_t jj, int64_t lanes) {
    const int64_t j = j0 + jj;
    V<Real> acc[G];
    for (int g = 0; g < G; ++g) acc[g] = ld(rec + g * H + j, lanes);
    gate_math(j, lanes, acc);
  });
}

// The rows of step k: the step's bases, computed once, and row(b) the pointers of
// sorted row b, only those the cell reads (its traits). The fused path calls row(b)
// for every block of units of every row, inside the micro-kernel's epilogue: with
// every pointer worked out there, an Elman RNN (one tanh per unit) ran 15% slower.
template <class Cell, bool kTraining, typename Real>
struct StepRows {
  const Walk& walk;
  int64_t k, H, ldx, ldy;
  const Real* xproj;
  const Real* h_prev;
  Real* h_next;
  Real* y;
  const Real* c_prev = nullptr;
  Real* c_next = nullptr;
  Real* saved = nullptr;
  const Real* noise = nullptr;
  const Real* h_rec = nullptr;
  Real* u = nullptr;

  StepRows(const Walk& walk_, const LayerBuffers<Real>& buf, Real* y_, int64_t ldy_,
           const LayerWeights<Real>& w, int64_t ldx_, int64_t k_, int64_t prev_slot,
           int64_t next_slot)
      : walk(walk_), k(k_), H(walk_.s.H), ldx(ldx_), ldy(ldy_), xproj(buf.xproj),
        h_prev(buf.h + prev_slot * walk_.s.N * walk_.s.H),
        h_next(buf.h + next_slot * walk_.s.N * walk_.s.H), y(y_) {
    const LayerShape& s = walk.s;
    if constexpr (Cell::kCellState) {
      c_prev = buf.c + prev_slot * s.N * H;
      c_next = buf.c + next_slot * s.N * H;
    }
    saved = cell_saved<Cell>(buf, s, k, 0, kTraining);
    if constexpr (Cell::kNoise) noise = w.noise;
    if constexpr (kSecondProduct<Cell>) {
      h_rec = product_input(buf, k, s);
      u = cell_u<Cell>(buf, s, k, kTraining);
    }
  }

  // Sorted row b of the step: a view, its pointers worked out as the cell asks.
  struct Row {
    const StepRows& step;
    int64_t b;
    LSTMFAST_ALWAYS_INLINE const Real* xp() const {
      return step.xproj + step.walk.x_row(step.k, b) * step.ldx;
    }
    LSTMFAST_ALWAYS_INLINE const Real* h_prev() const { return step.h_prev + b * step.H; }
    LSTMFAST_ALWAYS_INLINE Real* h_next() const { return step.h_next + b * step.H; }
    LSTMFAST_ALWAYS_INLINE Real* y() const { return step.y + step.walk.at(step.k, b) * step.ldy; }
    LSTMFAST_ALWAYS_INLINE const Real* c_prev() const { return step.c_prev + b * step.H; }
    LSTMFAST_ALWAYS_INLINE Real* c_next() const { return step.c_next + b * step.H; }
    LSTMFAST_ALWAYS_INLINE Real* saved() const {
      return step.saved ? step.saved + b * Cell::kSaved * step.H : nullptr;
    }
    LSTMFAST_ALWAYS_INLINE const Real* noise() const {
      return step.noise ? step.noise + step.walk.at(step.k, b) * step.H : nullptr;
    }
    LSTMFAST_ALWAYS_INLINE const Real* h_rec() const { return step.h_rec + b * step.H; }
    LSTMFAST_ALWAYS_INLINE Real* u() const { return step.u + b * step.H; }
  };

  LSTMFAST_ALWAYS_INLINE Row row(int64_t b) const { return Row{*this, b}; }
};

// Finished rows n..N-1 keep their state (units j0..j1-1), so the last slot holds
// h_n (and c_n) and every saved row is finite for the weight-gradient GEMMs (u too).
template <class Cell, typename Real>
inline void keep_finished_rows(const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k,
                               int64_t n, int64_t prev_slot, int64_t next_slot, int64_t j0,
                               int64_t j1) {
  const int64_t N = s.N, H = s.H;
  Real* u = cell_u<Cell>(buf, s, k, s.training);
  for (int64_t b = n; b < N; ++b) {
    if (u) zero_row(u + b * H + j0, j1 - j0);
    copy_row(buf.h + (next_slot * N + b) * H + j0, buf.h + (prev_slot * N + b) * H + j0, j1 - j0);
    if (Cell::kCellState)
      copy_row(buf.c + (next_slot * N + b) * H + j0, buf.c + (prev_slot * N + b) * H + j0,
               j1 - j0);
  }
}

template <class Cell, bool kTraining, typename Real>
void cell_forward_direct(const Cell& cell, Real* y, int64_t ldy, const LayerBuffers<Real>& buf,
                         const Real* x, const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = Cell::kGates * H, S = steps_of(s);
  const int64_t ldx = cell_xproj_stride<Cell>(buf, H);
  const int64_t cH = Cell::kCellState ? H : 0;
  direct_input_projection(buf.xproj, ldx, x, w, GH, buf, s);
  for (int64_t k = 0; k < S; ++k) {
    const int64_t n = walk.active(k), prev = slot(k, kTraining), next = slot(k + 1, kTraining);
    mask_state(buf, k, s, 0, N, 0, H);  // recurrent dropout (regularizers.h)
    constexpr int64_t G0 = Cell::kFirstGates;
    weight_product(buf.rec, GH, product_input(buf, k, s), w.W_hh, w.W_hh_r, n, H, G0 * H, buf, w,
                   s.threads);
    const StepRows<Cell, kTraining, Real> rows(walk, buf, y, ldy, w, ldx, k, prev, next);
    for (int64_t b = 0; b < n; ++b)
      cell_forward_row<Cell, kTraining>(cell, rows.row(b), buf.rec + b * GH, H);
    if constexpr (kSecondProduct<Cell>) {  // float weights only (no reduced features)
      weight_product(buf.rec + G0 * H, GH, cell_u<Cell>(buf, s, k, kTraining), w.W_hh + G0 * H * H,
                     static_cast<const ReducedMatrix*>(nullptr), n, H, GH - G0 * H, buf, w,
                     s.threads);
      for (int64_t b = 0; b < n; ++b)
        cell_forward_row<Cell, kTraining, true>(cell, rows.row(b), buf.rec + b * GH + G0 * H, H);
    }
    keep_finished_rows<Cell>(buf, s, k, n, prev, next, 0, H);
    if (zoneout(w, s))
      zoneout_step(buf, y, ldy, w, s, k, n, 0, H, 0, cH, cell_zoneout_raw<Cell>(buf, s, k));
  }
}

// Weights (elements of W_ih and W_hh together) from which a direct call runs as one
// pool job, each thread owning a range of units: it multiplies x and h by its rows
// of every gate and does those units' math, so the weights of its units stay in its
// own core's cache from call to call and a step needs one barrier. Below, the call
// runs on the calling thread (and so do the cells this path leaves to
// cell_forward_direct, whose products direct_gemm cuts over the pool only from 2^20
// elements each, a job per product, the math on one thread).
constexpr int64_t kDirectPoolWeights = int64_t(1) << 18;

// Whether a short call whose weights come packed once (LayerWeights::W_hh_p) still
// reads them in place: only when they fit in L1, where the packed path's setup
// costs more than reading them where they lie (float32 LSTM, T = 1, N = 1, one
// thread, Zen 4: H = 16 and 32 (8 and 32 KB of weights) 5.8 and 6.3 us in place,
// 6.3 and 6.7 packed; H = 48 (72 KB) 7.2 and 7.1, H = 128 13.4 and 12.8; GRU
// H = 128, T = 10: 52.8 against 36.5).
constexpr int64_t kInPlacePackedBytes = 32 * 1024;
template <class Cell, typename Real>
inline bool in_place_beats_panels(const LayerShape& s) {
  return Cell::kGates * s.H * (s.I + s.H) * static_cast<int64_t>(sizeof(Real)) <=
         kInPlacePackedBytes;
}

// Whether cell_forward_direct_on_pool runs this direct call: more than one thread,
// float weights, no projection, no second product, no regularizer that masks h or
// mixes the step's units (cell_forward_direct keeps those).
template <class Cell, typename Real>
inline bool direct_on_pool(const LayerBuffers<Real>& buf, const LayerWeights<Real>& w,
                           const LayerShape& s) {
  return s.threads > 1 && !kSecondProduct<Cell> && !w.W_hh_r && !w.W_ih_r && !s.round_bf16 &&
         s.P == 0 && !buf.hm && !zoneout(w, s) &&
         Cell::kGates * s.H * (s.I + s.H) >= kDirectPoolWeights;
}

// Measured with NumPy calls back to back, 2 threads, AVX-512, float32 LSTM I=H=256:
// T=16 N=1 0.49-0.58 ms against 0.68-0.94 ms on the calling thread alone (three
// process pairs); T=4 N=4 0.39-0.46 against 0.57-0.73 ms; GRU(32, 512) one step at a
// time 102-217 us against 182-283.
template <class Cell, bool kTraining, typename Real>
void cell_forward_direct_on_pool(const Cell& cell, Real* y, int64_t ldy,
                                 const LayerBuffers<Real>& buf, const Real* x,
                                 const LayerWeights<Real>& w, const LayerShape& s) {
  constexpr int G = Cell::kGates;
  const Walk walk(s);
  const int64_t H = s.H, GH = G * H, S = steps_of(s);
  const int64_t ldx = cell_xproj_stride<Cell>(buf, H);
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    // Gate g of these units: rows g*H + j0.. of each weight, columns g*H + j0.. of the product.
    if (units > 0)
      for (int g = 0; g < G; ++g)
        row_gemm(buf.xproj + g * H + j0, ldx, x, w.W_ih + (g * H + j0) * s.I, x_rows(s), s.I,
                 units);
    for (int64_t k = 0; k < S; ++k) {
      const int64_t n = walk.active(k), prev = slot(k, kTraining), next = slot(k + 1, kTraining);
      if (units > 0) {
        const Real* h = product_input(buf, k, s);
        for (int g = 0; g < G; ++g)
          row_gemm(buf.rec + g * H + j0, GH, h, w.W_hh + (g * H + j0) * H, n, H, units);
        const StepRows<Cell, kTraining, Real> rows(walk, buf, y, ldy, w, ldx, k, prev, next);
        for (int64_t b = 0; b < n; ++b)
          cell_forward_row<Cell, kTraining>(cell, rows.row(b), buf.rec + b * GH, H, j0, mine.j1);
        keep_finished_rows<Cell>(buf, s, k, n, prev, next, j0, mine.j1);
      }
      if (k + 1 < S) pool_barrier();  // the next step reads every unit of h
    }
  };
  run_on_pool(s.threads, body);
}

// float32 only, as reduced weights are.
template <class Cell, typename Real>
void cell_forward_reduced(const Cell& cell, Real* y, int64_t ldy, const LayerBuffers<Real>& buf,
                          const Real* x, const LayerWeights<Real>& w, const LayerShape& s) {
  if constexpr (std::is_same<Real, float>::value) {
    const Walk walk(s);
    const int64_t N = s.N, H = s.H, GH = Cell::kGates * H;
    auto first = [&](int64_t k, int64_t b, bool running) {
      const int64_t prev = k & 1, next = (k + 1) & 1;
      if (running)
        cell_forward_row<Cell, false>(
            cell, StepRows<Cell, false, Real>(walk, buf, y, ldy, w, GH, k, prev, next).row(b),
            buf.rec + b * GH, H);
      else if (Cell::kCellState)  // reduced_steps keeps h of a finished row
        copy_row(buf.c + (next * N + b) * H, buf.c + (prev * N + b) * H, H);
      else if (kSecondProduct<Cell>)  // u of a finished row is prepared, not multiplied
        zero_row(buf.u + b * H, H);
    };
    if constexpr (kSecondProduct<Cell>) {
      constexpr int64_t G0 = Cell::kFirstGates;
      reduced_steps(buf, x, GH, w, s, first, G0 * H, [&](int64_t k, int64_t b, bool running) {
        if (running)
          cell_forward_row<Cell, false, true>(
              cell,
              StepRows<Cell, false, Real>(walk, buf, y, ldy, w, GH, k, k & 1, (k + 1) & 1).row(b),
              buf.rec + b * GH + G0 * H, H);
      });
    } else {
      reduced_steps(buf, x, GH, w, s, first);
    }
  }
}

template <class Cell, bool kTraining, typename Real>
void cell_forward_fused(const Cell& cell, Real* y, int64_t ldy, const LayerBuffers<Real>& buf,
                        const Real* x, const LayerWeights<Real>& w, const LayerShape& s) {
  constexpr int G = Cell::kGates;
  const Walk walk(s);
  const int64_t H = s.H;
  const int64_t ldx = cell_xproj_stride<Cell>(buf, H);
  constexpr int G0 = Cell::kFirstGates;
  // The step is inlined into the pool job: a call per step left the epilogue's setup
  // out of the loop's reach (a CTRNN of 64 units, 3% slower).
  // A cell of one product carries the input projection in a call of one row
  // (recurrent_row_step_carrying; forward_on_pool gives it only then, so n is 1).
  constexpr bool kCarry = G0 == G && kCarryingFits;
  auto step = [&](int64_t k, int64_t n, const UnitShare& mine,
                  const CarriedProjection<Real>* carried = nullptr) LSTMFAST_LAMBDA_INLINE {
    const int64_t prev = slot(k, kTraining), next = slot(k + 1, kTraining);
    const StepRows<Cell, kTraining, Real> rows(walk, buf, y, ldy, w, ldx, k, prev, next);
    auto epilogue = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
      cell.template forward<kTraining>(rows.row(b), j, lanes, acc);
    };
    if (carried)
      recurrent_row_step_carrying<Real, G0>(product_input(buf, k, s), H, buf.W_hh_p, H, mine.u0,
                                            mine.u1, *carried, epilogue);
    else
      recurrent_step<Real, G0>(product_input(buf, k, s), H, n, H, buf.W_hh_p, H, mine.u0,
                               mine.u1, epilogue);
    if constexpr (kSecondProduct<Cell>) {
      auto second = [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
        cell.template forward_second<kTraining>(rows.row(b), j, lanes, acc);
      };
      pool_barrier();  // the second product reads u of every unit
      recurrent_step<Real, G - G0>(cell_u<Cell>(buf, s, k, kTraining), H, n, H,
                                   buf.W_hh_p + packed_size(G0, H, H), H, mine.u0, mine.u1,
                                   second);
    }
    if (zoneout(w, s))
      zoneout_step(buf, y, ldy, w, s, k, n, mine.j0, mine.j1, Cell::kCellState ? mine.j0 : 0,
                   Cell::kCellState ? mine.j1 : 0, cell_zoneout_raw<Cell>(buf, s, k));
    keep_finished_rows<Cell>(buf, s, k, n, prev, next, mine.j0, mine.j1);
  };
  forward_on_pool<Real, G, G0, kCarry>(buf, x, ldx, w, s, step);
}

// One layer in one direction, forward: the path for this call, then h_n (and c_n).
template <class Cell, typename Real>
void forward_layer(const Cell& cell, Real* y, int64_t ldy, Real* h_n, Real* c_n,
                   const LayerBuffers<Real>& buf, const Real* x, const Real* h0, const Real* c0,
                   const LayerWeights<Real>& w, const LayerShape& s) {
  const Walk walk(s);
  const int64_t N = s.N, H = s.H;
  gather_state(buf.h, h0, H, walk);
  if (Cell::kCellState) gather_state(buf.c, c0, H, walk);
  int64_t last;  // slot of the final state
  if (w.W_hh_r) {
    cell_forward_reduced(cell, y, ldy, buf, x, w, s);
    last = steps_of(s) & 1;
  } else {
    const bool direct = direct_weights(s) && (!w.W_hh_p || in_place_beats_panels<Cell, Real>(s));
    const bool on_pool = direct && direct_on_pool<Cell>(buf, w, s);
    if (on_pool && s.training)
      cell_forward_direct_on_pool<Cell, true>(cell, y, ldy, buf, x, w, s);
    else if (on_pool)
      cell_forward_direct_on_pool<Cell, false>(cell, y, ldy, buf, x, w, s);
    else if (direct && s.training)
      cell_forward_direct<Cell, true>(cell, y, ldy, buf, x, w, s);
    else if (direct)
      cell_forward_direct<Cell, false>(cell, y, ldy, buf, x, w, s);
    else if (s.training)
      cell_forward_fused<Cell, true>(cell, y, ldy, buf, x, w, s);
    else
      cell_forward_fused<Cell, false>(cell, y, ldy, buf, x, w, s);
    last = slot(steps_of(s), s.training);
  }
  scatter_state(h_n, buf.h + last * N * H, H, walk);
  if (Cell::kCellState) scatter_state(c_n, buf.c + last * N * H, H, walk);
}

// One layer in one direction, backward (BPTT) on the pool: at every step each
// thread runs the cell's backward on its units of every running row and zeroes
// the gate gradients of finished rows; backward_on_pool does the rest.
template <class Cell, typename Real>
void backward_layer(Cell& cell, Real* dG_x, Real* dh0, Real* dc0, const LayerGrads<Real>& dw,
                    const LayerBuffers<Real>& buf, const Real* dy, int64_t lddy, const Real* dh_n,
                    const Real* dc_n, const Real* x, const LayerWeights<Real>& w,
                    const LayerShape& s) {
  constexpr int G = Cell::kGates;
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, GH = G * H;
  // The gate gradients: in scratch, or over the saved gates (see LayerBuffers::dG).
  Real* dG_in;
  Real* dG;
  int64_t ldg;
  if (Cell::kSplitInputGrads) {
    dG_in = input_gate_grads(dG_x, buf.dG_in, s);
    dG = buf.dG ? buf.dG : buf.gates;
    ldg = buf.dG ? GH : Cell::kSaved * H;
  } else {
    dG = dG_in = input_gate_grads(dG_x, buf.dG ? buf.dG : buf.gates, s);
    ldg = GH;
  }
  gather_state(buf.dh, dh_n, H, walk);
  if (Cell::kCellState) gather_state(buf.dc, dc_n, H, walk);
  const Real* dy_cell = zoneout_dy(dy, w, s);
  auto pointwise = [&](int64_t k, int64_t n, const UnitShare& mine) {
    const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
    cell.backward_step(k, n, mine.j0, mine.j1);
    for (int64_t b = 0; b < n; ++b) {
      BackwardRow<Real> row;
      row.dG_in = dG_in + (k * N + b) * GH + j0;
      row.dG = dG + (k * N + b) * ldg + j0;
      row.dh = buf.dh + b * H + j0;
      row.dc = Cell::kCellState ? buf.dc + b * H + j0 : nullptr;
      row.dy = dy_cell ? dy_cell + walk.at(k, b) * lddy + j0 : nullptr;
      row.saved = Cell::kSaved && buf.gates ? buf.gates + (k * N + b) * Cell::kSaved * H + j0 : nullptr;
      row.h_prev = buf.h + (k * N + b) * H + j0;
      row.h_next = buf.h + ((k + 1) * N + b) * H + j0;
      row.c_prev = Cell::kCellState ? buf.c + (k * N + b) * H + j0 : nullptr;
      row.c_next = Cell::kCellState ? buf.c + ((k + 1) * N + b) * H + j0 : nullptr;
      cell.backward_row(row, k, b, j0, units);
    }
    for (int64_t b = n; b < N; ++b)
      for (int g = 0; g < G; ++g) {
        zero_row(dG_in + (k * N + b) * GH + g * H + j0, units);
        if (Cell::kSplitInputGrads) zero_row(dG + (k * N + b) * ldg + g * H + j0, units);
      }
  };
  auto second = [&](int64_t k, int64_t n, const UnitShare& mine, Real* dh_rec, bool add) {
    if constexpr (kSecondProduct<Cell>) {
      const int64_t j0 = mine.j0, units = mine.j1 - mine.j0;
      const Real* h_rec = product_input(buf, k, s);
      for (int64_t b = 0; b < n; ++b) {
        BackwardRow<Real> row{};
        row.dG_in = dG_in + (k * N + b) * GH + j0;
        row.dG = dG + (k * N + b) * ldg + j0;
        row.saved = buf.gates + (k * N + b) * Cell::kSaved * H + j0;
        row.du = buf.du + b * H + j0;
        row.h_rec = h_rec + b * H + j0;
        row.dh_rec = dh_rec + b * H + j0;
        row.add_dh_rec = add;
        cell.backward_second_row(row, k, b, j0, units);
      }
    }
  };
  backward_on_pool(dG_x, dw, buf, dG, ldg, dG_in, GH, Cell::kLeavesDh, x, w, s, pointwise, dy,
                   lddy, Cell::kFirstGates * H, second);
  scatter_state(dh0, buf.dh, H, walk);
  if (Cell::kCellState) scatter_state(dc0, buf.dc, H, walk);
}

// A cell's backward_step that does nothing.
struct NoBackwardStep {
  void backward_step(int64_t, int64_t, int64_t, int64_t) const {}
};

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
