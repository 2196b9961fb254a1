// Layout kernels: per token its destination ranks, nodes and experts (the rules of
// csrc/common/layout.h), and my tokens per (destination, channel) for notify.
#include <algorithm>

#include "../common/layout.h"
#include "kernels.h"
#include "plan_view.h"
#include "port.h"
#include "profile_record.h"

namespace dispatch::cuda {
namespace {

// Same rules as compute_layout: route_token per token, an expert repeated in a row counts once.
// Block-local counters in shared memory, then one atomicAdd per counter.
__global__ void layout_kernel(LayoutArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  DISPATCH_DYNAMIC_SHARED(int32_t, counters);  // [R] ranks, [N] nodes, [E] experts
  const Topology topo{a.num_ranks, a.num_ranks_per_node, a.num_experts};
  const int R = a.num_ranks, N = topo.num_nodes(), E = a.num_experts, L = a.num_ranks_per_node;
  int32_t* per_rank = counters;
  int32_t* per_node = counters + R;
  int32_t* per_expert = counters + R + N;
  for (int i = threadIdx.x; i < R + N + E; i += blockDim.x) counters[i] = 0;
  __syncthreads();
  const int64_t* idx = reinterpret_cast<const int64_t*>(a.topk_idx);
  bool* in_rank_all = reinterpret_cast<bool*>(a.in_rank);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < a.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t* row = idx + t * a.num_topk;
    bool* in_rank = in_rank_all + t * R;
    route_token(row, a.num_topk, topo, in_rank);
    for (int j = 0; j < a.num_topk; ++j) {
      const int64_t e = row[j];
      if (e < 0 || e >= E) continue;
      bool seen = false;
      for (int i = 0; i < j; ++i) seen = seen || row[i] == e;
      if (!seen) atomicAdd(per_expert + e, 1);
    }
    for (int m = 0; m < N; ++m) {
      bool any = false;
      for (int l = 0; l < L; ++l) {
        if (in_rank[m * L + l]) {
          atomicAdd(per_rank + m * L + l, 1);
          any = true;
        }
      }
      if (any) atomicAdd(per_node + m, 1);
    }
  }
  __syncthreads();
  int32_t* out_rank = reinterpret_cast<int32_t*>(a.per_rank);
  int32_t* out_node = reinterpret_cast<int32_t*>(a.per_node);
  int32_t* out_expert = reinterpret_cast<int32_t*>(a.per_expert);
  for (int i = threadIdx.x; i < R + N + E; i += blockDim.x) {
    const int32_t v = counters[i];
    if (v == 0) continue;
    if (i < R) atomicAdd(out_rank + i, v);
    else if (i < R + N) atomicAdd(out_node + (i - R), v);
    else atomicAdd(out_expert + (i - R - N), v);
  }
}

// Channel c carries my tokens [T*c/C, T*(c+1)/C): count them per destination.
__global__ void channel_counts_kernel(const bool* in_rank, int64_t num_tokens, int R, int C, int32_t* out) {
  DISPATCH_SHARED_ARRAY(int32_t, counts, kMaxPeers);
  const int c = blockIdx.x;
  for (int d = threadIdx.x; d < R; d += blockDim.x) counts[d] = 0;
  __syncthreads();
  const int64_t t0 = channel_begin(num_tokens, C, c), t1 = channel_begin(num_tokens, C, c + 1);
  for (int64_t i = t0 * R + threadIdx.x; i < t1 * R; i += blockDim.x)
    if (in_rank[i]) atomicAdd(counts + static_cast<int>(i % R), 1);
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x) out[d * C + c] = counts[d];
}

}  // namespace

void load_layout_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, layout_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, channel_counts_kernel));
}

void launch_layout(const LayoutArgs& a, uintptr_t stream) {
  if (a.num_tokens == 0) return;
  const size_t smem = sizeof(int32_t) * (a.num_ranks + a.num_ranks / a.num_ranks_per_node + a.num_experts);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_blocks, (a.num_tokens + 255) / 256)));
  DISPATCH_LAUNCH(layout_kernel, blocks, 256, smem, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_channel_counts(uint64_t in_rank, int64_t num_tokens, int num_ranks, int num_channels, uint64_t chan_counts,
                           uintptr_t stream) {
  check_node(num_ranks, num_channels);
  DISPATCH_LAUNCH(channel_counts_kernel, num_channels, 256, 0, as_stream(stream), reinterpret_cast<const bool*>(in_rank),
                  num_tokens, num_ranks, num_channels, reinterpret_cast<int32_t*>(chan_counts));
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dispatch::cuda
