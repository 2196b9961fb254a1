// Runs grids: every block on an OS thread, every CUDA thread of a block a fiber ("lane") on it.
//
// Why fibers: one OS thread per CUDA thread costs 3.5-4.3 ms per __syncthreads over 512 threads
// on the 2-core CI machine and runs out of mappings under TSan at 8192 threads; 32 fibers on one
// thread do a warp round in ~20 us. Lanes waiting at a barrier or a warp collective are parked
// (not scheduled) until the last member arrives; a lane whose spin-wait saw nothing new yields to
// the next lane, and a block whose runnable lanes all just yielded idle gives its core away
// (sched_yield, then short sleeps), so producers on other blocks get the CPU.
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "fiber.h"
#include "grid.h"

namespace simt {

int g_random_yields = 0;

namespace {

#if defined(SIMT_TSAN)
constexpr size_t kStackBytes = 256 << 10;  // TSan's instrumentation takes stack too
#else
constexpr size_t kStackBytes = 64 << 10;
#endif
constexpr unsigned char kSharedFill = 0xA5;  // shared memory starts as garbage, as on a GPU

std::mutex g_options_mutex;
Options g_options;

struct Block;

struct Lane {
  LaneInfo info;
  std::unique_ptr<Fiber> fiber;
  bool started = false;
  bool done = false;
  bool parked = false;
  bool idle_turn = false;     // this turn ended in a spin-wait that saw nothing new
  const char* waiting_at = nullptr;
  uint64_t warp_ops = 0;      // warp collectives entered (picks the slot parity)
  uint64_t rng = 0;
};

struct Barrier {
  int expected = 0;
  int arrived = 0;
  std::vector<Lane*> parked;
};

struct Warp {
  Barrier barrier;
  uint64_t slots[2][kWarpSize] = {};
};

struct SharedVariable {
  const void* key;
  std::unique_ptr<std::max_align_t[]> storage;
};

// Runnable lanes in FIFO order. Fixed capacity: nothing on a lane's path allocates, because TSan
// would see memory allocated on one lane (fiber) and freed on another as a race.
class RunQueue {
 public:
  void reset(size_t capacity) { slots_.assign(capacity + 1, nullptr); }
  bool empty() const { return head_ == tail_; }
  size_t size() const { return (tail_ + slots_.size() - head_) % slots_.size(); }
  void push_back(Lane* lane) {
    slots_[tail_] = lane;
    tail_ = (tail_ + 1) % slots_.size();
  }
  Lane* pop_front() {
    Lane* lane = slots_[head_];
    head_ = (head_ + 1) % slots_.size();
    return lane;
  }

 private:
  std::vector<Lane*> slots_;
  size_t head_ = 0, tail_ = 0;
};

constexpr size_t kMaxSharedVariables = 64;

struct Block {
  GridLaunch* grid = nullptr;
  Dim3 index;
  std::vector<Lane> lanes;
  std::vector<Warp> warps;
  Barrier barrier;
  RunQueue run_queue;
  Fiber scheduler;
  Lane* current = nullptr;
  int live = 0;
  std::vector<SharedVariable> shared;
  std::unique_ptr<std::max_align_t[]> dynamic_shared;
  std::string failure;
  int sm_id = 0;  // the resident slot (ResidentSlots)
};

thread_local Block* tl_block = nullptr;

Block& block() { return *tl_block; }
Lane& lane() { return *tl_block->current; }

void yield_to_scheduler(Block& b, Lane& me) { Fiber::switch_to(*me.fiber, b.scheduler, false); }

void release(Block& b, Barrier& barrier) {
  barrier.arrived = 0;
  for (Lane* l : barrier.parked) {
    l->parked = false;
    l->waiting_at = nullptr;
    b.run_queue.push_back(l);
  }
  barrier.parked.clear();
}

// Arrive at `barrier`; returns once every live member has arrived.
void arrive(Barrier& barrier, const char* what) {
  Block& b = block();
  Lane& me = lane();
  tsan_release(&barrier);
  if (++barrier.arrived >= barrier.expected) {
    release(b, barrier);
  } else {
    me.parked = true;
    me.waiting_at = what;
    barrier.parked.push_back(&me);
    yield_to_scheduler(b, me);
  }
  tsan_acquire(&barrier);
}

// An exited lane no longer counts as a member of its block's and warp's barriers.
void leave(Block& b, Barrier& barrier) {
  --barrier.expected;
  if (barrier.arrived > 0 && barrier.arrived >= barrier.expected) release(b, barrier);
}

void lane_entry() {
  Block& b = block();
  Lane& me = lane();
  b.grid->body();
  me.done = true;
  tsan_release(&b);
  --b.live;
  leave(b, b.barrier);
  leave(b, b.warps[me.info.warp_id].barrier);
  yield_to_scheduler(b, me);  // never resumed
}

// "warp 0: lanes 0-31 at __syncthreads; warp 1: 3 lanes spinning, 29 exited"
std::string describe_lanes(const Block& b) {
  std::ostringstream out;
  for (size_t w = 0; w < b.warps.size(); ++w) {
    int exited = 0, spinning = 0, runnable = 0;
    std::vector<std::pair<const char*, int>> waits;
    for (size_t i = w * kWarpSize; i < std::min(b.lanes.size(), (w + 1) * kWarpSize); ++i) {
      const Lane& l = b.lanes[i];
      if (l.done) ++exited;
      else if (l.parked) {
        auto it = std::find_if(waits.begin(), waits.end(), [&](auto& p) { return p.first == l.waiting_at; });
        if (it == waits.end()) waits.emplace_back(l.waiting_at, 1);
        else ++it->second;
      } else if (l.idle_turn) ++spinning;
      else ++runnable;
    }
    if (exited == kWarpSize) continue;
    out << "\n  warp " << w << ":";
    for (auto& [what, n] : waits) out << " " << n << " lanes at " << what << ";";
    if (spinning) out << " " << spinning << " lanes in a spin-wait;";
    if (runnable) out << " " << runnable << " lanes runnable;";
    if (exited) out << " " << exited << " lanes exited;";
  }
  return out.str();
}

std::string block_name(const Block& b) {
  std::ostringstream out;
  out << "kernel '" << b.grid->name << "' block (" << b.index.x << "," << b.index.y << "," << b.index.z << ")";
  return out.str();
}

void idle_pause(int idle_rounds) {
  if (idle_rounds <= 2) {
    sched_yield();
    return;
  }
  const long sleep_ns = std::min<long>(200000, 5000L * idle_rounds);
  timespec ts{0, sleep_ns};
  nanosleep(&ts, nullptr);
}

void run_block(Block& b) {
  tl_block = &b;
  b.scheduler.adopt_current();
  for (Lane& l : b.lanes) b.run_queue.push_back(&l);
  const uint64_t watchdog_ns = static_cast<uint64_t>(options().watchdog_s * 1e9);
  size_t idle_streak = 0;
  int idle_rounds = 0;
  uint64_t turns = 0;
  while (b.live > 0) {
    if (b.run_queue.empty()) {
      b.failure = "simt: deadlock in " + block_name(b) + ": every live lane waits at a barrier" + describe_lanes(b);
      break;
    }
    Lane* l = b.run_queue.pop_front();
    b.current = l;
    l->idle_turn = false;
    const bool first = !l->started;
    l->started = true;
    Fiber::switch_to(b.scheduler, *l->fiber, first);
    b.current = nullptr;
    if (!l->done && !l->parked) b.run_queue.push_back(l);
    if (l->idle_turn) {
      if (++idle_streak >= b.run_queue.size()) {
        idle_pause(++idle_rounds);
        idle_streak = 0;
      }
    } else {
      idle_streak = 0;
      idle_rounds = 0;
    }
    if ((++turns & 255) == 0 || idle_rounds > 0) {
      if (b.grid->stop.load(std::memory_order_relaxed)) {
        b.failure = "simt: " + block_name(b) + " stopped: another block of the grid failed";
        break;
      }
      if (global_timer_ns() - b.grid->start_ns > watchdog_ns) {
        b.failure = "simt: watchdog: " + block_name(b) + " still running after " +
                    std::to_string(options().watchdog_s) + " s" + describe_lanes(b);
        break;
      }
    }
  }
  b.current = nullptr;
  if (b.failure.empty()) tsan_acquire(&b);
  tl_block = nullptr;
}

// Caps the blocks resident at once (Options::max_resident_blocks), as a GPU's SMs do. A resident
// block holds a numbered slot, the lowest free one: its virtual SM id (sm_id()).
class ResidentSlots {
 public:
  int acquire(int limit) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return limit <= 0 || in_use_ < limit; });
    ++in_use_;
    const auto free_slot = std::find(used_.begin(), used_.end(), false);
    if (free_slot != used_.end()) {
      *free_slot = true;
      return static_cast<int>(free_slot - used_.begin());
    }
    used_.push_back(true);
    return static_cast<int>(used_.size()) - 1;
  }
  void release(int slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    --in_use_;
    used_[static_cast<size_t>(slot)] = false;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int in_use_ = 0;
  std::vector<bool> used_;
};

ResidentSlots g_resident;

void init_block(Block& b, GridLaunch& grid, unsigned linear_index, const StackArena& stacks) {
  const unsigned threads = grid.block.count();
  b.grid = &grid;
  b.index = Dim3(linear_index % grid.grid.x, (linear_index / grid.grid.x) % grid.grid.y,
                 linear_index / (grid.grid.x * grid.grid.y));
  b.lanes.resize(threads);
  b.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  for (Warp& w : b.warps) w.barrier.parked.reserve(kWarpSize);
  b.barrier.parked.reserve(threads);
  b.barrier.expected = static_cast<int>(threads);
  b.run_queue.reset(threads);
  b.shared.reserve(kMaxSharedVariables);
  b.live = static_cast<int>(threads);
  const uint64_t seed = options().yield_seed;
  for (unsigned t = 0; t < threads; ++t) {
    Lane& l = b.lanes[t];
    l.info.thread_idx = Dim3(t % grid.block.x, (t / grid.block.x) % grid.block.y, t / (grid.block.x * grid.block.y));
    l.info.block_idx = b.index;
    l.info.block_dim = grid.block;
    l.info.grid_dim = grid.grid;
    l.info.lane_id = static_cast<int>(t % kWarpSize);
    l.info.warp_id = static_cast<int>(t / kWarpSize);
    l.rng = seed ^ (0x9E3779B97F4A7C15ull * (linear_index * 4096ull + t + 1));
    l.fiber = std::make_unique<Fiber>(stacks.stack(t), stacks.stack_bytes(), &lane_entry);
    ++b.warps[l.info.warp_id].barrier.expected;
  }
  if (grid.dynamic_shared_bytes) {
    const size_t words = (grid.dynamic_shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    b.dynamic_shared.reset(new std::max_align_t[words]);
    std::memset(b.dynamic_shared.get(), kSharedFill, words * sizeof(std::max_align_t));
  }
}

}  // namespace

// ---- options ----------------------------------------------------------------------------------
void configure(const Options& options) {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  g_options = options;
  g_random_yields = options.yield_seed != 0 && options.yield_per_mille > 0;
}

Options options() {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  return g_options;
}

int resident_block_limit() {
  const int limit = options().max_resident_blocks;
  return limit > 0 ? limit : (1 << 30);
}

// ---- kernel-side primitives -------------------------------------------------------------------
LaneInfo& this_lane() { return lane().info; }

void sync_block() { arrive(block().barrier, "__syncthreads"); }

void sync_warp() {
  Lane& me = lane();
  ++me.warp_ops;
  arrive(block().warps[me.info.warp_id].barrier, "__syncwarp");
}

uint64_t warp_shuffle(uint64_t value, int src_lane) {
  Lane& me = lane();
  Warp& warp = block().warps[me.info.warp_id];
  const int parity = static_cast<int>(me.warp_ops++ & 1);
  warp.slots[parity][me.info.lane_id] = value;
  arrive(warp.barrier, "__shfl_sync");
  return warp.slots[parity][src_lane & (kWarpSize - 1)];
}

uint32_t warp_ballot(bool predicate) {
  Lane& me = lane();
  Warp& warp = block().warps[me.info.warp_id];
  const uint64_t op = me.warp_ops++;
  const int parity = static_cast<int>(op & 1);
  // tag every vote with the collective's number: slots of exited lanes hold older tags
  warp.slots[parity][me.info.lane_id] = (op << 1) | (predicate ? 1u : 0u);
  arrive(warp.barrier, "__ballot_sync");
  uint32_t mask = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    const uint64_t vote = warp.slots[parity][l];
    if ((vote >> 1) == op && (vote & 1)) mask |= 1u << l;
  }
  return mask;
}

void spin_yield() {
  Block& b = block();
  Lane& me = lane();
  me.idle_turn = true;
  yield_to_scheduler(b, me);
}

void random_yield_slow() {
  Block* b = tl_block;
  if (b == nullptr || b->current == nullptr) return;  // host code
  Lane& me = *b->current;
  me.rng ^= me.rng << 13;
  me.rng ^= me.rng >> 7;
  me.rng ^= me.rng << 17;
  if (static_cast<int>(me.rng % 1000) < options().yield_per_mille) yield_to_scheduler(*b, me);
}

void* block_shared(const void* key, size_t bytes) {
  Block& b = block();
  for (SharedVariable& v : b.shared) {
    if (v.key == key) {
      tsan_acquire(v.storage.get());  // after the first lane's fill
      return v.storage.get();
    }
  }
  if (b.shared.size() == kMaxSharedVariables) {
    std::fprintf(stderr, "simt: more than %zu __shared__ variables in one kernel\n", kMaxSharedVariables);
    std::abort();
  }
  const size_t words = (bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
  b.shared.push_back(SharedVariable{key, std::unique_ptr<std::max_align_t[]>(new std::max_align_t[words])});
  void* storage = b.shared.back().storage.get();
  std::memset(storage, kSharedFill, words * sizeof(std::max_align_t));
  tsan_release(storage);
  return storage;
}

void* dynamic_shared() { return block().dynamic_shared.get(); }

int sm_id() { return block().sm_id; }

uint64_t global_timer_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// ---- grids ------------------------------------------------------------------------------------
std::string run_grid(GridLaunch& grid) {
  const unsigned num_blocks = grid.grid.count();
  if (num_blocks == 0 || grid.block.count() == 0) return "";
  grid.start_ns = global_timer_ns();
  const int limit = options().max_resident_blocks;
  std::vector<std::string> failures(num_blocks);
  std::vector<std::thread> threads;
  threads.reserve(num_blocks);
  for (unsigned i = 0; i < num_blocks; ++i) {
    threads.emplace_back([&grid, &failures, i, limit] {
      const int slot = g_resident.acquire(limit);
      try {
        StackArena stacks(grid.block.count(), kStackBytes);
        Block b;
        init_block(b, grid, i, stacks);
        b.sm_id = slot;
        run_block(b);
        failures[i] = b.failure;
      } catch (const std::exception& exc) {
        failures[i] = std::string("simt: block failed to start: ") + exc.what();
      }
      if (!failures[i].empty()) grid.stop.store(true, std::memory_order_relaxed);
      g_resident.release(slot);
    });
  }
  for (std::thread& t : threads) t.join();
  // the first block's own report, not the "stopped because another failed" echoes
  std::string first_echo;
  for (const std::string& f : failures) {
    if (f.empty()) continue;
    if (f.find("another block of the grid failed") == std::string::npos) return f;
    if (first_echo.empty()) first_echo = f;
  }
  return first_echo;
}

}  // namespace simt
