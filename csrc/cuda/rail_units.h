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

// Where a unit stands, without waiting: done, able to move now, or waiting on the rail (a chunk
// not arrived) or on a ring (space, or a node-mate's records).
enum UnitState { kUnitDone, kUnitReady, kUnitWaitsRail, kUnitWaitsRing };

// Lane 0 of a warp none of whose units could move: polls all of them until one can (true), or
// none has work left; never waits on one while another could move, which would couple the rings
// of different ranks into a cycle. state(x): unit x's UnitState; site(x, state): what a timeout
// reports for the first waiting unit (idle: when none waits any more).
template <typename State, typename Site>
DISPATCH_DEVICE bool wait_for_any_unit(const Waiter& w, const RailUnits& units, int warp, int warps, State&& state,
                                       Site&& site, WaitSite idle) {
  auto poll = [&]() {
    bool waiting = false;
    for (int x = warp; x < units.count(); x += warps) {
      const UnitState st = state(x);
      if (st == kUnitReady) return true;
      waiting = waiting || st != kUnitDone;
    }
    return !waiting;
  };
  auto first_waiting = [&]() {
    for (int x = warp; x < units.count(); x += warps) {
      const UnitState st = state(x);
      if (st == kUnitWaitsRail || st == kUnitWaitsRing) return site(x, st);
    }
    return idle;
  };
  return w.until_any(poll, first_waiting);
}

}  // namespace dispatch::cuda
