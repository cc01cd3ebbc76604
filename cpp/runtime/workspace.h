// Memory of the kernels: aligned blocks, a per-thread scratch block reused across
// calls, and the training cache (what BPTT needs, in one block).
#pragma once

#include <cstddef>
#include <cstdint>
#include <atomic>
#include <memory>
#include <vector>

#include "lstmfast.h"

namespace lstmfast {

// An uninitialised, 64-byte aligned block of memory.
class Block {
 public:
  Block() = default;
  explicit Block(size_t bytes);
  char* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(char* p) const;
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

// Cuts one block into 64-byte aligned arrays. Run a layout twice: first with no
// base to add up the bytes (take() then returns nullptr), then on a block of that
// size to hand out the pointers.
class Carver {
 public:
  explicit Carver(char* base = nullptr) : base_(base) {}
  template <typename Real>
  Real* take(int64_t count) {
    Real* p = base_ ? reinterpret_cast<Real*>(base_ + offset_) : nullptr;
    offset_ += (static_cast<size_t>(count) * sizeof(Real) + 63) / 64 * 64;
    return p;
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// This thread's scratch block, grown to at least `bytes` (its contents are not
// kept). Per thread, so concurrent calls never share scratch.
char* thread_scratch(size_t bytes);

// Memory for a training cache: a block given back by an earlier cache when one
// fits (at least bytes, at most twice that), else a new one. Training forwards of
// one shape follow one another, and a new block of tens of MB costs a page fault
// and a page clear per 4 KB on first touch: measured on an LSTM T=100 N=64
// I=H=512 training forward (2 threads), 215 ms in fresh memory, 168 ms reused.
Block cache_block(size_t bytes);
// Keeps a cache's block for cache_block; only the few most recently given back
// are kept (one training step of a model with several layers), older ones freed.
void give_back_cache_block(Block&& block);

// What a training forward keeps for backward (see stack.cpp).
template <typename Real>
class StackCache : public StackCacheBase {
 public:
  StackShape shape;
  std::vector<int64_t> lengths;      // [N] sorted lengths, non-increasing; empty = all T
  std::vector<int64_t> rows;         // [N] batch row of each sorted row; empty = identity
  std::vector<int64_t> offsets;      // [T+1] with lengths: LayerShape::offsets; empty = none
  std::vector<Params<Real>> params;  // [L*D] the caller's parameters
  std::vector<Real> biases;          // [L*D, G*H + H] combined biases and GRU b_hn (LayerWeights)
  std::vector<Real> peepholes;       // [L*D, 3H] P_i, P_f, P_o side by side (peephole LSTM), or empty
  std::vector<Real> layer_norms;     // [L*D, 10H] LayerWeights::ln per layer-direction (LN_LSTM), or empty
  std::vector<LayerWeights<Real>> weights;  // [L*D] pointing into params and biases
  std::vector<const Real*> masks;           // [L-1] dropout masks, or empty
  std::vector<const Real*> inputs;          // [L] input of each layer: x, then masked outputs
  std::vector<LayerBuffers<Real>> saved;    // [L*D] the saved h, c, m, gates per layer-direction
  Block block;                              // memory of saved and of inputs 1..L-1
  std::atomic<bool> consumed{false};        // a consuming backward has run (or is running)

  StackCache() = default;
  StackCache(const StackCache&) = delete;
  StackCache& operator=(const StackCache&) = delete;
  ~StackCache() override { give_back_cache_block(std::move(block)); }

  int64_t nbytes() const override {
    return static_cast<int64_t>(block.size() + (biases.size() + peepholes.size()) * sizeof(Real));
  }
};

}  // namespace lstmfast
