// The 16-bit output rules of the library, one place for the host movers, the CUDA kernels and
// SIMT: bfloat16 rounds to nearest even; a NaN result is always the positive quiet NaN (bf16
// 0x7fc0, fp16 0x7e00, as c10 does), whatever NaN was summed.
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

// fp16 bits as the target's round-to-nearest-even conversion gave them, with NaN made canonical
// (the hardware conversion would keep sign and payload).
DISPATCH_HD uint16_t canonical_fp16_bits(uint16_t bits) { return (bits & 0x7fffu) > 0x7c00u ? uint16_t{0x7e00u} : bits; }

}  // namespace dispatch
