// A doorbell per rank in the node's shared memory: whoever changes something a rank may be
// waiting for rings its bell, and a rank with nothing to do sleeps on its own bell (a futex)
// instead of polling. One 64-byte line: the ring count, then the number of sleepers, so a ring
// costs a system call only when someone sleeps.
#pragma once

#include <cstdint>

namespace dispatch::host {

struct Doorbell {
  uint32_t rings;
  uint32_t sleepers;
};

// Counts one ring and wakes every sleeper. Safe from any process mapping the line.
void doorbell_ring(Doorbell* bell);

// The ring count now (read before looking for work; pass it to doorbell_wait).
uint32_t doorbell_rings(const Doorbell* bell);

// Sleeps until the ring count differs from `seen` or `timeout_s` passes; returns whether it
// differs. Returns at once when it already does, so a ring between reading `seen` and this
// call is never lost.
bool doorbell_wait(Doorbell* bell, uint32_t seen, double timeout_s);

}  // namespace dispatch::host
