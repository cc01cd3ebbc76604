#include "runtime/workspace.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace lstmfast {

Block::Block(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  data_.reset(static_cast<char*>(p));
}

void Block::Free::operator()(char* p) const { std::free(p); }

char* thread_scratch(size_t bytes) {
  thread_local Block block;
  if (block.size() < bytes) {
    block = Block();  // free the old one first
    block = Block(bytes + bytes / 4);
  }
  return block.data();
}

namespace {

constexpr size_t kKeptCacheBlocks = 4;

std::mutex g_kept_mutex;
std::vector<Block>& kept_blocks() {  // oldest first
  static std::vector<Block>* kept = new std::vector<Block>();  // outlives every cache
  return *kept;
}

}  // namespace

Block cache_block(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(g_kept_mutex);
    std::vector<Block>& kept = kept_blocks();
    size_t best = kept.size();
    for (size_t i = 0; i < kept.size(); ++i) {
      const size_t size = kept[i].size();
      if (size >= bytes && size / 2 <= bytes && (best == kept.size() || size < kept[best].size()))
        best = i;
    }
    if (best < kept.size()) {
      Block block = std::move(kept[best]);
      kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(best));
      return block;
    }
  }
  return Block(bytes);
}

void give_back_cache_block(Block&& block) {
  if (block.size() == 0) return;
  Block oldest;  // freed outside the lock
  std::lock_guard<std::mutex> lock(g_kept_mutex);
  std::vector<Block>& kept = kept_blocks();
  if (kept.size() == kKeptCacheBlocks) {
    oldest = std::move(kept.front());
    kept.erase(kept.begin());
  }
  kept.push_back(std::move(block));
}

}  // namespace lstmfast
