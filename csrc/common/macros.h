// Portability macros shared by host and device code.
#pragma once

#if defined(__CUDACC__)
#define DISPATCH_HD __host__ __device__ __forceinline__
#else
#define DISPATCH_HD inline
#endif

#include <cstdint>

namespace dispatch {

// Round `value` up to a multiple of `alignment` (alignment > 0).
DISPATCH_HD int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

DISPATCH_HD int64_t ceil_div(int64_t value, int64_t divisor) { return (value + divisor - 1) / divisor; }

}  // namespace dispatch
