// Element movers of the two-hop kernels (their own copy, so that the in-node kernels' element.h
// can change freely): warp-cooperative byte copies that bypass L1 (rail and ring data are written
// by other GPUs, other SMs or the copy engine), and dtype loads/stores rounding to nearest even.
#pragma once

#include "../common/codes.h"
#include "../common/macros.h"
#include "port.h"

namespace dispatch::cuda::rail {

DISPATCH_DEVICE void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes);
  if ((bits & 15) == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = lane; i < bytes / 16; i += 32) d[i] = __ldcg(s + i);
  } else if ((bits & 3) == 0) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = __ldcg(s + i);
  } else {
    for (int64_t i = lane; i < bytes; i += 32) dst[i] = static_cast<uint8_t>(__ldcg(reinterpret_cast<const char*>(src) + i));
  }
}

DISPATCH_HD int elem_bytes(int dtype) { return dtype == kDtypeFloat64 ? 8 : (dtype == kDtypeFloat32 ? 4 : 2); }

template <typename AccT>
DISPATCH_DEVICE AccT load_as(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kDtypeFloat32: return static_cast<AccT>(__ldcg(static_cast<const float*>(base) + i));
    case kDtypeBFloat16: return static_cast<AccT>(port::bf16_bits_to_float(__ldcg(static_cast<const uint16_t*>(base) + i)));
    case kDtypeFloat16: return static_cast<AccT>(port::half_bits_to_float(__ldcg(static_cast<const uint16_t*>(base) + i)));
    default: return static_cast<AccT>(__ldcg(static_cast<const double*>(base) + i));
  }
}

template <typename AccT>
DISPATCH_DEVICE void store_as(void* base, int dtype, int64_t i, AccT value) {
  switch (dtype) {
    case kDtypeFloat32: static_cast<float*>(base)[i] = static_cast<float>(value); break;
    case kDtypeBFloat16: static_cast<uint16_t*>(base)[i] = port::float_to_bf16_bits(static_cast<float>(value)); break;
    case kDtypeFloat16: static_cast<uint16_t*>(base)[i] = port::float_to_half_bits(static_cast<float>(value)); break;
    default: static_cast<double*>(base)[i] = static_cast<double>(value); break;
  }
}

// Weights follow a row that may be only 2-byte aligned (16-bit rows of odd hidden size).
DISPATCH_DEVICE void store_f32(uint8_t* p, float value) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) {
    *reinterpret_cast<float*>(p) = value;
    return;
  }
  const uint32_t bits = port::float_as_bits(value);
  for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(bits >> (8 * b));
}
DISPATCH_DEVICE float load_f32(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) return __ldcg(reinterpret_cast<const float*>(p));
  uint32_t bits = 0;
  for (int b = 0; b < 4; ++b) bits |= static_cast<uint32_t>(__ldcg(p + b)) << (8 * b);
  return port::bits_as_float(bits);
}

}  // namespace dispatch::cuda::rail
