// The control header of every rank's staging buffer, and the spin-wait every kernel uses on it.
//
// Staging buffer of every rank (kHeaderBytes of control, then rings):
//   barrier[kMaxPeers]  u64   barrier[p] = last barrier value rank p reached (written by p)
//   seq, abort, skip    u64   call counter (device-resident: graph-capturable), abort flag, and
//                             "this call is void" (a rank's arguments were bad: notify says so)
//   verdict[kMaxPeers]  u64   verdict[p] = argument verdict of rank p for this call (written by p)
//   tails[C][kMaxPeers] u64   records peer p has written into my ring (c, p) (written by p)
//   heads[C][kMaxPeers] u64   records peer p has consumed of my stream to it on channel c (written by p)
//   notify[kMaxPeers]   slot  what source p told me in the last notify
//   rings               (c, p) ring of `ring_slots` records that peer p writes for me on channel c
// Counters restart at 0 every call: the notify kernel zeroes them between two barriers, after
// which no rank can still be reading or writing the previous call's rings.
#pragma once

#include "../common/codes.h"
#include "api.h"
#include "port.h"

namespace dispatch::cuda {

constexpr int64_t kBarrierOffset = 0;
constexpr int64_t kSeqOffset = 8 * kMaxPeers;
constexpr int64_t kAbortOffset = kSeqOffset + 8;
constexpr int64_t kSkipOffset = kAbortOffset + 8;
constexpr int64_t kVerdictOffset = 256;
constexpr int64_t kTailsOffset = 1024;
constexpr int64_t kHeadsOffset = kTailsOffset + 8LL * kMaxChannels * kMaxPeers;
constexpr int64_t kNotifyOffset = 40960;
constexpr int kSlotInts = 2 + kMaxChannels + kMaxLocalExperts;  // count, num_tokens, chan[C], experts
constexpr int64_t kSlotBytes = ((4LL * kSlotInts + 255) / 256) * 256;
static_assert(kSkipOffset + 8 <= kVerdictOffset, "header overlap");
static_assert(kVerdictOffset + 8 * kMaxPeers <= kTailsOffset, "header overlap");
static_assert(kHeadsOffset + 8LL * kMaxChannels * kMaxPeers <= kNotifyOffset, "header overlap");
static_assert(kNotifyOffset + kSlotBytes * kMaxPeers <= kHeaderBytes, "header too small");

DISPATCH_DEVICE uint64_t* barrier_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kBarrierOffset); }
DISPATCH_DEVICE uint64_t* seq_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kSeqOffset); }
DISPATCH_DEVICE uint64_t* abort_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kAbortOffset); }
DISPATCH_DEVICE uint64_t* skip_of(uint64_t base) { return reinterpret_cast<uint64_t*>(base + kSkipOffset); }
DISPATCH_DEVICE uint64_t* verdict_of(uint64_t base, int p) {
  return reinterpret_cast<uint64_t*>(base + kVerdictOffset) + p;
}
DISPATCH_DEVICE uint64_t* tail_of(uint64_t base, int c, int p) {
  return reinterpret_cast<uint64_t*>(base + kTailsOffset) + c * kMaxPeers + p;
}
DISPATCH_DEVICE uint64_t* head_of(uint64_t base, int c, int p) {
  return reinterpret_cast<uint64_t*>(base + kHeadsOffset) + c * kMaxPeers + p;
}
DISPATCH_DEVICE int32_t* slot_of(uint64_t base, int p) {
  return reinterpret_cast<int32_t*>(base + kNotifyOffset + kSlotBytes * p);
}
DISPATCH_DEVICE uint8_t* ring_of(uint64_t base, int c, int p, int L, int64_t slots, int64_t row_bytes) {
  return reinterpret_cast<uint8_t*>(base + kHeaderBytes) + (static_cast<int64_t>(c) * L + p) * slots * row_bytes;
}

// A call is void when notify found a rank's arguments bad: dispatch and combine return at once.
DISPATCH_DEVICE bool call_is_void(uint64_t own) { return port::ld_relaxed(skip_of(own)) != 0; }

// What a blocked wait is waiting on: the peer to blame, its channel (source node on the two-hop
// path) and the wait's kind.
struct WaitSite {
  int peer, channel;
  WaitKind kind;
};

struct Waiter {
  uint64_t own;  // this rank's staging buffer (abort flag)
  WaitArgs args;
  int rank_base;  // global rank of local index 0

  // Spins until *p >= target. On timeout reports (peer, channel, kind), raises the abort flag and
  // returns false; returns false at once when another block already aborted.
  DISPATCH_DEVICE bool until(const uint64_t* p, uint64_t target, int peer, int channel, WaitKind kind) const {
    if (port::ld_acquire(p) >= target) return true;
    const uint64_t start = port::global_timer();
    uint32_t spins = 0;
    while (port::ld_acquire(p) < target) {
      port::spin_pause();
      if ((++spins & 255u) == 0) {
        if (aborted()) return false;
        if (port::global_timer() - start > args.timeout_ns) {
          report(peer, channel, kind);
          return false;
        }
      }
    }
    return true;
  }

  // Spins until poll() returns true (it reads the counters itself, with acquire loads). On
  // timeout reports (blame(), channel, kind), raises the abort flag and returns false; returns
  // false at once when another block already aborted. For a thread that serves several peers
  // and must not wait on one while another has work (that would couple rings into a cycle).
  template <typename Poll, typename Blame>
  DISPATCH_DEVICE bool until_any(Poll&& poll, Blame&& blame, int channel, WaitKind kind) const {
    return until_any(poll, [&] { return WaitSite{blame(), channel, kind}; });
  }

  // until_any for a waiter whose blocked work differs in kind (a forwarder waits on the rail for
  // one source node and on ring space for another): site() says what the first blocked item waits
  // on, and that is what a timeout reports.
  template <typename Poll, typename Site>
  DISPATCH_DEVICE bool until_any(Poll&& poll, Site&& site) const {
    if (poll()) return true;
    const uint64_t start = port::global_timer();
    uint32_t spins = 0;
    while (!poll()) {
      port::spin_pause();
      if ((++spins & 255u) == 0) {
        if (aborted()) return false;
        if (port::global_timer() - start > args.timeout_ns) {
          const WaitSite at = site();
          report(at.peer, at.channel, at.kind);
          return false;
        }
      }
    }
    return true;
  }

  // First report wins (the abort flag); the host reads flag, rank, channel, kind.
  DISPATCH_DEVICE void report(int peer, int channel, WaitKind kind) const {
    if (atomicCAS(reinterpret_cast<unsigned long long*>(abort_of(own)), 0ull, 1ull) == 0ull && args.error) {
      int32_t* err = reinterpret_cast<int32_t*>(args.error);
      port::st_relaxed(err + 1, rank_base + peer);
      port::st_relaxed(err + 2, channel);
      port::st_relaxed(err + 3, static_cast<int32_t>(kind));
      port::st_release(err, 1);
      __threadfence_system();
    }
  }

  DISPATCH_DEVICE bool aborted() const { return port::ld_relaxed(abort_of(own)) != 0; }
};

}  // namespace dispatch::cuda
