// Inside the SIMT runtime: one launched grid, as the stream worker hands it to the scheduler.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "simt.h"

namespace simt {

struct GridLaunch {
  Dim3 grid, block;
  size_t dynamic_shared_bytes = 0;
  KernelBody body;
  std::string name;
  uint64_t start_ns = 0;
  std::atomic<bool> stop{false};  // a block failed (deadlock, watchdog): the others stop too
};

// Runs every block of the grid, each on an OS thread of its own, and returns when all are done.
// Returns "" on success, else what went wrong (deadlock or watchdog report, naming blocks/warps).
std::string run_grid(GridLaunch& grid);

}  // namespace simt
