// The one bfloat16 rounding rule of the library (host movers, CUDA kernels, SIMT): round to
// nearest even; NaN becomes the positive quiet NaN 0x7fc0, as c10::BFloat16 does.
#pragma once

#include <cstdint>

#include "macros.h"

namespace dispatch {

// bfloat16 bits of the float whose bits are `bits`. A select rather than a branch keeps host
// loops vectorised.
DISPATCH_HD uint16_t bf16_bits_from_float_bits(uint32_t bits) {
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  const uint32_t result = (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded;
  return static_cast<uint16_t>(result >> 16);
}

}  // namespace dispatch
