// A bounded fork-join over [0, count): the CPU backend's stand-in for a bounded SM count.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace dispatch::host {

// One worker's share of one parallel_for, for dispatch.profile (times: CLOCK_MONOTONIC ns, the
// clock of Python's time.perf_counter_ns on Linux).
struct WorkerSlice {
  int worker;
  int64_t start_ns;
  int64_t end_ns;
  int64_t items;
};

// Slices of the parallel_for calls made while enabled; off (one relaxed load per call) unless
// the profiler is on.
class SliceLog {
 public:
  static SliceLog& instance() {
    static SliceLog log;
    return log;
  }
  void set_enabled(bool enabled) { enabled_.store(enabled, std::memory_order_relaxed); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  void add(const WorkerSlice& slice) {
    std::lock_guard<std::mutex> lock(mutex_);
    slices_.push_back(slice);
  }
  std::vector<WorkerSlice> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(slices_, {});
  }

 private:
  std::atomic<bool> enabled_{false};
  std::mutex mutex_;
  std::vector<WorkerSlice> slices_;
};

inline int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Calls fn(begin, end) on up to `num_threads` threads (the caller's included, worker 0) over
// contiguous ranges. Small ranges run on the caller alone: a thread start costs more than it saves.
template <typename Fn>
void parallel_for(int64_t count, int num_threads, int64_t min_per_thread, Fn&& fn) {
  const int64_t useful = min_per_thread > 0 ? count / min_per_thread : count;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, useful)));
  SliceLog& log = SliceLog::instance();
  const bool logged = log.enabled();
  auto run = [&fn, &log, logged](int worker, int64_t begin, int64_t end) {
    const int64_t start_ns = logged ? monotonic_ns() : 0;
    fn(begin, end);
    if (logged) log.add(WorkerSlice{worker, start_ns, monotonic_ns(), end - begin});
  };
  if (threads <= 1) {
    run(0, int64_t{0}, count);
    return;
  }
  const int64_t per_thread = (count + threads - 1) / threads;
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) {
    const int64_t begin = std::min<int64_t>(count, i * per_thread);
    const int64_t end = std::min<int64_t>(count, begin + per_thread);
    workers.emplace_back([&run, i, begin, end] { run(i, begin, end); });
  }
  run(0, int64_t{0}, std::min<int64_t>(count, per_thread));
  for (auto& worker : workers) worker.join();
}

}  // namespace dispatch::host
