// The time loops every cell's layer runs on the pool; the cells give the per-step
// part as a lambda: forward_on_pool (packs W_hh and W_ih once per call, projects the
// input a few steps ahead, then one recurrent_step per step with the cell's
// epilogue), reduced_steps (the same with int8 or bfloat16 weights) and
// backward_on_pool (the cell's pointwise backward, then dh = dG W_hh on the same
// tiles, then the weight gradients). The cell files include this header, which
// brings in every floor below it. Included only by the per-ISA kernel units.
#pragma once

#include "products/layer_products.h"
#include "products/recurrent_product.h"
#include "drivers/regularizers.h"

namespace lstmfast {
namespace LSTMFAST_ISA {

// The input projection of a few steps at a time (forward_on_pool): each thread
// projects the rows of the next steps onto its unit blocks, on W_ih packed as
// W_hh is, just before the steps read them. Projected all at once (one OpenBLAS
// GEMM per thread), xproj ([T, N, G*H]: 13 MB for LSTM N=32 H=256) had left the
// caches by the time each step read its rows: a quarter of the gate math's time
// went to those loads (AVX-512, one thread), and OpenBLAS first cleared all of
// xproj in a pass of its own (beta 0).
//
// Bytes of xproj one chunk of steps may fill: they stay in L2 until read.
constexpr int64_t kProjectionChunkBytes = 256 * 1024;
// Rows of x a chunk projects at least, whatever xproj then fills, once a thread's
// share of W_ih outgrows kProjectionResidentBytes: each chunk streams that share
// through the caches again, and below a few hundred rows that traffic, not the
// multiply-adds, sets the pace (LSTM T=50 N=16 I=H=1024, W_ih 16 MB: one step per
// chunk ran at 0.65x ONNX Runtime, 16 steps at 0.82x; AVX-512, one thread). A share
// that stays in L2 is better served by short chunks (LSTM N=8 I=H=256, two threads:
// 8 steps 0.80x, 32 steps 0.76x).
constexpr int64_t kProjectionChunkRows = 256;
constexpr int64_t kProjectionResidentBytes = 1 << 20;

// Whether the steps of a chunk read one contiguous block of rows of x: every walk
// but the reverse one with lengths (each row then starts at its own end).
template <typename Real>
inline bool projection_in_chunks(const LayerShape& s, const LayerBuffers<Real>& buf) {
  return buf.W_ih_p != nullptr && !(s.reverse && s.lengths);
}

// Steps per chunk: at least one. W_ih_share_bytes: the share of W_ih each thread
// projects with.
template <typename Real>
inline int64_t projection_chunk_steps(int64_t ldx, const LayerShape& s, int64_t W_ih_share_bytes) {
  const int64_t step_bytes = s.N * ldx * static_cast<int64_t>(sizeof(Real));
  const int64_t by_bytes =
      step_bytes >= kProjectionChunkBytes ? 1 : kProjectionChunkBytes / step_bytes;
  if (W_ih_share_bytes <= kProjectionResidentBytes) return by_bytes;
  const int64_t by_rows = (kProjectionChunkRows + s.N - 1) / s.N;
  return by_bytes > by_rows ? by_bytes : by_rows;
}

// The rows r0..r1-1 of x (and of xproj) of steps k0..k1-1: the rows of those steps'
// times are one block of x, in its order, as xproj's (LayerShape::offsets when
// packed).
inline void step_rows(const LayerShape& s, int64_t k0, int64_t k1, int64_t& r0, int64_t& r1) {
  const int64_t t0 = s.reverse ? s.T - k1 : k0, t1 = s.reverse ? s.T - k0 : k1;
  r0 = s.offsets ? s.offsets[t0] : t0 * s.N;
  r1 = s.offsets ? s.offsets[t1] : t1 * s.N;
}

// xproj rows of steps k0..k1-1 (rows ldx apart) = x W_ih^T for the units of blocks
// u0..u1-1 (W_ih_p packed by pack_gate_panels).
template <typename Real, int G>
inline void project_steps(Real* xproj, int64_t ldx, const Real* x, const Real* W_ih_p,
                          const LayerShape& s, int64_t k0, int64_t k1, int64_t u0, int64_t u1) {
  int64_t r0, r1;
  step_rows(s, k0, k1, r0, r1);
  const int64_t H = s.H;
  recurrent_step<Real, G>(x + r0 * s.I, s.I, r1 - r0, s.I, W_ih_p, H, u0, u1,
                          [&](int64_t b, int64_t j, int64_t lanes, const V<Real>* acc) {
                            Real* out = xproj + (r0 + b) * ldx + j;
                            for (int g = 0; g < G; ++g) st(out + g * H, acc[g], lanes);
                          });
}

// The steps of an inference layer with reduced W_hh and no projection, in one
// pool job (few products per step and a job each, as the direct path has, paid
// a wake-up per step and left the gate math to one thread). Every step:
//   0. every few steps (as forward_on_pool: projection_in_chunks), the input
//      projection of the next steps: the threads prepare their share of those
//      rows of x, and after a barrier each multiplies them by its panels of W_ih
//      into xproj (rows ldx apart); a call of one row on one thread carries it
//      instead (see `carrying` below): each chunk's steps project the next chunk
//      in the loops of step 1;
//   1. each thread multiplies h of the step (prepared: quantized or rounded) by
//      its panels of W_hh for all running rows, into buf.rec;
//   2. after a barrier, each thread takes its share of the N rows: for a running
//      row b (b < n) step_row(k, b, true) does the cell's gate math, writing h of
//      step k + 1 in slot (k + 1) & 1 of buf.h; a finished row keeps its h (copied
//      here) and step_row(k, b, false) keeps the cell's other state; then the
//      thread prepares its rows of the new h;
//   3. a barrier, as h of step k + 1 is read whole by every thread.
// Below kReducedSerialWork multiply-adds per step the calling thread does it all.
// The rows of h are prepared into buf.act_state, those of x into buf.act.
//
// A second product (first_rows < W_hh.M: CellInfo::second_product) splits step 2:
// step_row writes u of its rows (and zeroes a finished row's), the thread prepares
// them, and after a barrier each thread multiplies u by its share of the panels
// holding rows first_rows.. of W_hh; after another barrier second_row(k, b,
// running) finishes its rows. The panel holding row first_rows when it is not a
// multiple of kReducedPanel is multiplied by h and then by u: each product's
// columns are read before the next one writes them.
//
// With enough rows for every thread (kReducedRowsPerThread) and weights that stay
// in a core's cache (kReducedRowSplitBytes), the threads split the batch instead:
// each runs steps 0-3 for its own rows alone, the input projection of its rows
// included (one step at a time), and no step waits on a barrier. That costs each
// thread all of W_hh and W_ih per step instead of its share, and saves two
// barriers per step, at which a virtual machine's stolen or descheduled vCPU held
// every step of the other thread.
// Rows per thread from which a reduced layer splits the batch: a whole tile of
// rows (AVX2's) for each.
constexpr int64_t kReducedRowsPerThread = 4;
// Bytes of W_hh and W_ih (when projected step by step) up to which it does: every
// thread reads them whole at every step. Measured on a Zen 4 (1 MB of L2 per
// core), two threads, the same calls alternated in one process, split by rows
// against by panels: LSTM and GRU of I=H=256 (N = 8, 32) 1.11x-1.55x, I=H=512
// (N = 64; 1.5-4 MB) 1.04x-1.19x; I=H=1024 (N = 16): int8 (6-8 MB) 1.03x-1.08x,
// bfloat16 (12-16 MB) 0.79x-0.82x, its weights streamed from L3 twice over. On AMX
// a thread needs a whole tile of rows (ReducedProducts::full_tile_rows): measured on
// an Emerald Rapids Xeon, two threads, LSTM and GRU, bfloat16 and int8, by panels
// against by rows: N = 8 (tiles of 4 rows and an input projection of 4 rows a step
// when split) 1.12x-1.46x; N = 32 (16 rows each) 0.67x-0.83x.
constexpr int64_t kReducedRowSplitBytes = int64_t(6) << 20;

// The thread's shares of W_hh (bytes) with which a call of one row carries its input
// projection: one that stays in L1 leaves the product no loads to wait on, and the
// carrying only costs (LSTM I=H=32, one thread, Zen 4: 46.5 us a call apart, 51.5
// carried); one streamed from L3 ran slower too, its loads interleaved with more
// streams (I=64 H=512, 4 MB: 5.4 -> 5.8-6.0 ms), and a share of about the L2 gained
// little (I=H=256, 1 MB: 1.74 -> 1.71-1.81 ms).
constexpr int64_t kCarryingShareMinBytes = 32 * 1024;
constexpr int64_t kCarryingShareMaxBytes = 512 * 1024;
// The same with int8 weights (reduced_steps), of which the carrying gained only up
// to about 100 KB (T=100 N=1 I=H, one thread, AVX512_VNNI on a Zen 4, the same
// calls alternated by process: LSTM H=96 36 KB 112 -> 109 us, H=128 64 KB 169 ->
// 153, H=160 100 KB 217 -> 203; GRU H=128 48 KB 120 -> 116, H=160 75 KB 176 ->
// 173) and nothing from 150 KB (LSTM H=192 and 256, GRU H=256: the same times).
constexpr int64_t kCarryingInt8MaxBytes = 128 * 1024;

struct NoSecondRow {
  void operator()(int64_t, int64_t, bool) const {}
};

template <typename StepRow, typename SecondRow = NoSecondRow>
inline void reduced_steps(const LayerBuffers<float>& buf, const float* x, int64_t ldx,
                          const LayerWeights<float>& w, const LayerShape& s, StepRow&& step_row,
                          int64_t first_rows = -1, SecondRow&& second_row = SecondRow()) {
  const Walk walk(s);
  const ReducedMatrix& W_hh = *w.W_hh_r;
  const ReducedProducts& products = *w.products;
  const int64_t N = s.N, K = W_hh.K, S = steps_of(s);
  // W_ih widened to float32 (a bfloat16 layer without vdpbf16ps) or scattered rows:
  // projected at once.
  const bool chunked = w.W_ih_r && !(s.reverse && s.lengths);
  if (!chunked) direct_input_projection(buf.xproj, ldx, x, w, ldx, buf, s);
  const int threads = s.threads <= 1 || N * W_hh.M * K < kReducedSerialWork ? 1 : s.threads;
  const bool two_products = first_rows >= 0 && first_rows < W_hh.M;
  // An int8 call of one row on one thread carries its input projection along
  // (ReducedProducts::carrying_panels), where the kernels do and W_hh is read from
  // L2 (kCarryingInt8MaxBytes): the steps of each chunk of kCarriedInputRows
  // compute the next chunk's rows of xproj, a share of W_ih's panels each.
  const bool carrying = products.carrying_panels && W_hh.precision == Precision::Int8 &&
                        chunked && N == 1 && threads == 1 && !two_products &&
                        S >= 2 * kCarriedInputRows && W_hh.nbytes() > kCarryingShareMinBytes &&
                        W_hh.nbytes() <= kCarryingInt8MaxBytes;
  const int64_t chunk = carrying ? kCarriedInputRows
                                 : projection_chunk_steps<float>(
                                       ldx, s, chunked ? w.W_ih_r->nbytes() / threads : 0);
  // Panels of the first product, and the first panel of the second.
  const int64_t first_panels =
      two_products ? (first_rows + kReducedPanel - 1) / kReducedPanel : W_hh.panels;
  const int64_t second_from = two_products ? first_rows / kReducedPanel : W_hh.panels;
  // The gate math of rows b0..b1-1 at step k, n rows running, once the product is
  // in buf.rec: h of step k + 1 into h_next; a finished row keeps its h (copied
  // here) and step_row keeps the rest of its state.
  auto gate_math_rows = [&](int64_t k, int64_t n, int64_t b0, int64_t b1, float* h_next) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b >= n) copy_row(h_next + b * K, buf.h + (k & 1) * N * K + b * K, K);
      step_row(k, b, b < n);
    }
  };
  // A thread's own rows, multiplied by every panel, need no other thread's work:
  // the steps then run without a barrier (see kReducedRowsPerThread).
  const int64_t weight_bytes = W_hh.nbytes() + (chunked ? w.W_ih_r->nbytes() : 0);
  const int64_t rows_per_thread = products.full_tile_rows > kReducedRowsPerThread
                                      ? products.full_tile_rows
                                      : kReducedRowsPerThread;
  const bool by_rows = threads > 1 && N >= rows_per_thread * threads &&
                       weight_bytes <= kReducedRowSplitBytes && (!chunked || s.offsets || !s.rows);
  // The steps of rows b0..b1-1 alone: their rows of x projected step by step (x_row
  // of those rows is consecutive: packed, or in x's order), h prepared, multiplied
  // and stepped, by one thread.
  auto own_rows = [&](int64_t b0, int64_t b1) {
    const ActivationScratch state = buf.act_state->from_row(b0, W_hh.K_padded);
    products.prepare_rows(*buf.act_state, buf.h, K, W_hh, b0, b1);
    for (int64_t k = 0; k < S; ++k) {
      const int64_t n = walk.active(k);
      const int64_t running = (n < b1 ? n : b1) - b0;
      if (chunked && running > 0) {
        const ReducedMatrix& W_ih = *w.W_ih_r;
        const int64_t r = walk.x_row(k, b0);
        products.prepare_rows(*buf.act, x, s.I, W_ih, r, r + running);
        products.panels(buf.xproj + r * ldx, ldx, buf.act->from_row(r, W_ih.K_padded), running,
                        W_ih, 0, W_ih.panels);
      }
      if (running > 0)
        products.panels(buf.rec + b0 * W_hh.M, W_hh.M, state, running, W_hh, 0, first_panels);
      float* h_next = buf.h + ((k + 1) & 1) * N * K;
      gate_math_rows(k, n, b0, b1, h_next);
      if (two_products) {
        products.prepare_rows(*buf.act_state, buf.u, K, W_hh, b0, b1);
        if (running > 0)
          products.panels(buf.rec + b0 * W_hh.M, W_hh.M, state, running, W_hh, second_from,
                          W_hh.panels);
        for (int64_t b = b0; b < b1; ++b) second_row(k, b, b < n);
      }
      products.prepare_rows(*buf.act_state, h_next, K, W_hh, b0, b1);
    }
  };
  if (by_rows) {
    auto split = [&](int tid, int nt) { own_rows(N * tid / nt, N * (tid + 1) / nt); };
    run_on_pool(threads, split);
    return;
  }
  auto body = [&](int tid, int nt) {
    const int64_t p0 = first_panels * tid / nt, p1 = first_panels * (tid + 1) / nt;
    const int64_t second_panels = W_hh.panels - second_from;
    const int64_t q0 = second_from + second_panels * tid / nt;
    const int64_t q1 = second_from + second_panels * (tid + 1) / nt;
    const int64_t b0 = N * tid / nt, b1 = N * (tid + 1) / nt;
    auto barrier = [nt] {
      if (nt > 1) pool_barrier();
    };
    products.prepare_rows(*buf.act_state, buf.h, K, W_hh, b0, b1);
    barrier();
    // carrying: the next chunk's rows (prepared in act at their own rows), when whole
    ActivationScratch next_rows;
    CarriedPanels next{};
    bool next_carried = false;
    for (int64_t k = 0; k < S; ++k) {
      if (chunked && k % chunk == 0) {
        const int64_t k1 = k + chunk < S ? k + chunk : S;
        const ReducedMatrix& W_ih = *w.W_ih_r;
        if (!next_carried) {  // this chunk's rows, projected apart
          int64_t r0, r1;
          step_rows(s, k, k1, r0, r1);
          const int64_t rows = r1 - r0;
          products.prepare_rows(*buf.act, x + r0 * s.I, s.I, W_ih, rows * tid / nt,
                                rows * (tid + 1) / nt);
          barrier();
          products.panels(buf.xproj + r0 * ldx, ldx, *buf.act, rows, W_ih,
                          W_ih.panels * tid / nt, W_ih.panels * (tid + 1) / nt);
        }
        int64_t n0 = 0, n1 = 0;
        if (carrying && k1 < S) step_rows(s, k1, k1 + chunk < S ? k1 + chunk : S, n0, n1);
        next_carried = n1 - n0 == kCarriedInputRows;
        if (next_carried) {
          products.prepare_rows(*buf.act, x, s.I, W_ih, n0, n1);
          next_rows = buf.act->from_row(n0, W_ih.K_padded);
          next = {buf.xproj + n0 * ldx, ldx, &next_rows, &W_ih, 0, 0};
        }
      }
      const int64_t n = walk.active(k);
      if (next_carried) {  // one row (N = 1), running (the next chunk is whole)
        const int64_t i = k % chunk, panels = next.W_ih->panels;
        next.c0 = panels * i / chunk;
        next.c1 = panels * (i + 1) / chunk;
        products.carrying_panels(buf.rec, *buf.act_state, W_hh, p0, p1, next);
      } else {
        products.panels(buf.rec, W_hh.M, *buf.act_state, n, W_hh, p0, p1);
      }
      barrier();
      float* h_next = buf.h + ((k + 1) & 1) * N * K;
      gate_math_rows(k, n, b0, b1, h_next);
      if (two_products) {
        products.prepare_rows(*buf.act_state, buf.u, K, W_hh, b0, b1);
        barrier();
        products.panels(buf.rec, W_hh.M, *buf.act_state, n, W_hh, q0, q1);
        barrier();
        for (int64_t b = b0; b < b1; ++b) second_row(k, b, b < n);
      }
      products.prepare_rows(*buf.act_state, h_next, K, W_hh, b0, b1);
      if (k + 1 < S) barrier();  // as forward_on_pool's: the job's end joins the last step
    }
  };
  if (threads <= 1)
    body(0, 1);
  else
    run_on_pool(threads, body);
}

// W_hh packed for the forward (W_ih with G0 = G): panels of the first G0 gates, then
// of the other G - G0 at packed_size(G0, H, K) (CellInfo::second_product).
template <typename Real, int G, int G0>
inline void pack_recurrent_panels(Real* panels, const Real* W_hh, int64_t H, int64_t K,
                                  int64_t u0, int64_t u1) {
  pack_gate_panels<Real, G0>(panels, W_hh, H, K, u0, u1);
  if constexpr (G0 < G)
    pack_gate_panels<Real, G - G0>(panels + packed_size(G0, H, K), W_hh + G0 * H * K, H, K, u0,
                                   u1);
}

// What step k of a call of one row carries of the input projection
// (recurrent_row_step_carrying): its slice of the inputs, for the rows of the next
// chunk of kCarriedRows steps. False for a step of the last chunk.
template <typename Real>
inline bool carried_projection(CarriedProjection<Real>& cp, const Real* x, int64_t ldx,
                               const LayerBuffers<Real>& buf, const LayerShape& s, int64_t k) {
  const int64_t S = steps_of(s), next0 = (k / kCarriedRows + 1) * kCarriedRows;
  if (next0 >= S) return false;
  const int64_t next1 = next0 + kCarriedRows < S ? next0 + kCarriedRows : S, i = k % kCarriedRows;
  int64_t r0, r1;
  step_rows(s, next0, next1, r0, r1);
  cp = {x + r0 * s.I, buf.xproj + r0 * ldx, buf.W_ih_p, r1 - r0, s.I, s.H, ldx,
        s.I * i / kCarriedRows, s.I * (i + 1) / kCarriedRows};
  return true;
}

// The forward: each thread packs the panels (unless LayerWeights holds them packed
// once) and projects the inputs (rows ldx apart) of its unit blocks (a few steps
// ahead, or all at once: see projection_in_chunks), then runs step(k, n, mine) for
// every step k with n rows running, a barrier after each (the next step needs all
// of h). With G0 < G the step makes two recurrent products
// (CellInfo::second_product): W_hh's first G0 gates are packed as one set of panels
// and the other G - G0 after them, at packed_size(G0, H, H).
//
// kCarry: the step takes a fourth argument, the input projection it carries along
// (const CarriedProjection<Real>*, nullptr for none), which it hands to
// recurrent_row_step_carrying. Given in a call of one row whose inputs are projected
// in chunks: the first chunk of kCarriedRows steps is projected before its steps,
// each later one by the steps before it.
template <typename Real, int G, int G0 = G, bool kCarry = false, typename Step>
inline void forward_on_pool(const LayerBuffers<Real>& buf, const Real* x, int64_t ldx,
                            const LayerWeights<Real>& w, const LayerShape& s, Step&& step) {
  const Walk walk(s);
  const int64_t H = s.H, S = steps_of(s);
  const bool chunked = projection_in_chunks(s, buf);
  const int64_t sharing = s.threads > 1 ? s.threads : 1;
  const int64_t share_bytes = G0 * H * H * static_cast<int64_t>(sizeof(Real)) / sharing;
  const bool carried = kCarry && chunked && s.N == 1 && share_bytes > kCarryingShareMinBytes &&
                       share_bytes <= kCarryingShareMaxBytes;
  const int64_t chunk = carried ? kCarriedRows : projection_chunk_steps<Real>(
      ldx, s, G * H * s.I * static_cast<int64_t>(sizeof(Real)) / sharing);
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    if (!w.W_hh_p) pack_recurrent_panels<Real, G, G0>(buf.W_hh_p, w.W_hh, H, H, mine.u0, mine.u1);
    if (!chunked)
      input_projection_units(buf.xproj, ldx, x, w.W_ih, G, H, mine.j0, mine.j1, s);
    else if (!w.W_ih_p)
      pack_recurrent_panels<Real, G, G>(buf.W_ih_p, w.W_ih, H, s.I, mine.u0, mine.u1);
    if (buf.hm) {  // recurrent dropout: each thread masks its units of h, all rows
      mask_state(buf, 0, s, 0, s.N, mine.j0, mine.j1);
      pool_barrier();
    }
    for (int64_t k = 0; k < S; ++k) {
      if (chunked && (carried ? k == 0 : k % chunk == 0))
        project_steps<Real, G>(buf.xproj, ldx, x, buf.W_ih_p, s, k, k + chunk < S ? k + chunk : S,
                               mine.u0, mine.u1);
      if constexpr (kCarry) {
        CarriedProjection<Real> cp;
        const bool carries = carried && carried_projection(cp, x, ldx, buf, s, k);
        step(k, walk.active(k), mine, carries ? &cp : nullptr);
      } else {
        step(k, walk.active(k), mine);
      }
      mask_state(buf, k + 1, s, 0, s.N, mine.j0, mine.j1);
      // The next step reads every unit of h. After the last, the end of the job joins
      // the threads (as cell_forward_direct_on_pool's): no barrier before it, which
      // made a one-step call wait twice (about 0.1-0.3 us of 8.5: GRU(64, 128), T=1,
      // N=1, two threads kept awake).
      if (k + 1 < S) pool_barrier();
    }
  };
  run_on_pool(s.threads, body);
}

// The backward. A thread owns units j0..j1-1: at every step, last to first,
// pointwise(k, n, mine) writes its units' gate gradients into dG (GK columns, rows
// ldg apart) and leaves in dh the part of its gradient that bypasses W_hh; after a
// barrier (dh needs every unit's dG) the thread computes its columns of
// dh = dG W_hh (added to what pointwise left when accumulate_dh), which only its own
// next step reads. After the loop, a barrier and its share of the weight gradients.
//
// With zoneout (zoneout_step) the cell's pointwise is wrapped: it is given (1 - m) of
// the step's gradient (dy folded in, so the cell must read no dy: see zoneout_dy), and
// m of it is added to dh (and dc) after, before dh = dG W_hh is added.
//
// A cell with a second product (CellInfo::second_product: u = f(first) times the
// last GK - GK0 rows of W_hh) gives second(k, n, mine, dh_rec, add): after the
// barrier each thread computes its columns of du = dG[:, GK0:] W_hh[GK0:], and
// second, for its own units, turns du into the first gates' gradients and the part
// of h's gradient through u, which it writes (add: adds) to dh_rec; then
// (another barrier) dh_rec += dG[:, :GK0] W_hh[:GK0]. The weight gradients of the
// last rows take u in place of h.
struct NoSecondProduct {
  template <typename... A>
  void operator()(A&&...) const {}
};

template <typename Real, typename Pointwise, typename Second = NoSecondProduct>
inline void backward_on_pool(Real* dG_x, const LayerGrads<Real>& dw, const LayerBuffers<Real>& buf,
                             Real* dG, int64_t ldg, const Real* dG_in, int64_t GK,
                             bool accumulate_dh, const Real* x, const LayerWeights<Real>& w,
                             const LayerShape& s, Pointwise&& pointwise,
                             const Real* dy = nullptr, int64_t lddy = 0, int64_t GK0 = 0,
                             Second&& second = Second()) {
  if (GK0 == 0) GK0 = GK;
  const bool two_products = GK0 < GK;
  const Walk walk(s);
  const int64_t N = s.N, H = s.H, S = steps_of(s);
  const bool zoned = zoneout(w, s);
  const bool cell_leaves_dh = accumulate_dh;  // the cell writes a bypass into dh itself
  accumulate_dh = accumulate_dh || zoned;
  auto body = [&](int tid, int nt) {
    const UnitShare mine = unit_share<Real>(H, tid, nt);
    if (buf.W_hh_c) pack_column_panels(buf.W_hh_c, w.W_hh, GK, H, mine.u0, mine.u1);
    for (int64_t k = S - 1; k >= 0; --k) {
      const int64_t n = walk.active(k);
      if (mine.j1 > mine.j0) {
        if (zoned)
          zoneout_backward_before(buf, dy, lddy, w, s, k, n, mine.j0, mine.j1, mine.j0, mine.j1);
        pointwise(k, n, mine);
        if (zoned)
          zoneout_backward_after(buf, w, s, n, mine.j0, mine.j1, mine.j0, mine.j1, cell_leaves_dh);
      }
      pool_barrier();
      const Real* dG_step = dG + k * N * ldg;
      // With recurrent dropout the product goes to dh_rec first: the mask applies to it alone.
      Real* dh = buf.hm ? buf.dh_rec : buf.dh;
      bool accumulate = accumulate_dh && !buf.hm;
      if (two_products) {
        dh_product_stored(buf.du, dG_step + GK0, ldg, w.W_hh + GK0 * H, n, GK - GK0, H, mine.j0,
                          mine.j1, false);
        second(k, n, mine, dh, accumulate);
        accumulate = true;
        pool_barrier();  // the first gates' gradients of every unit
      }
      if (buf.W_hh_c)
        dh_product(dh, dG_step, ldg, buf.W_hh_c, n, GK0, H, mine.u0, mine.u1, accumulate);
      else
        dh_product_stored(dh, dG_step, ldg, w.W_hh, n, GK0, H, mine.j0, mine.j1, accumulate);
      if (buf.hm) masked_dh(buf, n, H, mine.j0, mine.j1, accumulate_dh);
    }
    pool_barrier();
    weight_gradients_share(tid, nt, dG_x, dw, buf.dsum, dG, ldg, dG_in, buf.hm ? buf.hm : buf.h, x,
                           GK, s, buf.u, GK0);
  };
  run_on_pool(s.threads, body);
}

}  // namespace LSTMFAST_ISA
}  // namespace lstmfast
