#include "shm_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace dispatch::host {

namespace {

[[noreturn]] void throw_errno(const std::string& what, const std::string& name) {
  throw std::runtime_error(what + " '" + name + "': " + std::strerror(errno));
}

// Closes a file descriptor on scope exit; the mapping outlives it.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

SharedMemorySegment::SharedMemorySegment(const std::string& name, int64_t size_bytes, bool create)
    : name_(name), size_bytes_(size_bytes), owner_(create), linked_(create), base_(nullptr) {
  const int flags = create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR;
  FdCloser fd{::shm_open(name.c_str(), flags, 0600)};
  if (fd.fd < 0) throw_errno(create ? "shm_open(create)" : "shm_open", name);
  if (create && ::ftruncate(fd.fd, size_bytes) != 0) {
    ::shm_unlink(name.c_str());
    throw_errno("ftruncate", name);
  }
  void* base = ::mmap(nullptr, static_cast<size_t>(size_bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd.fd, 0);
  if (base == MAP_FAILED) {
    if (create) ::shm_unlink(name.c_str());
    throw_errno("mmap", name);
  }
  base_ = base;
}

SharedMemorySegment::~SharedMemorySegment() {
  unlink();
  close();
}

void SharedMemorySegment::unlink() {
  if (owner_ && linked_) {
    ::shm_unlink(name_.c_str());
    linked_ = false;
  }
}

void SharedMemorySegment::close() {
  if (base_ != nullptr) {
    ::munmap(base_, static_cast<size_t>(size_bytes_));
    base_ = nullptr;
  }
}

}  // namespace dispatch::host
