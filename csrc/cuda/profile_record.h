// SM-usage records of the communication kernels (read by dispatch/profile.py). With profiling on,
// the host passes a zeroed device buffer of one row per block, uint64 {sm id, start ns, end ns};
// with it off the address is 0 and each block pays one predicated branch at entry and exit.
//
// Usage, as the first statement of a kernel body (early returns are fine: the destructor runs):
//   const ProfileScope profile_scope(a.profile);
#pragma once

#include <cstdint>

#include "port.h"

namespace dispatch::cuda {

constexpr int kProfileRowWords = 3;  // sm id, start ns, end ns (see CudaBackend._profile_*)

class ProfileScope {
 public:
  DISPATCH_DEVICE explicit ProfileScope(uint64_t buffer)
      : row_(buffer ? reinterpret_cast<unsigned long long*>(buffer) + blockIdx.x * kProfileRowWords : nullptr) {
    if (row_ != nullptr && threadIdx.x == 0) {
      row_[0] = port::sm_id();
      row_[1] = port::global_timer();
    }
  }
  // The block ends with its last warp: lane 0 of every warp raises the end time. Thread 0 does so
  // after it wrote the start, so end >= start however the warps interleave.
  DISPATCH_DEVICE ~ProfileScope() {
    if (row_ != nullptr && threadIdx.x % 32 == 0) atomicMax(row_ + 2, static_cast<unsigned long long>(port::global_timer()));
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  unsigned long long* row_;
};

}  // namespace dispatch::cuda
