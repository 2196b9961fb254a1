#include "doorbell.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <ctime>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <algorithm>
#include <chrono>
#include <thread>
#endif

namespace dispatch::host {

namespace {
#if defined(__linux__)
// Not FUTEX_PRIVATE: the word lives in memory shared between processes.
long futex(uint32_t* word, int op, uint32_t value, const timespec* timeout) {
  return ::syscall(SYS_futex, word, op, value, timeout, nullptr, 0);
}
#endif
}  // namespace

void doorbell_ring(Doorbell* bell) {
  __atomic_fetch_add(&bell->rings, 1u, __ATOMIC_SEQ_CST);
  // Pairs with the sleeper's increment: either it sees the new count or we see it sleeping.
  if (__atomic_load_n(&bell->sleepers, __ATOMIC_SEQ_CST) == 0) return;
#if defined(__linux__)
  futex(&bell->rings, FUTEX_WAKE, INT_MAX, nullptr);
#endif
}

uint32_t doorbell_rings(const Doorbell* bell) { return __atomic_load_n(&bell->rings, __ATOMIC_ACQUIRE); }

bool doorbell_wait(Doorbell* bell, uint32_t seen, double timeout_s) {
  if (doorbell_rings(bell) != seen) return true;
  if (!(timeout_s > 0)) return false;
  __atomic_fetch_add(&bell->sleepers, 1u, __ATOMIC_SEQ_CST);
#if defined(__linux__)
  timespec timeout;
  timeout.tv_sec = static_cast<time_t>(timeout_s);
  timeout.tv_nsec = static_cast<long>((timeout_s - std::floor(timeout_s)) * 1e9);
  // The kernel re-checks the count under its lock: a ring after our check cannot be missed.
  if (__atomic_load_n(&bell->rings, __ATOMIC_SEQ_CST) == seen) futex(&bell->rings, FUTEX_WAIT, seen, &timeout);
#else
  if (__atomic_load_n(&bell->rings, __ATOMIC_SEQ_CST) == seen)
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(std::min(timeout_s, 1e-3) * 1e6)));
#endif
  __atomic_fetch_sub(&bell->sleepers, 1u, __ATOMIC_SEQ_CST);
  return doorbell_rings(bell) != seen;
}

}  // namespace dispatch::host
