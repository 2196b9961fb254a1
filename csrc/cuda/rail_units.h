// Work units of the two-hop kernels' blocks (rail_dispatch.cu, rail_combine.cu), so that every
// warp of a block works whether the block serves more (source node, local rank) pairs than it
// has warps or fewer.
#pragma once

#include "port.h"
#include "staging.h"

namespace dispatch::cuda {

// The units of a forwarder, receiver or returner block: its (source node, local rank) pairs
// q = t * L + j (t-th source node of the block), each split among G = warps / pairs warps when the
// block has more warps than pairs: sub-unit u of pair q moves the records of q's ring slots o with
// o % G == u, and the G of them publish the ring's counter in slot order, taking turns through
// turn[q]. Unit x = u * pairs + q; warp w owns units x = w, w + warps, ... (several when G = 1).
struct RailUnits {
  int pairs, per_pair;  // per_pair: G
  DISPATCH_DEVICE static RailUnits of(int pairs, int warps) { return RailUnits{pairs, warps > pairs ? warps / pairs : 1}; }
  DISPATCH_DEVICE int count() const { return pairs * per_pair; }
};

// Lane 0 of the unit holding ring slot `slot` of a pair, once the slot's record is written (or
// read): waits for the previous slot's owner to have published (its sibling warp, which can
// always get there: its record arrived, and its slot freed, no later than this one), publishes
// slot + 1 into `counter` (after a system fence when `fence`: the record's bytes first), then
// hands the turn on. A pair of one warp has no turns to take.
DISPATCH_DEVICE bool publish_in_turn(const Waiter& w, uint32_t* turn, int per_pair, uint64_t slot, uint64_t* counter,
                                     bool fence, WaitSite site) {
  if (per_pair > 1) {
    auto my_turn = [&]() { return port::ld_acquire_block(turn) == static_cast<uint32_t>(slot); };
    if (!w.until_any(my_turn, [&]() { return site; })) return false;
  }
  if (fence) __threadfence_system();
  port::st_release(counter, slot + 1);
  if (per_pair > 1) port::st_release_block(turn, static_cast<uint32_t>(slot + 1));
  return true;
}

}  // namespace dispatch::cuda
