// Element types of the CPU backend and exact conversions to and from the accumulation type.
// Conversions round to nearest even, as torch's own casts do, so results match the reference.
// A NaN result is always the positive quiet NaN (bf16 0x7fc0, fp16 0x7e00), whatever the NaN
// summed: torch's own casts disagree (its vectorised bf16 cast gives 0xffff, its scalar one
// 0x7fc0), so the library and dispatch.reference both write the canonical one (docs/semantics.md).
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/round16.h"
#include "../common/codes.h"

namespace dispatch::host {

enum class DType : int {
  kFloat32 = kDtypeFloat32,
  kBFloat16 = kDtypeBFloat16,
  kFloat16 = kDtypeFloat16,
  kFloat64 = kDtypeFloat64,
  kBytes = kDtypeFloat8E4M3,  // FP8 rows: moved as bytes, never summed
};

inline int dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBFloat16: return 2;
    case DType::kFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 1;
  }
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bf16_bits_from_float_bits(bits);
}

inline float fp16_to_float(uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, sizeof(half));
  return static_cast<float>(half);
}

inline uint16_t float_to_fp16(float value) {
  const _Float16 half = static_cast<_Float16>(value);
  uint16_t bits;
  std::memcpy(&bits, &half, sizeof(bits));
  return canonical_fp16_bits(bits);
}

// acc[i] = (kStart ? 0 : acc[i]) + src[i] over a row of `dtype`. kStart begins a sum in one pass
// instead of zeroing then adding; the `0 +` is kept so that -0 becomes +0 exactly as in the
// reference's zero-initialised sum.
template <bool kStart, typename AccT>
inline void sum_row(AccT* acc, const void* src, DType dtype, int64_t count) {
  auto run = [&](auto load) {
    for (int64_t i = 0; i < count; ++i) acc[i] = (kStart ? AccT(0) : acc[i]) + static_cast<AccT>(load(i));
  };
  switch (dtype) {
    case DType::kFloat32: run([s = static_cast<const float*>(src)](int64_t i) { return s[i]; }); break;
    case DType::kFloat64: run([s = static_cast<const double*>(src)](int64_t i) { return s[i]; }); break;
    case DType::kBFloat16:
      run([s = static_cast<const uint16_t*>(src)](int64_t i) { return bf16_to_float(s[i]); });
      break;
    case DType::kFloat16:
      run([s = static_cast<const uint16_t*>(src)](int64_t i) { return fp16_to_float(s[i]); });
      break;
    default: break;
  }
}

// Adds row `src` (of `dtype`) element-wise into the accumulator `acc` (AccT = float or double).
template <typename AccT>
inline void add_row(AccT* acc, const void* src, DType dtype, int64_t count) {
  sum_row<false>(acc, src, dtype, count);
}

// acc = 0 + src: the first term of a sum.
template <typename AccT>
inline void start_row(AccT* acc, const void* src, DType dtype, int64_t count) {
  sum_row<true>(acc, src, dtype, count);
}

// Writes the accumulator row to `dst` in `dtype`.
template <typename AccT>
inline void store_row(void* dst, const AccT* acc, DType dtype, int64_t count) {
  switch (dtype) {
    case DType::kFloat32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < count; ++i) d[i] = static_cast<float>(acc[i]);
      break;
    }
    case DType::kFloat64: {
      double* d = static_cast<double*>(dst);
      for (int64_t i = 0; i < count; ++i) d[i] = static_cast<double>(acc[i]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < count; ++i) d[i] = float_to_bf16(static_cast<float>(acc[i]));
      break;
    }
    case DType::kFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < count; ++i) d[i] = float_to_fp16(static_cast<float>(acc[i]));
      break;
    }
    default: break;
  }
}

}  // namespace dispatch::host
