#include "block_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace dispatch::host {

namespace {
constexpr int64_t kHugePageBytes = int64_t{2} << 20;

int64_t capacity_for(int64_t size_bytes) {
  const int64_t granule = size_bytes >= kHugePageBytes ? kHugePageBytes : 4096;
  return (std::max<int64_t>(size_bytes, 1) + granule - 1) / granule * granule;
}

void* map_block(int64_t capacity_bytes) {
  void* base = ::mmap(nullptr, static_cast<size_t>(capacity_bytes), PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw std::runtime_error(std::string("mmap of a receive block failed: ") + std::strerror(errno));
  if (capacity_bytes >= kHugePageBytes) ::madvise(base, static_cast<size_t>(capacity_bytes), MADV_HUGEPAGE);
  return base;
}
}  // namespace

Block::Block(std::shared_ptr<BlockPool> pool, void* base, int64_t capacity_bytes, int64_t size_bytes)
    : pool_(std::move(pool)), base_(base), capacity_bytes_(capacity_bytes), size_bytes_(size_bytes) {}

Block::~Block() { pool_->release(base_, capacity_bytes_); }

BlockPool::~BlockPool() { clear(); }

std::unique_ptr<Block> BlockPool::acquire(int64_t size_bytes) {
  const int64_t capacity = capacity_for(size_bytes);
  void* base = nullptr;
  int64_t found_capacity = capacity;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // Smallest cached block that fits and wastes at most a quarter.
    auto it = free_.lower_bound(capacity);
    if (it != free_.end() && it->first <= capacity + capacity / 4) {
      base = it->second;
      found_capacity = it->first;
      cached_bytes_ -= it->first;
      free_.erase(it);
    }
  }
  if (base == nullptr) base = map_block(capacity);
  return std::make_unique<Block>(shared_from_this(), base, found_capacity, size_bytes);
}

void BlockPool::release(void* base, int64_t capacity_bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_bytes_ + capacity_bytes <= max_cached_bytes_) {
      free_.emplace(capacity_bytes, base);
      cached_bytes_ += capacity_bytes;
      return;
    }
  }
  ::munmap(base, static_cast<size_t>(capacity_bytes));
}

void BlockPool::clear() {
  std::vector<std::pair<int64_t, void*>> blocks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    blocks.assign(free_.begin(), free_.end());
    free_.clear();
    cached_bytes_ = 0;
  }
  for (auto& [capacity, base] : blocks) ::munmap(base, static_cast<size_t>(capacity));
}

}  // namespace dispatch::host
