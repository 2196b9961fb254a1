// Known-bad variants, compiled in on purpose (-DDISPATCH_BAD_VARIANT=N) to prove that the SIMT
// tests, ThreadSanitizer and the timeouts catch each class of bug. Never set in a real build.
#pragma once

#ifndef DISPATCH_BAD_VARIANT
#define DISPATCH_BAD_VARIANT 0
#endif

#define DISPATCH_BAD_PLAIN_TAIL_STORE 1     // dispatch publishes its ring tail with a plain store
#define DISPATCH_BAD_RING_OVERRUN 2         // dispatch's space check lets a sender run one slot ahead
#define DISPATCH_BAD_NO_BARRIER_BEFORE_HEAD 3  // combine frees ring slots before every thread read them
#define DISPATCH_BAD_WAIT_ONE_TOO_MANY 4    // a dispatch receiver waits for one record more than comes
#define DISPATCH_BAD_RAIL_EARLY_READ 5      // the two-hop forwarder reads chunk i before its arrival counter says so
#define DISPATCH_BAD_RAIL_CLAIM_UNLOCKED 6    // two-hop reducer warps claim records without the node's lock
