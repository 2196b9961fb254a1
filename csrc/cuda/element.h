// Element movers of the in-node kernels: warp-cooperative copies that keep several 16-byte loads
// per lane in flight, typed 16-byte vectors for combine's sums, and dtype conversions (round to
// nearest even, as the CPU backend and torch).
#pragma once

#include "../common/codes.h"
#include "../common/macros.h"
#include "port.h"

// Unrolled loops keep their loads independent under nvcc; g++ (SIMT) has no such pragma.
#if defined(__CUDACC__)
#define DISPATCH_UNROLL _Pragma("unroll")
#else
#define DISPATCH_UNROLL
#endif

namespace dispatch::cuda {

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;
// Independent 16-byte loads each lane issues before its first store: a warp keeps
// 32 * 16 * 4 = 2 KiB in flight, 16 warps 32 KiB per SM; at 0.5 us of latency (Little's law)
// that feeds 64 GB/s per SM, above the 40 GB/s goal.
constexpr int kLoadsInFlight = 4;
constexpr int64_t kWarpStepBytes = static_cast<int64_t>(kWarpSize) * kVecBytes * kLoadsInFlight;

DISPATCH_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Warp-cooperative copy of `bytes` from src, handing every 16-byte vector to `store(offset, v)`
// (one store per destination: a dispatch record goes to every peer that needs it from one load).
// src and bytes must be 16-byte aligned; loads bypass L1 (rings are written by other SMs/GPUs).
template <typename Store>
DISPATCH_DEVICE void warp_copy_vectors(const uint8_t* src, int64_t bytes, int lane, Store&& store) {
  const int4* s = reinterpret_cast<const int4*>(src);
  const int64_t vectors = bytes / kVecBytes;
  for (int64_t first = lane; first < vectors; first += kWarpSize * kLoadsInFlight) {
    int4 v[kLoadsInFlight];
DISPATCH_UNROLL
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t i = first + u * kWarpSize;
      if (i < vectors) v[u] = __ldcg(s + i);
    }
DISPATCH_UNROLL
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t i = first + u * kWarpSize;
      if (i < vectors) store(i * kVecBytes, v[u]);
    }
  }
}

// Warp-cooperative copy for any alignment (the odd-sized rows): 4-byte or byte granules.
DISPATCH_DEVICE void warp_copy_unaligned(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes);
  if ((bits & 3) == 0) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int64_t i = lane; i < bytes / 4; i += kWarpSize) d[i] = __ldcg(s + i);
  } else {
    for (int64_t i = lane; i < bytes; i += kWarpSize) dst[i] = static_cast<uint8_t>(__ldcg(reinterpret_cast<const char*>(src) + i));
  }
}

// Warp-cooperative byte copy, vectorized whenever both ends and the size allow it.
DISPATCH_DEVICE void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  if (aligned16(dst) && aligned16(src) && (bytes & 15) == 0) {
    warp_copy_vectors(src, bytes, lane, [dst](int64_t offset, const int4& v) { *reinterpret_cast<int4*>(dst + offset) = v; });
  } else {
    warp_copy_unaligned(dst, src, bytes, lane);
  }
}

// ---- typed elements -------------------------------------------------------------------------
// Storage types of the combine dtypes: bf16 and fp16 travel as their 16-bit patterns.
struct Bf16Bits { uint16_t bits; };
struct F16Bits { uint16_t bits; };

template <typename T> struct Element;
template <> struct Element<float> {
  using Acc = float;
  static DISPATCH_DEVICE float load_cg(const float* p) { return __ldcg(p); }
  static DISPATCH_DEVICE float to_acc(float v) { return v; }
  static DISPATCH_DEVICE float from_acc(float v) { return v; }
};
template <> struct Element<double> {
  using Acc = double;
  static DISPATCH_DEVICE double load_cg(const double* p) { return __ldcg(p); }
  static DISPATCH_DEVICE double to_acc(double v) { return v; }
  static DISPATCH_DEVICE double from_acc(double v) { return v; }
};
template <> struct Element<Bf16Bits> {
  using Acc = float;
  static DISPATCH_DEVICE Bf16Bits load_cg(const Bf16Bits* p) { return Bf16Bits{__ldcg(&p->bits)}; }
  static DISPATCH_DEVICE float to_acc(Bf16Bits v) { return port::bf16_bits_to_float(v.bits); }
  static DISPATCH_DEVICE Bf16Bits from_acc(float v) { return Bf16Bits{port::float_to_bf16_bits(v)}; }
};
template <> struct Element<F16Bits> {
  using Acc = float;
  static DISPATCH_DEVICE F16Bits load_cg(const F16Bits* p) { return F16Bits{__ldcg(&p->bits)}; }
  static DISPATCH_DEVICE float to_acc(F16Bits v) { return port::half_bits_to_float(v.bits); }
  static DISPATCH_DEVICE F16Bits from_acc(float v) { return F16Bits{port::float_to_half_bits(v)}; }
};

// 16 bytes of T as an array (the unit of combine's loads and stores).
template <typename T>
struct alignas(16) Vec {
  static constexpr int kCount = kVecBytes / static_cast<int>(sizeof(T));
  T at[kCount];
};

template <typename T>
DISPATCH_DEVICE Vec<T> load_vec_cg(const T* p) {
  const int4 raw = __ldcg(reinterpret_cast<const int4*>(p));
  Vec<T> v;
  static_assert(sizeof(Vec<T>) == sizeof(int4), "a vector is 16 bytes");
  memcpy(&v, &raw, sizeof(v));
  return v;
}

template <typename T>
DISPATCH_DEVICE void store_vec(T* p, const Vec<T>& v) {
  int4 raw;
  memcpy(&raw, &v, sizeof(raw));
  *reinterpret_cast<int4*>(p) = raw;
}

// One element of any combine dtype as AccT (and back): for the bias terms, whose dtype may
// differ from x's, and for rows whose dtype is only known at run time.
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

DISPATCH_HD int dtype_bytes(int dtype) { return dtype == kDtypeFloat64 ? 8 : (dtype == kDtypeFloat32 ? 4 : 2); }

// The weights of a combine return row start right after the x row (ReturnRowLayout), which is
// only 2-byte aligned for 16-bit dtypes with an odd hidden size: float access byte by byte there.
DISPATCH_DEVICE void store_f32(uint8_t* p, float value) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) {
    *reinterpret_cast<float*>(p) = value;
    return;
  }
  const uint32_t bits = port::float_as_bits(value);
  for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(bits >> (8 * b));
}
DISPATCH_DEVICE float load_f32_cg(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) return __ldcg(reinterpret_cast<const float*>(p));
  uint32_t bits = 0;
  for (int b = 0; b < 4; ++b) bits |= static_cast<uint32_t>(__ldcg(p + b)) << (8 * b);
  return port::bits_as_float(bits);
}

}  // namespace dispatch::cuda
