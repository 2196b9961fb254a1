// POSIX shared memory mapped by the processes of one node: the CPU backend's in-node link.
#pragma once

#include <cstdint>
#include <string>

namespace dispatch::host {

// RAII owner of one mapping. The creator removes the name as soon as every peer has mapped it
// (`unlink`), so nothing is left in /dev/shm even when a process dies; the destructor unmaps.
class SharedMemorySegment {
 public:
  SharedMemorySegment(const std::string& name, int64_t size_bytes, bool create);
  ~SharedMemorySegment();
  SharedMemorySegment(const SharedMemorySegment&) = delete;
  SharedMemorySegment& operator=(const SharedMemorySegment&) = delete;

  void unlink();
  void close();
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(base_); }
  int64_t size_bytes() const { return size_bytes_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  int64_t size_bytes_;
  bool owner_;
  bool linked_;
  void* base_;
};

}  // namespace dispatch::host
