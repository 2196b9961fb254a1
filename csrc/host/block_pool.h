// Recycled page-aligned host memory for the tensors a call returns (recv_x, combined_x).
// A fresh multi-MB allocation costs a page fault and a kernel zeroing per 4 KiB page, which on
// the CPU backend costs more than moving the rows; blocks freed by the user return here and the
// next call reuses them, already mapped (huge pages where the kernel allows).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

namespace dispatch::host {

class BlockPool;

// One mapping; gives itself back to its pool when destroyed.
class Block {
 public:
  Block(std::shared_ptr<BlockPool> pool, void* base, int64_t capacity_bytes, int64_t size_bytes);
  ~Block();
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  void* data() const { return base_; }
  int64_t size_bytes() const { return size_bytes_; }

 private:
  std::shared_ptr<BlockPool> pool_;
  void* base_;
  int64_t capacity_bytes_;
  int64_t size_bytes_;
};

class BlockPool : public std::enable_shared_from_this<BlockPool> {
 public:
  explicit BlockPool(int64_t max_cached_bytes) : max_cached_bytes_(max_cached_bytes) {}
  ~BlockPool();

  std::unique_ptr<Block> acquire(int64_t size_bytes);
  void release(void* base, int64_t capacity_bytes);
  int64_t cached_bytes() const { return cached_bytes_; }
  void clear();

 private:
  std::mutex mutex_;
  std::multimap<int64_t, void*> free_;  // capacity -> mapping
  int64_t cached_bytes_ = 0;
  int64_t max_cached_bytes_;
};

}  // namespace dispatch::host
