// ---- Kernel note (issue 14; figures from `nvcc -std=c++17 -arch=sm_90 -Xptxas -v -c`, 2026-12-04) ----
// Grids under Config.num_sms (RailGrid, rail_api.h): S = min(num_sms / 2, N) block pairs.
// Warp roles:
//   rail_reduce_kernel: 2S blocks of kThreads threads (128 on SIMT). Block 2s (returner) serves
//     source nodes s, s + S, ...: its (source node m, local rank j) pairs are spread over all its
//     warps as the forwarder's (rail_units.h: several pairs per warp, or several warps per pair
//     publishing the tail in slot order), copying the rows I received from source (m, j) into
//     ring (m, me) of local rank j; a warp polls all its units when none has ring space. Block
//     2s + 1 (reducer): its warps sum different records at once: lane 0 of a warp polls the block's
//     nodes and, under the node's lock word in shared memory, claims the node's next record once
//     all its contributors have returned their rows (records claimed in order, each taking the next
//     slot of its rings); the warp sums its columns (lane-strided, 4 per lane per pass) and weights,
//     then lane 0 hands the slots back in slot order per ring (publish_in_turn). No block barrier
//     after the start.
//   rail_final_kernel: <= min(num_sms, 132) blocks (4 on SIMT) x kThreads, a token per block
//     (strided), columns across threads.
// Bytes in flight per SM, by construction (Little's law at 0.5 us latency):
//   returner: G * pairs of its 16 warps x 2 KiB (warp_copy, 4 x 16 B per lane): 16 warps when
//     pairs = ceil(N / S) * L divides 16 or exceeds it: 32 KiB, 64 GB/s per SM (before: L warps,
//     L = 8: 16 KiB, 32 GB/s).
//   reducer: each of the 16 warps sums its own record, each lane loading up to 4 columns x c
//     contributors (scalar, independent: the sums only meet in registers): 16 x 32 x 4 x c x 4 B
//     (8 B for fp64) = 8c KiB per SM, c <= L: L = 8: 64 KiB, 128 GB/s per SM (before: one record
//     at a time, 512 x c x 4 B = 2c KiB, then three __syncthreads per record; L = 8: 16 KiB,
//     32 GB/s). Whether ptxas hoists every load of a pass ahead of the adds is not checked (no GPU).
//   final: at most 512 threads x (1 + (N - 1) partials) x 4 B = 2N KiB per SM: N = 2: 8 GB/s,
//     but up to min(num_sms, 132) SMs work at once.
// ptxas -v (sm_90): rail_reduce_kernel<float> 122 registers, <double> 110 (before the warp
//   reducer: 110 and 112; 64 before the units and the polling reducer), 13056 bytes static shared
//   (per unit / pair: rows taken or slots taken, turns; per node: records claimed, a lock; per
//   reducer warp: its claim, 272 B; before: 8520), 0 spill: one 512-thread block per SM
//   (122 x 512 < 64K; the grid is one block per SM anyway). Under __launch_bounds__(kThreads)
//   alone ptxas held the old reducer to 40 registers and <double> spilled 24 bytes;
//   (kThreads, 1) lets it take what it needs. rail_final_kernel<float> 27 registers, <double>
//   28 registers, 0 spill (a 48-byte stack frame: a local array, not a spill).
// Two-hop combine, dispatch run backwards. The reduce kernel: block 2s returns the rows I
// received from source nodes m = s, s + S, ... to their forwarders (source (m, j)'s rows to local
// rank j, ring (m, me) there); block 2s + 1 is my reducer for those nodes: for every record I forwarded
// from node m (claimed in order, several summed at once by different warps), it sums the returned rows of the local ranks that received it in
// ascending local rank (fp32, fp64 for float64) into one partial per (token, node). The backend
// then sends the partials of remote source nodes over the rail. The final kernel, at the source:
// acc = 0, += own node's partial, += each remote node's partial in ascending node order, + bias,
// cast: the fixed order of docs/semantics.md, bit for bit.
#include "../common/record.h"
#include "bad_variants.h"
#include "kernels.h"
#include "rail_api.h"
#include "element.h"
#include "profile_record.h"
#include "rail_units.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

constexpr int kFinalBlocks = 132;

// Returner block of pair s: units as the forwarder's (rail_units.h): unit (q, u) of pair q =
// (source node m, local rank j) copies rows i = k * G + u (k = 0, 1, ...) of those I received from
// source (m, j) into ring (m, me) of local rank j, the G of them publishing the tail in order. A
// warp copies up to a ring per visit and polls all its units (until_any) when none has space:
// waiting on one could hold up another rank's reducer.
DISPATCH_DEVICE void return_pairs(const RailCombineArgs& a, const RailGrid& g, int s, uint32_t* next, uint32_t* turn) {
  const int L = a.num_ranks, me = a.rank, n = a.node, k = a.num_topk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const RailUnits units = RailUnits::of(g.nodes_of(s) * L, warps);
  const int G = units.per_pair;
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};
  const int64_t x_bytes = a.hidden * dtype_bytes(a.dtype);
  const ReturnRowLayout rl{x_bytes, k};
  const int64_t row_bytes = rl.bytes();
  const int64_t slots = a.ring_slots;
  const int32_t* recv_base = reinterpret_cast<const int32_t*>(a.recv_base);
  const int32_t* recv_counts = reinterpret_cast<const int32_t*>(a.recv_counts);
  const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x);
  const float* weights = reinterpret_cast<const float*>(a.topk_weights);
  auto has_space = [&](int m, int j, uint64_t i) {  // lane 0: may row i enter ring (m, me) at j?
    return i + 1 <= static_cast<uint64_t>(slots) || port::ld_acquire(head_of(own, m, j)) >= i + 1 - slots;
  };
  auto row_of = [&](int unit, int64_t kth) { return kth * G + unit / units.pairs; };  // unit's kth row
  for (;;) {
    bool pending = false, moved = false;
    for (int unit = warp; unit < units.count(); unit += warps) {
      const int q = unit % units.pairs;
      const int m = g.node(s, q / L), j = q % L;
      const int64_t lo = recv_base[m * L + j], count = recv_counts[m * L + j], first = next[unit];
      if (row_of(unit, first) >= count) continue;
      pending = true;
      uint8_t* ring = ring_of(a.peers.ptr[j], m, me, L, slots, row_bytes);
      uint64_t* tail = tail_of(a.peers.ptr[j], m, me);
      int64_t kth = first;
      for (; kth < first + slots && row_of(unit, kth) < count; ++kth) {
        const int64_t i = row_of(unit, kth);
        int go = 1;
        if (lane == 0) go = has_space(m, j, static_cast<uint64_t>(i));
        if (!__shfl_sync(0xffffffffu, go, 0)) break;
        uint8_t* dst = ring + (i % slots) * row_bytes;
        warp_copy(dst, x + (lo + i) * x_bytes, x_bytes, lane);
        if (lane < k) store_f32(dst + rl.weights_offset() + 4 * lane, weights[(lo + i) * k + lane]);
        __syncwarp();
        if (lane == 0) go = publish_in_turn(w, turn + q, G, i, tail, true, WaitSite{n * L + j, m, kWaitCombineSpace});
        if (!__shfl_sync(0xffffffffu, go, 0)) return;
      }
      moved = moved || kth != first;
      __syncwarp();  // every lane has read next[unit]
      if (lane == 0) next[unit] = static_cast<uint32_t>(kth);
      __syncwarp();
    }
    if (!pending) return;
    if (moved) continue;
    int ok = 1;
    if (lane == 0) {
      auto state = [&](int unit) {
        const int q = unit % units.pairs, m = g.node(s, q / L);
        const int64_t i = row_of(unit, next[unit]);
        if (i >= recv_counts[m * L + q % L]) return kUnitDone;
        return has_space(m, q % L, static_cast<uint64_t>(i)) ? kUnitReady : kUnitWaitsRing;
      };
      auto site = [&](int unit, UnitState) {
        const int q = unit % units.pairs;
        return WaitSite{n * L + q % L, g.node(s, q / L), kWaitCombineSpace};
      };
      ok = wait_for_any_unit(w, units, warp, warps, state, site, WaitSite{n * L + me, g.node(s, 0), kWaitCombineSpace});
    }
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
  }
}

// What a reducer warp claimed: record i of the block's t-th node, its c contributors (ascending
// local rank j), their ring slots and the rows there.
struct ReduceClaim {
  const uint8_t* row[kMaxPeers];
  int j[kMaxPeers];
  uint32_t slot[kMaxPeers];
  int c, t;
  int64_t i;
};

// Reducer block of pair s: its warps sum different records at once. Lane 0 of a warp polls the
// block's nodes (never waiting on one while another is ready) and claims the next record of a
// node once all its contributors have returned their rows: under the node's lock, records are
// claimed in order, each taking the next slot of every ring (m, j) it reads (taken[t * L + j]),
// so no record reads beyond what the returners published, and those never run more than `slots`
// ahead of the head. The warp sums the columns (lane-strided) and the weights, then hands its
// slots back in slot order per ring (turn[t * L + j], publish_in_turn): a slot is freed only once
// every earlier record of the ring was read. claimed[t]: records of node t claimed so far.
template <typename AccT>
DISPATCH_DEVICE void reduce_nodes(const RailCombineArgs& a, const RailGrid& g, int s, uint32_t* taken,
                                  uint32_t* turn, uint32_t* claimed) {
  DISPATCH_SHARED_ARRAY(uint32_t, lock, kMaxNodes);  // per node: held while a warp checks or claims
  DISPATCH_SHARED_ARRAY(ReduceClaim, claims, kThreads / 32);
  const int L = a.num_ranks, me = a.rank, n = a.node, k = a.num_topk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int nodes = g.nodes_of(s);
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};
  const int64_t x_bytes = a.hidden * dtype_bytes(a.dtype);
  const ReturnRowLayout rl{x_bytes, k};
  const int64_t row_bytes = rl.bytes();
  const int64_t slots = a.ring_slots;
  const int64_t* fwd_begin = reinterpret_cast<const int64_t*>(a.fwd_begin);
  const int32_t* routes = reinterpret_cast<const int32_t*>(a.routes);
  for (int q = threadIdx.x; q < nodes * L; q += blockDim.x) taken[q] = turn[q] = 0;
  for (int t = threadIdx.x; t < nodes; t += blockDim.x) claimed[t] = lock[t] = 0;
  __syncthreads();
  ReduceClaim& mine = claims[warp];
  int last = warp % nodes;  // lane 0: the node it claimed from last (stays on it while it has ready records)
  auto take = [&](int t) {  // lane 0: one attempt at node t's lock
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_RAIL_CLAIM_UNLOCKED
    return t >= 0;  // as if every warp held it: two warps may claim one record, or its slots
#else
    return port::try_lock_block(lock + t);
#endif
  };
  // Lane 0, node t's lock held. 1: node t's next record is ready; 0: waits on local rank *blame; -1: node t is done.
  auto ready = [&](int t, int* blame) {
    const int m = g.node(s, t);
    const int64_t begin = fwd_begin[m], i = claimed[t];
    if (i >= fwd_begin[m + 1] - begin) return -1;
    for (int j = 0; j < L; ++j) {
      if (routes[(begin + i) * L + j] < 0) continue;
      if (port::ld_acquire(tail_of(own, m, j)) < taken[t * L + j] + 1ull) {
        *blame = j;
        return 0;
      }
    }
    return 1;
  };
  for (;;) {
    int got = 0;  // 1: claimed a record; 0: every record of the block's nodes is claimed; -1: failed
    if (lane == 0) {
      int blame = 0;
      auto claim = [&](int t) {  // node t's lock held, its next record ready
        const int m = g.node(s, t);
        const int64_t i = claimed[t], rec = fwd_begin[m] + i;
        int c = 0;
        for (int j = 0; j < L; ++j) {
          if (routes[rec * L + j] < 0) continue;
          const uint32_t slot = taken[t * L + j]++;
          mine.j[c] = j;
          mine.slot[c] = slot;
          mine.row[c++] = ring_of(own, m, j, L, slots, row_bytes) + (slot % slots) * row_bytes;
        }
        mine.c = c;
        mine.t = t;
        mine.i = i;
        claimed[t] = static_cast<uint32_t>(i + 1);
      };
      auto poll = [&]() {
        bool waiting = false;
        for (int u = 0; u < nodes; ++u) {
          const int t = (last + u) % nodes;
          if (!take(t)) {  // another warp is claiming from node t
            waiting = true;
            continue;
          }
          const int r = ready(t, &blame);
          if (r == 1) claim(t);
          port::st_release_block(lock + t, 0);
          if (r == 1) {
            last = t;
            got = 1;
            return true;
          }
          waiting = waiting || r == 0;
        }
        return !waiting;
      };
      auto site = [&]() {  // the first node whose next record waits, and on which local rank
        for (int t = 0; t < nodes; ++t) {
          while (!take(t)) port::spin_pause();  // a holder never waits
          const int r = ready(t, &blame);
          port::st_release_block(lock + t, 0);
          if (r == 0) return WaitSite{n * L + blame, g.node(s, t), kWaitCombineData};
        }
        return WaitSite{n * L + me, g.node(s, 0), kWaitCombineData};
      };
      if (!w.until_any(poll, site)) got = -1;
    }
    if (__shfl_sync(0xffffffffu, got, 0) <= 0) return;
    __syncwarp();  // lane 0's acquires of the tails order the warp's reads of the rows
    const int t = mine.t, c = mine.c, m = g.node(s, t);
    const int64_t i = mine.i;
    const int pdtype = (m != n) ? a.partial_dtype : -1;
    const PartialRowLayout pl{a.hidden, static_cast<int>(sizeof(AccT)), k, pdtype};
    uint8_t* partial = reinterpret_cast<uint8_t*>(reinterpret_cast<const uint64_t*>(a.partials)[m]) + i * pl.bytes();
    constexpr int kCols = 4;  // columns per lane per pass: kCols x c independent loads in flight
    for (int64_t base = lane; base < a.hidden; base += 32 * kCols) {
      AccT acc[kCols];
      for (int u = 0; u < kCols; ++u) acc[u] = 0;
      for (int qi = 0; qi < c; ++qi) {  // ascending local rank
        const uint8_t* row = mine.row[qi];
        for (int u = 0; u < kCols; ++u) {
          if (base + 32 * u < a.hidden) acc[u] += load_as<AccT>(row, a.dtype, base + 32 * u);
        }
      }
      for (int u = 0; u < kCols; ++u) {
        const int64_t col = base + 32 * u;
        if (col >= a.hidden) break;
        if (pdtype >= 0) store_as<AccT>(partial, pdtype, col, acc[u]);
        else reinterpret_cast<AccT*>(partial)[col] = acc[u];
      }
    }
    for (int col = lane; col < k; col += 32) {  // any top-k: no limit of 32
      float acc = 0.0f;
      for (int qi = 0; qi < c; ++qi) acc += load_f32_cg(mine.row[qi] + rl.weights_offset() + 4 * col);
      store_f32(partial + pl.weights_offset() + 4 * col, acc);
    }
    __syncwarp();  // every lane has read the slots before they are handed back
    int ok = 1;
    if (lane == 0) {
      for (int qi = 0; qi < c && ok; ++qi) {
        const int j = mine.j[qi];
        ok = publish_in_turn(w, turn + t * L + j, warps, mine.slot[qi], head_of(a.peers.ptr[j], m, me), false,
                             WaitSite{n * L + j, m, kWaitCombineData});
      }
    }
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
  }
}

// Blocks 2s (returner) and 2s + 1 (reducer) serve source nodes s, s + S, ... (RailGrid). min
// blocks 1: without it ptxas capped the fp64 reducer at 40 registers and spilled 24 bytes.
template <typename AccT>
__global__ void __launch_bounds__(kThreads, 1) rail_reduce_kernel(RailCombineArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  DISPATCH_SHARED_ARRAY(uint32_t, state, kMaxRailPairs);  // returner: rows taken per unit; reducer: slots taken
  DISPATCH_SHARED_ARRAY(uint32_t, turn, kMaxRailPairs);   // ring slots published per pair
  DISPATCH_SHARED_ARRAY(uint32_t, done, kMaxNodes);       // reducer: records claimed per node
  const RailGrid g{static_cast<int>(gridDim.x / 2), a.num_nodes};
  const int s = blockIdx.x / 2;
  if (call_is_void(a.peers.ptr[a.rank])) return;
  if (blockIdx.x % 2 == 0) {
    const RailUnits units = RailUnits::of(g.nodes_of(s) * a.num_ranks, blockDim.x / 32);
    for (int x = threadIdx.x; x < units.count(); x += blockDim.x) state[x] = 0;
    for (int q = threadIdx.x; q < units.pairs; q += blockDim.x) turn[q] = 0;
    __syncthreads();  // a pair's warps take turns through turn[q]
    return_pairs(a, g, s, state, turn);
  } else {
    reduce_nodes<AccT>(a, g, s, state, turn, done);
  }
}

template <typename AccT>
__global__ void __launch_bounds__(kThreads) rail_final_kernel(RailCombineArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  DISPATCH_SHARED(int, ok);
  const int L = a.num_ranks, me = a.rank, n = a.node, N = a.num_nodes, k = a.num_topk;
  const uint64_t own = a.peers.ptr[me];
  if (call_is_void(own)) return;
  const Waiter w{own, a.wait, 0};
  const PartialRowLayout own_layout{a.hidden, static_cast<int>(sizeof(AccT)), k, -1};
  const PartialRowLayout remote_layout{a.hidden, static_cast<int>(sizeof(AccT)), k, a.partial_dtype};
  const uint64_t* regions = reinterpret_cast<const uint64_t*>(a.partial_regions);
  const int32_t* positions = reinterpret_cast<const int32_t*>(a.positions);
  if (threadIdx.x == 0) {
    int good = 1;
    const int64_t* chunks = reinterpret_cast<const int64_t*>(a.num_chunks);
    for (int m = 0; m < N && good; ++m) {
      if (m == n || chunks[m] == 0) continue;
      good = w.until(reinterpret_cast<const uint64_t*>(a.arrival) + m, static_cast<uint64_t>(chunks[m]), m * L + me, m,
                     kWaitRailArrival);
    }
    ok = good;
  }
  __syncthreads();
  if (!ok) return;
  for (int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const int32_t* pos = positions + t * N;
    for (int64_t col = threadIdx.x; col < a.hidden; col += blockDim.x) {
      AccT acc = 0;
      for (int q = 0; q < N; ++q) {
        const int m = q == 0 ? n : (q <= n ? q - 1 : q);  // own node first, then the others ascending
        if (pos[m] < 0) continue;
        const PartialRowLayout& pl = m == n ? own_layout : remote_layout;
        const uint8_t* row = reinterpret_cast<const uint8_t*>(regions[m]) + pos[m] * pl.bytes();
        if (pl.row_dtype >= 0) acc += load_as<AccT>(row, pl.row_dtype, col);
        else acc += __ldcg(reinterpret_cast<const AccT*>(row) + col);
      }
      if (a.bias0) acc += load_as<AccT>(reinterpret_cast<const void*>(a.bias0), a.bias0_dtype, t * a.hidden + col);
      if (a.bias1) acc += load_as<AccT>(reinterpret_cast<const void*>(a.bias1), a.bias1_dtype, t * a.hidden + col);
      store_as<AccT>(reinterpret_cast<void*>(a.out), a.dtype, t * a.hidden + col, acc);
    }
    if (a.out_weights) {
      for (int col = threadIdx.x; col < k; col += blockDim.x) {
        float acc = 0.0f;
        for (int q = 0; q < N; ++q) {
          const int m = q == 0 ? n : (q <= n ? q - 1 : q);
          if (pos[m] < 0) continue;
          const PartialRowLayout& pl = m == n ? own_layout : remote_layout;
          acc += load_f32_cg(reinterpret_cast<const uint8_t*>(regions[m]) + pos[m] * pl.bytes() + pl.weights_offset() + 4 * col);
        }
        reinterpret_cast<float*>(a.out_weights)[t * k + col] = acc;
      }
    }
  }
}

void check_rail(const RailCombineArgs& a) {
  check_node(a.num_ranks, a.num_nodes);
  DISPATCH_CHECK_ARG(a.num_nodes >= 2 && a.num_nodes <= kMaxNodes, "the two-hop path serves 2..64 nodes");
  DISPATCH_CHECK_ARG(a.num_topk <= 32, "num_topk must be <= 32");
  DISPATCH_CHECK_ARG(a.num_sms >= 2, "num_sms must be >= 2 (a returner and a reducer block)");
}

}  // namespace

void load_rail_combine_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_reduce_kernel<float>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_reduce_kernel<double>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_final_kernel<float>));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_final_kernel<double>));
}

void launch_rail_reduce(const RailCombineArgs& a, uintptr_t stream) {
  check_rail(a);
  // returners: a warp per (source node, local rank) pair, polling when a warp has several;
  // reducers: a record per warp at a time (fewer threads on SIMT: it pays per thread)
  const RailGrid g = RailGrid::of(a.num_sms, a.num_nodes);
  const int threads = is_simt() ? 128 : kThreads;
  if (a.dtype == kDtypeFloat64) DISPATCH_LAUNCH(rail_reduce_kernel<double>, 2 * g.slots, threads, 0, as_stream(stream), a);
  else DISPATCH_LAUNCH(rail_reduce_kernel<float>, 2 * g.slots, threads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_rail_final(const RailCombineArgs& a, uintptr_t stream) {
  check_rail(a);
  // a block per token (strided), at most num_sms; few small blocks on SIMT, where every thread is a fiber
  int64_t most = is_simt() ? 4 : kFinalBlocks;
  if (most > a.num_sms) most = a.num_sms;
  const int threads = is_simt() ? 128 : kThreads;
  const int blocks = static_cast<int>(a.num_tokens < most ? (a.num_tokens > 0 ? a.num_tokens : 1) : most);
  if (a.dtype == kDtypeFloat64) DISPATCH_LAUNCH(rail_final_kernel<double>, blocks, threads, 0, as_stream(stream), a);
  else DISPATCH_LAUNCH(rail_final_kernel<float>, blocks, threads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dispatch::cuda
