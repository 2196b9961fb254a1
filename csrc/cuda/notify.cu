// Notify: the per-call handshake of a node. Two barriers; between them every rank resets its ring
// counters and writes its argument verdict and its counts into every peer's staging header; then
// each rank builds its plan (plan_view.h) and tells the host, through mapped memory, how many rows
// arrive and whether any rank's arguments were bad (then the call is void on every rank).
#include "kernels.h"
#include "plan_view.h"
#include "port.h"
#include "profile_record.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

// Every rank of the node reaches `value` (monotonic per call) or the wait reports a timeout.
__device__ bool node_barrier(const NotifyArgs& a, const Waiter& w, uint64_t value) {
  DISPATCH_SHARED(int, ok);
  if (threadIdx.x == 0) ok = 1;
  __threadfence_system();
  __syncthreads();
  const int L = a.num_ranks;
  if (threadIdx.x < L) {
    port::st_release(barrier_of(a.peers.ptr[threadIdx.x]) + a.rank, value);
    if (!w.until(barrier_of(a.peers.ptr[a.rank]) + threadIdx.x, value, threadIdx.x, -1, kWaitBarrier)) ok = 0;
  }
  __syncthreads();
  const bool passed = ok != 0;
  // every thread has read `ok` before thread 0 may reset it for the next barrier of this call
  __syncthreads();
  return passed;
}

// status_out: [0] done (written last), [1] lowest rank with bad arguments or -1, [2 + r] verdicts.
__device__ void publish_status(const NotifyArgs& a, int first_bad) {
  if (threadIdx.x != 0 || !a.status_out) return;
  int32_t* status = reinterpret_cast<int32_t*>(a.status_out);
  for (int r = 0; r < a.num_ranks; ++r)
    port::st_relaxed(status + 2 + r, static_cast<int32_t>(port::ld_relaxed(verdict_of(a.peers.ptr[a.rank], r))));
  port::st_relaxed(status + 1, first_bad);
  port::st_release(status, 1);
  __threadfence_system();
}

__global__ void __launch_bounds__(kThreads) notify_kernel(NotifyArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  DISPATCH_SHARED(uint64_t, seq);
  const int L = a.num_ranks, C = a.num_channels, me = a.rank;
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};
  if (w.aborted()) {
    publish_status(a, -1);
    return;
  }
  if (threadIdx.x == 0) {
    seq = port::ld_relaxed(seq_of(own)) + 1;
    port::st_relaxed(seq_of(own), seq);
  }
  __syncthreads();
  if (!node_barrier(a, w, 2 * seq - 1)) {
    publish_status(a, -1);
    return;
  }
  // Nobody touches rings or counters between the two barriers: reset mine.
  for (int i = threadIdx.x; i < kMaxChannels * kMaxPeers; i += blockDim.x) {
    port::st_relaxed(tail_of(own, i / kMaxPeers, i % kMaxPeers), 0);
    port::st_relaxed(head_of(own, i / kMaxPeers, i % kMaxPeers), 0);
  }
  for (int d = threadIdx.x; d < L; d += blockDim.x)
    port::st_relaxed(verdict_of(a.peers.ptr[d], me), static_cast<uint64_t>(a.verdict));
  const int32_t* chan_counts = reinterpret_cast<const int32_t*>(a.chan_counts);
  const int32_t* per_expert = reinterpret_cast<const int32_t*>(a.per_expert);
  const int EPR = a.experts_per_rank;
  if (!a.barrier_only && a.verdict == 0) {
    for (int d = 0; d < L; ++d) {
      int32_t* slot = slot_of(a.peers.ptr[d], me);
      for (int i = threadIdx.x; i < C; i += blockDim.x) slot[2 + i] = chan_counts[d * C + i];
      for (int e = threadIdx.x; e < EPR; e += blockDim.x) slot[2 + kMaxChannels + e] = per_expert ? per_expert[d * EPR + e] : 0;
      if (threadIdx.x == 0) {
        int32_t total = 0;
        for (int c = 0; c < C; ++c) total += chan_counts[d * C + c];
        slot[0] = total;
        slot[1] = static_cast<int32_t>(a.num_tokens);
      }
    }
  }
  if (!node_barrier(a, w, 2 * seq)) {
    publish_status(a, -1);
    return;
  }
  int first_bad = -1;
  for (int r = L - 1; r >= 0; --r)
    if (port::ld_relaxed(verdict_of(own, r)) != 0) first_bad = r;
  if (threadIdx.x == 0) port::st_relaxed(skip_of(own), first_bad >= 0 ? 1 : 0);
  if (a.barrier_only || first_bad >= 0) {
    __syncthreads();  // the skip flag is set before any thread reports done
    publish_status(a, first_bad);
    return;
  }

  const PlanView pv{L, C, EPR};
  int32_t* plan = reinterpret_cast<int32_t*>(a.plan);
  int32_t* host = reinterpret_cast<int32_t*>(a.host_out);
  if (threadIdx.x == 0) {
    int32_t base = 0;
    for (int s = 0; s < L; ++s) {
      const int32_t count = slot_of(own, s)[0];
      plan[pv.recv_count(s)] = count;
      plan[pv.recv_base(s)] = base;
      plan[pv.src_num_tokens(s)] = slot_of(own, s)[1];
      if (host) host[1 + s] = count;
      base += count;
    }
    plan[pv.num_recv()] = base;
    if (host) host[0] = base;
  }
  if (threadIdx.x < L) {
    const int s = threadIdx.x;
    const int32_t* slot = slot_of(own, s);
    int32_t offset = 0;
    for (int c = 0; c < C; ++c) {
      plan[pv.recv_chan_count(s, c)] = slot[2 + c];
      plan[pv.send_chan_offset(s, c)] = offset;  // here s plays the destination
      offset += chan_counts[s * C + c];
    }
  }
  for (int e = threadIdx.x; e < EPR; e += blockDim.x) {
    int64_t sum = 0;
    for (int s = 0; s < L; ++s) sum += slot_of(own, s)[2 + kMaxChannels + e];
    const int32_t aligned = static_cast<int32_t>(align_up(sum, a.expert_alignment));
    plan[pv.expert_count(e)] = aligned;
    if (host) host[1 + L + e] = aligned;
  }
  __threadfence_system();
  __syncthreads();  // plan and host counts are complete before the host is told
  publish_status(a, -1);
}

}  // namespace

void load_notify_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, notify_kernel));
}

void launch_notify(const NotifyArgs& a, uintptr_t stream) {
  check_node(a.num_ranks, a.num_channels);
  DISPATCH_CHECK_ARG(a.experts_per_rank <= kMaxLocalExperts, "too many experts per rank");
  DISPATCH_LAUNCH(notify_kernel, 1, kThreads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dispatch::cuda
