// A bounded fork-join over [0, count): the CPU backend's stand-in for a bounded SM count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace dispatch::host {

// Calls fn(begin, end) on up to `num_threads` threads (the caller's included) over contiguous
// ranges. Small ranges run on the caller alone: a thread start costs more than it saves.
template <typename Fn>
void parallel_for(int64_t count, int num_threads, int64_t min_per_thread, Fn&& fn) {
  const int64_t useful = min_per_thread > 0 ? count / min_per_thread : count;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, useful)));
  if (threads <= 1) {
    fn(int64_t{0}, count);
    return;
  }
  const int64_t per_thread = (count + threads - 1) / threads;
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) {
    const int64_t begin = std::min<int64_t>(count, i * per_thread);
    const int64_t end = std::min<int64_t>(count, begin + per_thread);
    workers.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(int64_t{0}, std::min<int64_t>(count, per_thread));
  for (auto& worker : workers) worker.join();
}

}  // namespace dispatch::host
