// Inside the CUDA backend: what one kernel file offers the others (kernel loading for
// preload_kernels; the number of channels a launch may use).
#pragma once

#include <string>

#include "api.h"
#include "check.h"

namespace dispatch::cuda {

// Each kernel file loads its kernels (cudaFuncGetAttributes): see preload_kernels in runtime.cu.
void load_layout_kernels();
void load_notify_kernels();
void load_dispatch_kernels();
void load_combine_kernels();

inline void check_node(int num_ranks_per_node, int num_channels) {
  DISPATCH_CHECK_ARG(num_ranks_per_node >= 1 && num_ranks_per_node <= kMaxPeers,
                     "the CUDA backend serves 1.." + std::to_string(kMaxPeers) + " ranks per node");
  DISPATCH_CHECK_ARG(num_channels >= 1 && num_channels <= kMaxChannels,
                     "num_sms must give 1.." + std::to_string(kMaxChannels) + " channels");
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace dispatch::cuda
