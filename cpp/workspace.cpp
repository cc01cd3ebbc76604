#include "workspace.h"

#include <cstdlib>
#include <new>

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

}  // namespace lstmfast
