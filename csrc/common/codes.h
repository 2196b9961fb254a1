// Codes that cross the boundary between C++ and Python: element types and the kinds of wait a
// kernel can stall in. Defined here once; the bindings export them (DTYPE_CODES,
// WAIT_KIND_NAMES), so Python never mirrors them by hand.
#pragma once

namespace dispatch {

// Element type of a tensor handed to the movers and kernels.
enum DtypeCode : int {
  kDtypeFloat32 = 0,
  kDtypeBFloat16 = 1,
  kDtypeFloat16 = 2,
  kDtypeFloat64 = 3,
  kDtypeFloat8E4M3 = 4,  // moved as bytes, never summed
};

struct DtypeName {
  DtypeCode code;
  const char* torch_name;  // torch.<name>
};
constexpr DtypeName kDtypeNames[] = {{kDtypeFloat32, "float32"},
                                     {kDtypeBFloat16, "bfloat16"},
                                     {kDtypeFloat16, "float16"},
                                     {kDtypeFloat64, "float64"},
                                     {kDtypeFloat8E4M3, "float8_e4m3fn"}};

// What a device-side wait was waiting for when it timed out (reported with rank and channel).
enum WaitKind : int {
  kWaitBarrier = 1,
  kWaitDispatchSpace = 2,
  kWaitDispatchData = 3,
  kWaitCombineSpace = 4,
  kWaitCombineData = 5,
  kWaitOverflow = 6,  // not a wait: a receive row beyond the receive tensors (num_worst_tokens)
  kWaitRailArrival = 7,  // a chunk from the rail peer (the reported rank) did not arrive
};

struct WaitKindName {
  WaitKind kind;
  const char* name;
};
constexpr WaitKindName kWaitKindNames[] = {{kWaitBarrier, "node barrier"},
                                           {kWaitDispatchSpace, "dispatch ring space"},
                                           {kWaitDispatchData, "dispatch ring data"},
                                           {kWaitCombineSpace, "combine ring space"},
                                           {kWaitCombineData, "combine ring data"},
                                           {kWaitOverflow, "receive rows"},
                                           {kWaitRailArrival, "rail chunk arrival"}};

}  // namespace dispatch
