// ---- Kernel note (issue 14; figures from `nvcc -std=c++17 -arch=sm_90 -Xptxas -v -c`, 2026-12-04) ----
// Grids under Config.num_sms (RailGrid, rail_api.h): S = min(num_sms / 2, N) block pairs.
// Warp roles:
//   rail_pack_kernel: <= min(num_sms, 64) blocks x 16 warps (kThreads = 512; 128 threads on
//     SIMT); one send record per warp (grid-strided): dst rows, routing, then the x row and scales.
//   rail_forward_kernel: 2S blocks of 16 warps (4 on SIMT). Block 2s forwards source nodes s,
//     s + S, ...: its (source node m, local rank j) pairs are spread over its warps
//     (rail_units.h): several pairs per warp when they outnumber the warps, else G = warps /
//     pairs warps per pair, each copying the records of its own ring slots and publishing the
//     tail in slot order (turns through shared memory). Block 2s + 1 receives alike: units of
//     (m, p) place the rows local rank p forwarded to me and hand the slots back in order. A warp
//     visits its units in turn (up to a chunk / a ring per visit) and only waits, polling all of
//     them, when none can move.
// Bytes in flight per SM, by construction: warp_copy (element.h) issues 4 independent 16-byte
//   loads per lane before its stores when both ends are 16-byte aligned: 2 KiB per working warp.
//   pack: 16 warps -> 32 KiB per SM; at 0.5 us latency (Little's law) 64 GB/s per SM.
//   forward: min(16, G * pairs) warps work, pairs = ceil(N / S) * L: all 16 when pairs divides
//   16 or exceeds it, at least 9 otherwise. L = 8 or 2, one node per block: 16 warps, 32 KiB,
//   64 GB/s per SM (before: L warps, 2L KiB: L = 2 gave 8 GB/s); L = 6: 12 warps, 24 KiB, 48 GB/s.
//   Rows that are not 16-byte aligned fall back to 4-byte granules (fewer bytes in flight).
// Flags: one acquire of the arrival counter per chunk, one of the head only when the ring looks
//   full, one release fence and tail store per forwarded record (plus a shared-memory turn
//   handed on when G > 1); the receiver one head store per record placed.
// ptxas -v (sm_90): rail_pack_kernel 64 registers (56 before ProfileScope), rail_forward_kernel
//   120 registers (90 before the units; launch bounds of one block per SM: 120 x 512 < 64K),
//   12288 bytes static shared (next/sent per unit, turn per pair: uint32 [kMaxRailPairs] each),
//   0 bytes spill stores/loads, 0 stack; rail_arrive/rail_throttle 8 registers.
// Two-hop dispatch, the CUDA side of the rail: the rail sender packs each of my tokens once per
// destination node (RecordLayout with the L destination rows there); the transport moves node
// m's records to my rail peer on node m in chunks and bumps its arrival counter; on the
// destination node the forwarder of source node m (block 2s of the forward kernel, s = m mod S)
// pushes each chunk to the node's ranks through the in-node rings as soon as its counter says it
// landed, while the next chunk is still on the wire; receivers (block 2s + 1) place rows by dst_row.
#include "../common/record.h"
#include "bad_variants.h"
#include "kernels.h"
#include "rail_api.h"
#include "element.h"
#include "place_record.h"
#include "profile_record.h"
#include "rail_units.h"
#include "staging.h"

namespace dispatch::cuda {
namespace {

constexpr int kPackBlocks = 64;
#if defined(__CUDACC__)
constexpr cudaMemcpyKind kDeviceToDevice = cudaMemcpyDeviceToDevice;
#else
constexpr int kDeviceToDevice = 3;  // the SIMT runtime ignores the kind (one address space)
#endif

__global__ void __launch_bounds__(kThreads) rail_pack_kernel(RailDispatchArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  const int L = a.num_ranks, k = a.num_topk;
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  const RecordLayout rl{L, k, a.hidden_bytes, a.scale_bytes};
  const int64_t rb = rl.bytes();
  const int32_t* tokens = reinterpret_cast<const int32_t*>(a.node_tokens);
  const int32_t* dst_rows = reinterpret_cast<const int32_t*>(a.node_dst_rows);
  const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x);
  const uint8_t* scales = reinterpret_cast<const uint8_t*>(a.scales);
  const int64_t* topk_idx = reinterpret_cast<const int64_t*>(a.topk_idx);
  const float* topk_weights = reinterpret_cast<const float*>(a.topk_weights);
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < a.num_send_records; r += warps) {
    uint8_t* rec = reinterpret_cast<uint8_t*>(a.send_region) + r * rb;
    const int64_t tok = tokens[r];
    if (lane < L) reinterpret_cast<int32_t*>(rec + rl.dst_rows_offset())[lane] = dst_rows[r * L + lane];
    if (lane == 0) {
      *reinterpret_cast<int32_t*>(rec + rl.src_token_offset()) = static_cast<int32_t>(tok);
      *reinterpret_cast<int32_t*>(rec + rl.src_rank_offset()) = a.node * L + a.rank;
    }
    if (lane < k) {
      reinterpret_cast<int64_t*>(rec + rl.topk_idx_offset())[lane] = topk_idx[tok * k + lane];
      reinterpret_cast<float*>(rec + rl.topk_weights_offset())[lane] = topk_weights ? topk_weights[tok * k + lane] : 1.0f;
    }
    warp_copy(rec + rl.x_offset(), x + tok * a.hidden_bytes, a.hidden_bytes, lane);
    if (a.scale_bytes) warp_copy(rec + rl.scales_offset(), scales + tok * a.scale_bytes, a.scale_bytes, lane);
  }
}

// The records of source node m that chunk arrival counters must cover before record i is read.
DISPATCH_DEVICE uint64_t chunks_needed(const RailDispatchArgs& a, int64_t i) {
  const uint64_t chunk = static_cast<uint64_t>(i / a.chunk_records);
#if DISPATCH_BAD_VARIANT == DISPATCH_BAD_RAIL_EARLY_READ
  return chunk;  // reads chunk i while its counter may still say i
#else
  return chunk + 1;
#endif
}

DISPATCH_DEVICE uint64_t chunks_arrived(const RailDispatchArgs& a, int m) {
  // my own node's records are in my send region already
  return m == a.node ? ~0ull : port::ld_acquire(reinterpret_cast<const uint64_t*>(a.arrival) + m);
}

// Forwarder block of pair s: unit (q, u) walks pair q's records (source node m, local rank j) in
// order, counting the ring slots of those with a row at j, and copies its own slots' records into
// j's ring (m, me). A warp visits its units in turn, up to a chunk of records per visit, never
// waiting while one of them can move; when none can, lane 0 polls them all (until_any): waiting
// on one could hold up a ring another rank's receiver waits on.
DISPATCH_DEVICE void forward_pairs(const RailDispatchArgs& a, const RailGrid& g, int s, uint32_t* next,
                                   uint32_t* sent, uint32_t* turn) {
  const int L = a.num_ranks, me = a.rank, n = a.node;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const RailUnits units = RailUnits::of(g.nodes_of(s) * L, warps);
  const int G = units.per_pair;
  const uint64_t own = a.peers.ptr[me];
  const Waiter w{own, a.wait, 0};  // peers are reported by global rank
  const RecordLayout rl{L, a.num_topk, a.hidden_bytes, a.scale_bytes};
  const int64_t rb = rl.bytes();
  const int64_t slots = a.ring_slots;
  const int64_t* fwd_begin = reinterpret_cast<const int64_t*>(a.fwd_begin);
  const uint64_t* regions = reinterpret_cast<const uint64_t*>(a.fwd_regions);
  int32_t* routes = reinterpret_cast<int32_t*>(a.routes);
  auto dst_row = [&](int m, int64_t i, int j) {
    const uint8_t* rec = reinterpret_cast<const uint8_t*>(regions[m]) + i * rb;
    return __ldcg(reinterpret_cast<const int32_t*>(rec + rl.dst_rows_offset()) + j);
  };
  auto state = [&](int x) {  // lane 0
    const int q = x % units.pairs, u = x / units.pairs;
    const int m = g.node(s, q / L), j = q % L;
    const int64_t i = next[x];
    if (i >= fwd_begin[m + 1] - fwd_begin[m]) return kUnitDone;
    if (chunks_arrived(a, m) < chunks_needed(a, i)) return kUnitWaitsRail;
    const uint64_t out = sent[x];
    if (out % G != static_cast<uint64_t>(u) || out < static_cast<uint64_t>(slots) || dst_row(m, i, j) < 0) return kUnitReady;
    return port::ld_acquire(head_of(own, m, j)) >= out + 1 - slots ? kUnitReady : kUnitWaitsRing;
  };
  for (;;) {
    bool pending = false, moved = false;
    for (int x = warp; x < units.count(); x += warps) {
      const int q = x % units.pairs, u = x / units.pairs;
      const int m = g.node(s, q / L), j = q % L;
      const int64_t begin = fwd_begin[m], count = fwd_begin[m + 1] - begin;
      const int64_t first = next[x];
      if (first >= count) continue;
      pending = true;
      uint8_t* ring = ring_of(a.peers.ptr[j], m, me, L, slots, rb);
      uint64_t* tail = tail_of(a.peers.ptr[j], m, me);
      const uint64_t* head = head_of(own, m, j);
      const int64_t stop = count < first + a.chunk_records ? count : first + a.chunk_records;
      uint64_t out = sent[x], arrived = 0, freed = 0;  // arrived, freed: lane 0's last acquires
      int64_t i = first;
      for (; i < stop; ++i) {
        int go = 1;
        if (lane == 0 && arrived < chunks_needed(a, i)) {
          arrived = chunks_arrived(a, m);
          go = arrived >= chunks_needed(a, i);
        }
        if (!__shfl_sync(0xffffffffu, go, 0)) break;
        __syncwarp();  // lane 0's acquire orders the warp's reads of the chunk
        const int32_t row = dst_row(m, i, j);
        if (row >= 0 && out % G == static_cast<uint64_t>(u)) {
          if (lane == 0 && out + 1 > static_cast<uint64_t>(slots) && freed < out + 1 - slots) {
            freed = port::ld_acquire(head);
            go = freed >= out + 1 - slots;
          }
          if (!__shfl_sync(0xffffffffu, go, 0)) break;
          warp_copy(ring + static_cast<int64_t>(out % slots) * rb, reinterpret_cast<const uint8_t*>(regions[m]) + i * rb,
                    rb, lane);
          __syncwarp();
          if (lane == 0) go = publish_in_turn(w, turn + q, G, out, tail, true, WaitSite{n * L + j, m, kWaitDispatchSpace});
          if (!__shfl_sync(0xffffffffu, go, 0)) return;
        }
        if (row >= 0) ++out;
        if (routes && u == 0 && lane == 0) routes[(begin + i) * L + j] = row;
      }
      moved = moved || i != first;
      __syncwarp();  // every lane has read next[x] and sent[x]
      if (lane == 0) {
        next[x] = static_cast<uint32_t>(i);
        sent[x] = static_cast<uint32_t>(out);
      }
      __syncwarp();
    }
    if (!pending) return;
    if (moved) continue;
    int ok = 1;
    if (lane == 0) {
      auto site = [&](int x, UnitState st) {
        const int q = x % units.pairs, m = g.node(s, q / L);
        return st == kUnitWaitsRail ? WaitSite{m * L + me, m, kWaitRailArrival}
                                    : WaitSite{n * L + q % L, m, kWaitDispatchSpace};
      };
      ok = wait_for_any_unit(w, units, warp, warps, state, site, WaitSite{n * L + me, g.node(s, 0), kWaitDispatchSpace});
    }
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
  }
}

// Receiver block of pair s: units as the forwarder's; unit (q, u) places records i = k * G + u
// (k = 0, 1, ...) of my ring (m, p) from forwarder p by dst_row, and the G of them hand the slots
// back in order (turn[q]). A warp drains up to a ring per visit and polls all its units when none
// has records.
DISPATCH_DEVICE void receive_pairs(const RailDispatchArgs& a, const RailGrid& g, int s, uint32_t* next,
                                   uint32_t* turn) {
  const int L = a.num_ranks, me = a.rank, n = a.node;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int nodes = g.nodes_of(s);
  const RailUnits units = RailUnits::of(nodes * L, warps);
  const int G = units.per_pair;
  const uint64_t own = a.peers.ptr[me];
  // A receiver of remote nodes' records waits twice as long: the forwarder waiting on the rail
  // then reports first and names the rail peer, not itself.
  WaitArgs patient = a.wait;
  if (nodes > 1 || g.node(s, 0) != n) patient.timeout_ns *= 2;
  const Waiter w{own, patient, 0};
  const RecordLayout rl{L, a.num_topk, a.hidden_bytes, a.scale_bytes};
  const int64_t rb = rl.bytes();
  const int64_t slots = a.ring_slots;
  const int32_t* recv_counts = reinterpret_cast<const int32_t*>(a.recv_counts);
  auto record_of = [&](int x, int64_t k) { return k * G + x / units.pairs; };  // unit x's k-th record
  for (;;) {
    bool pending = false, moved = false;
    for (int x = warp; x < units.count(); x += warps) {
      const int q = x % units.pairs;
      const int m = g.node(s, q / L), p = q % L;
      const int64_t count = recv_counts[m * L + p], first = next[x];
      if (record_of(x, first) >= count) continue;
      pending = true;
      const uint8_t* ring = ring_of(own, m, p, L, slots, rb);
      const uint64_t* tail = tail_of(own, m, p);
      uint64_t* head = head_of(a.peers.ptr[p], m, me);
      uint64_t seen = 0;  // lane 0's last acquire of the tail
      int64_t k = first;
      for (; k < first + slots && record_of(x, k) < count; ++k) {
        const int64_t i = record_of(x, k);
        int go = 1;
        if (lane == 0 && seen <= static_cast<uint64_t>(i)) {
          seen = port::ld_acquire(tail);
          go = seen > static_cast<uint64_t>(i);
        }
        if (!__shfl_sync(0xffffffffu, go, 0)) break;
        __syncwarp();
        const uint8_t* rec = ring + (i % slots) * rb;
        const int64_t row = __ldcg(reinterpret_cast<const int32_t*>(rec + rl.dst_rows_offset()) + me);
        if (row < 0 || row >= a.max_rows) {  // num_worst_tokens below the received count
          if (lane == 0) w.report(n * L + p, m, kWaitOverflow);
          return;
        }
        place_record(a, rl, rec, row, -1, lane);
        __syncwarp();
        if (lane == 0) go = publish_in_turn(w, turn + q, G, i, head, false, WaitSite{n * L + p, m, kWaitDispatchData});
        if (!__shfl_sync(0xffffffffu, go, 0)) return;
      }
      moved = moved || k != first;
      __syncwarp();  // every lane has read next[x]
      if (lane == 0) next[x] = static_cast<uint32_t>(k);
      __syncwarp();
    }
    if (!pending) return;
    if (moved) continue;
    int ok = 1;
    if (lane == 0) {
      auto state = [&](int x) {
        const int q = x % units.pairs, m = g.node(s, q / L);
        const int64_t i = record_of(x, next[x]);
        if (i >= recv_counts[m * L + q % L]) return kUnitDone;
        return port::ld_acquire(tail_of(own, m, q % L)) > static_cast<uint64_t>(i) ? kUnitReady : kUnitWaitsRing;
      };
      auto site = [&](int x, UnitState) {
        const int q = x % units.pairs;
        return WaitSite{n * L + q % L, g.node(s, q / L), kWaitDispatchData};
      };
      ok = wait_for_any_unit(w, units, warp, warps, state, site, WaitSite{n * L + me, g.node(s, 0), kWaitDispatchData});
    }
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
  }
}

// Blocks 2s (forwarder) and 2s + 1 (receiver) serve source nodes s, s + S, ... (RailGrid).
__global__ void __launch_bounds__(kThreads, 1) rail_forward_kernel(RailDispatchArgs a) {
  const ProfileScope profile_scope(a.profile);  // profile_record.h
  DISPATCH_SHARED_ARRAY(uint32_t, next, kMaxRailPairs);  // per unit: records forwarded (placed)
  DISPATCH_SHARED_ARRAY(uint32_t, sent, kMaxRailPairs);  // forwarder, per unit: ring slots counted
  DISPATCH_SHARED_ARRAY(uint32_t, turn, kMaxRailPairs);  // per pair: ring slots published
  const RailGrid g{static_cast<int>(gridDim.x / 2), a.num_nodes};
  const int s = blockIdx.x / 2;
  if (call_is_void(a.peers.ptr[a.rank])) return;
  const RailUnits units = RailUnits::of(g.nodes_of(s) * a.num_ranks, blockDim.x / 32);
  for (int x = threadIdx.x; x < units.count(); x += blockDim.x) next[x] = sent[x] = 0;
  for (int q = threadIdx.x; q < units.pairs; q += blockDim.x) turn[q] = 0;
  __syncthreads();  // a pair's warps take turns through turn[q]
  if (blockIdx.x % 2 == 0) forward_pairs(a, g, s, next, sent, turn);
  else receive_pairs(a, g, s, next, turn);
}

__global__ void rail_throttle_kernel(uint64_t min_duration_ns) {
  const uint64_t start = port::global_timer();
  while (port::global_timer() - start < min_duration_ns) port::spin_pause();
}

__global__ void rail_arrive_kernel(uint64_t counter, uint64_t value) {
  __threadfence_system();  // the copy's bytes before the counter (stream order gives the rest)
  port::st_release(reinterpret_cast<uint64_t*>(counter), value);
}

}  // namespace

void load_rail_kernels() {
  cudaFuncAttributes attr;
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_pack_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_forward_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_throttle_kernel));
  DISPATCH_CUDA_CHECK(cudaFuncGetAttributes(&attr, rail_arrive_kernel));
  load_rail_combine_kernels();
}

static void check_rail(const RailDispatchArgs& a) {
  check_node(a.num_ranks, a.num_nodes);
  DISPATCH_CHECK_ARG(a.num_nodes >= 2 && a.num_nodes <= kMaxNodes, "the two-hop path serves 2..64 nodes");
  DISPATCH_CHECK_ARG(a.num_topk <= 32, "num_topk must be <= 32");
  DISPATCH_CHECK_ARG(a.chunk_records >= 1, "chunk_records must be >= 1");
  DISPATCH_CHECK_ARG(a.num_sms >= 2, "num_sms must be >= 2 (a forwarder and a receiver block)");
}

void launch_rail_pack(const RailDispatchArgs& a, uintptr_t stream) {
  check_rail(a);
  if (a.num_send_records == 0) return;
  // a record per warp; small blocks: the SIMT runtime (and TSan) pay per thread
  const int threads = is_simt() ? 128 : kThreads;
  int64_t blocks = (a.num_send_records + threads / 32 - 1) / (threads / 32);
  if (blocks > kPackBlocks) blocks = kPackBlocks;
  if (blocks > a.num_sms) blocks = a.num_sms;
  DISPATCH_LAUNCH(rail_pack_kernel, static_cast<int>(blocks), threads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void launch_rail_forward(const RailDispatchArgs& a, uintptr_t stream) {
  check_rail(a);
  // every warp works: on several (source node, local rank) pairs, or several warps on one pair
  // (RailUnits); 4 warps on SIMT, which pays per thread
  const RailGrid g = RailGrid::of(a.num_sms, a.num_nodes);
  DISPATCH_LAUNCH(rail_forward_kernel, 2 * g.slots, is_simt() ? 128 : kThreads, 0, as_stream(stream), a);
  DISPATCH_CUDA_CHECK(cudaGetLastError());
}

void rail_loopback_copy(uint64_t dst, uint64_t src, int64_t bytes, uint64_t counter, uint64_t value,
                        uint64_t min_duration_ns, uintptr_t stream) {
  DISPATCH_CHECK_ARG(bytes >= 0, "bytes must be >= 0");
  if (min_duration_ns) {
    DISPATCH_LAUNCH(rail_throttle_kernel, 1, 1, 0, as_stream(stream), min_duration_ns);
    DISPATCH_CUDA_CHECK(cudaGetLastError());
  }
  if (bytes) {
    DISPATCH_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                                        static_cast<size_t>(bytes), kDeviceToDevice, as_stream(stream)));
  }
  if (counter) {
    DISPATCH_LAUNCH(rail_arrive_kernel, 1, 1, 0, as_stream(stream), counter, value);
    DISPATCH_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace dispatch::cuda
